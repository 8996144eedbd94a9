"""Launchers end to end on a real SLURM (tools/local_slurm.sh, 2 nodes in network namespaces) and locally.

Every job runs a small gloo all_reduce "probe" module instead of the trainer: the shipped scripts take their
entry point from NEUROPRUNE_ENTRY, so the launch plumbing (rank mapping, rendezvous, arguments, signals,
requeue) is tested here on its own; the trainer's end-to-end runs use the same scripts.

Needs root (network namespaces, daemons). Run with: pytest -m integration tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
SBATCH_DIR = REPO / "launch" / "slurm"
JOB_TIMEOUT = 240  # seconds; a 2-task gloo job takes 4-8 s here, a requeued one ~20 s

PROBE = textwrap.dedent('''
    """gloo all_reduce probe: the entry point the launcher tests run instead of neuroprune_ds.train."""
    import datetime, json, os, signal, socket, sys, time

    from neuroprune_ds.distributed import EXIT_REQUEUE, barrier_and_exit, setup_distributed_env

    added = setup_distributed_env()
    got = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: got.append("USR1"))

    import torch
    import torch.distributed as dist

    out = os.environ["PROBE_OUT"]
    mode = os.environ.get("PROBE_MODE", "allreduce")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)

    marker = os.path.join(out, "requeue.marker")   # present from the second run of a requeued job on
    first_run = not os.path.exists(marker)
    code = 0
    if mode == "signal" and first_run:
        with open(os.path.join(out, f"ready{rank}"), "w") as f:
            f.write(os.environ.get("SLURM_JOB_ID", ""))
        deadline = time.time() + 90
        while not got and time.time() < deadline:
            time.sleep(0.05)
        code = EXIT_REQUEUE if got else 3   # a real trainer checkpoints here
    elif mode == "requeue" and first_run:
        code = EXIT_REQUEUE

    run = os.environ.get("SLURM_RESTART_COUNT", "0")
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "OMP_NUM_THREADS", "SLURM_JOB_ID", "SLURM_PROCID")
    record = {"rank": rank, "world": world, "sum": value.item(), "host": socket.gethostname(),
              "argv": sys.argv[1:], "added": added, "env": {k: os.environ.get(k) for k in keys},
              "signals": got, "first_run": first_run, "code": code}
    with open(os.path.join(out, f"rank{rank}-run{run}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    if code == EXIT_REQUEUE and rank == 0:
        with open(marker, "w") as f:
            f.write("checkpointed\\n")
    print(f"probe rank {rank}/{world} on {record['host']}: sum {value.item()} exit {code}", flush=True)
    barrier_and_exit(code)
''')

ENTRY_ARGS = ["run.yaml", "ds.json", "train.max_steps=3"]
EXPECTED_ARGV = ["--config", "run.yaml", "--deepspeed", "ds.json", "train.max_steps=3"]


# ------------------------------------------------------------------------------------------ fixtures --

@pytest.fixture(scope="session")
def slurm_cluster():
    """A 2-node SLURM for the session: started here unless already running, stopped only if started here."""
    if os.geteuid() != 0:
        pytest.skip("tools/local_slurm.sh needs root (network namespaces, SLURM daemons)")
    was_running = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    t0 = time.monotonic()
    proc = subprocess.run([str(LOCAL_SLURM), "start", "--nodes", "2"], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        if not was_running:
            subprocess.run([str(LOCAL_SLURM), "stop"], timeout=120)
        pytest.fail(f"local_slurm.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(f"\nlocal SLURM up in {time.monotonic() - t0:.1f} s\n{proc.stdout}")
    conf = subprocess.run([str(LOCAL_SLURM), "env"], capture_output=True, text=True, check=True).stdout
    yield {"SLURM_CONF": conf.strip().split("=", 1)[1]}
    if not was_running:
        subprocess.run([str(LOCAL_SLURM), "stop"], check=True, timeout=120)


@pytest.fixture
def probe_env(tmp_path):
    """Environment for a job running the probe; results land in tmp_path/out."""
    (tmp_path / "probe_entry.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS") and not k.startswith(("SLURM_", "PYTEST_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
        "NEUROPRUNE_PYTHON": sys.executable,
        "NEUROPRUNE_ENTRY": "probe_entry",
        "PROBE_OUT": str(out),
        "PYTHONWARNINGS": "ignore::FutureWarning",
    })
    return env


# ------------------------------------------------------------------------------------------- helpers --

def run(cmd, env, cwd, timeout=JOB_TIMEOUT):
    """Run a command, returning (CompletedProcess, seconds); on timeout cancel our jobs and fail."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd} timed out after {timeout} s\n{exc.stdout}\n{exc.stderr}\n{logs(cwd)}")
    return proc, time.monotonic() - t0


def logs(directory: Path) -> str:
    """Every job log in directory (for failure messages)."""
    return "\n".join(f"----- {p.name}\n{p.read_text()}" for p in sorted(Path(directory).glob("*.out")))


def sbatch_wait(script, args, env, cwd, *options):
    """`sbatch --wait` SCRIPT; return (job id, log text, seconds). Fails the test if the job failed."""
    proc, secs = run(["sbatch", "--wait", "--parsable", *options, script, *args], env, cwd)
    job_id = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else "?"
    assert proc.returncode == 0, f"job {job_id} failed ({proc.returncode}):\n{proc.stderr}\n{logs(cwd)}"
    log = Path(cwd, f"neuroprune-{job_id}.out")
    return job_id, log.read_text() if log.exists() else logs(cwd), secs


def records(out: Path, run: int = 0) -> list[dict]:
    """The probe's per-rank results of one run of the job, by rank."""
    found = sorted(out.glob(f"rank*-run{run}.json"))
    return [json.loads(p.read_text()) for p in found]


def check_world(recs, hosts, local_world_size, argv=None):
    """Two ranks that all_reduced 1 + 2 over gloo, on the expected hosts, with the expected mapping."""
    assert [r["rank"] for r in recs] == [0, 1], recs
    for r in recs:
        assert r["world"] == 2 and r["sum"] == 3.0, r
        assert r["env"]["MASTER_ADDR"] == "node1", r
        assert r["env"]["LOCAL_WORLD_SIZE"] == str(local_world_size), r
        assert r["env"]["OMP_NUM_THREADS"] == "1", r
        if argv is not None:
            assert r["argv"] == argv, r
    assert [r["host"] for r in recs] == hosts


# ---------------------------------------------------------------------------------- job in tmp_path --

SHAPES = {"1node_x_2tasks": (["--nodes=1", "--ntasks-per-node=2"], ["node1", "node1"], 2),
          "2nodes_x_1task": (["--nodes=2", "--ntasks-per-node=1"], ["node1", "node2"], 1)}


@pytest.mark.parametrize("shape", SHAPES)
def test_allreduce_job(slurm_cluster, probe_env, tmp_path, shape):
    """A plain batch script: srun python -m probe -> distributed.setup_distributed_env -> gloo."""
    options, hosts, local_ws = SHAPES[shape]
    script = tmp_path / "allreduce.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=neuroprune --output=%x-%j.out --cpus-per-task=1\n"
                      "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK\n"
                      'srun "$NEUROPRUNE_PYTHON" -m probe_entry\n')
    env = {**probe_env, **slurm_cluster}
    job_id, log, secs = sbatch_wait(script, [], env, tmp_path, *options)
    print(f"{shape}: job {job_id} sbatch --wait {secs:.1f} s")
    recs = records(tmp_path / "out")
    check_world(recs, hosts, local_ws, argv=[])
    assert all(r["env"]["MASTER_PORT"] == str(15000 + int(job_id) % 17000) for r in recs)


# --------------------------------------------------------------------------------- shipped scripts --

SHIPPED = {"one_node.sbatch": (["node1", "node1"], 2), "multi_node.sbatch": (["node1", "node2"], 1)}


@pytest.mark.parametrize("script", SHIPPED)
def test_shipped_sbatch(slurm_cluster, probe_env, tmp_path, script):
    """The shipped scripts with their own #SBATCH shape, args passed through, log per job."""
    hosts, local_ws = SHIPPED[script]
    env = {**probe_env, **slurm_cluster, "RANK": "5", "MASTER_ADDR": "127.0.0.1"}  # stale, must be ignored
    job_id, log, secs = sbatch_wait(SBATCH_DIR / script, ENTRY_ARGS, env, tmp_path)
    print(f"{script}: job {job_id} sbatch --wait {secs:.1f} s")
    check_world(records(tmp_path / "out"), hosts, local_ws, argv=EXPECTED_ARGV)
    assert f"job {job_id} run 1 on" in log and "step exited 0" in log, log


@pytest.mark.parametrize("visible, local_ranks", [("0,1", ["0", "1"]), ("3", ["0", "0"])])
def test_shipped_sbatch_binds_each_task_to_a_gpu_it_sees(slurm_cluster, probe_env, tmp_path, visible, local_ranks):
    """What SLURM shows the tasks (no GPUs here, so set by hand): all of the node's GPUs (--gpus-per-node)
    -> LOCAL_RANK = SLURM_LOCALID; only the task's own GPU (--gpus-per-task=1) -> LOCAL_RANK 0, its device 0."""
    env = {**probe_env, **slurm_cluster, "CUDA_VISIBLE_DEVICES": visible}
    sbatch_wait(SBATCH_DIR / "one_node.sbatch", ENTRY_ARGS, env, tmp_path)
    recs = records(tmp_path / "out")
    check_world(recs, ["node1", "node1"], 2, argv=EXPECTED_ARGV)
    assert [r["env"]["LOCAL_RANK"] for r in recs] == local_ranks


def test_shipped_sbatch_config_from_env(slurm_cluster, probe_env, tmp_path):
    """CONFIG and DS_JSON may come from the environment instead of arguments."""
    env = {**probe_env, **slurm_cluster, "NEUROPRUNE_CONFIG": "a.yaml", "NEUROPRUNE_DS_CONFIG": "z3.json"}
    sbatch_wait(SBATCH_DIR / "one_node.sbatch", ["x=1"], env, tmp_path)
    recs = records(tmp_path / "out")
    assert recs and all(r["argv"] == ["--config", "a.yaml", "--deepspeed", "z3.json", "x=1"] for r in recs)


def test_shipped_sbatch_requeue_on_85(slurm_cluster, probe_env, tmp_path):
    """A step exiting 85 is requeued once; the second run (marker file present) exits 0; one log, both runs."""
    env = {**probe_env, **slurm_cluster, "PROBE_MODE": "requeue"}
    job_id, log, secs = sbatch_wait(SBATCH_DIR / "one_node.sbatch", ENTRY_ARGS, env, tmp_path)
    print(f"requeue: job {job_id} two runs in {secs:.1f} s")
    assert f"job {job_id} run 1 on" in log and f"job {job_id} run 2 on" in log, log
    assert f"requeueing job {job_id}" in log and "step exited 0" in log, log
    first, second = records(tmp_path / "out", 0), records(tmp_path / "out", 1)
    assert [r["code"] for r in first] == [85, 85] and [r["code"] for r in second] == [0, 0]
    check_world(second, ["node1", "node1"], 2, argv=EXPECTED_ARGV)


def test_shipped_sbatch_preemption_signal(slurm_cluster, probe_env, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends) reaches every task through srun; the
    tasks exit 85 and the job is requeued and finishes."""
    env = {**probe_env, **slurm_cluster, "PROBE_MODE": "signal"}
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.Popen(["sbatch", "--wait", "--parsable", str(SBATCH_DIR / "multi_node.sbatch"),
                             *ENTRY_ARGS], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not all((out / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, f"job ended before the signal:\n{proc.communicate()}\n{logs(tmp_path)}"
            assert time.monotonic() < deadline, f"probe never got ready\n{logs(tmp_path)}"
            time.sleep(0.1)
        job_id = (out / "ready0").read_text()
        # --batch: signal only the batch shell, exactly as --signal=B:USR1@... does at the time limit.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True)
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    secs = time.monotonic() - t0
    print(f"preemption signal: job {job_id} two runs in {secs:.1f} s")
    log = Path(tmp_path, f"neuroprune-{job_id}.out").read_text()
    assert proc.returncode == 0, f"{stdout}\n{stderr}\n{log}"
    assert "batch shell got SIGUSR1" in log and f"requeueing job {job_id}" in log, log
    first, second = records(out, 0), records(out, 1)
    assert [r["signals"] for r in first] == [["USR1"], ["USR1"]], first
    assert [r["code"] for r in first] == [85, 85] and [r["code"] for r in second] == [0, 0]
    check_world(second, ["node1", "node2"], 1, argv=EXPECTED_ARGV)


def test_shipped_sbatch_bodies_identical():
    """one_node and multi_node differ only in their #SBATCH header."""
    marker = "# ---- everything below is identical"
    bodies = [p.read_text().split(marker, 1) for p in sorted(SBATCH_DIR.glob("*.sbatch"))]
    assert len(bodies) == 2 and all(len(b) == 2 for b in bodies)
    assert bodies[0][1] == bodies[1][1]


# ------------------------------------------------------------------------- launchers without SLURM --

def test_local_sh_deepspeed_launcher(probe_env, tmp_path):
    """launch/local.sh: the deepspeed launcher with 2 ranks on this machine."""
    proc, secs = run([REPO / "launch" / "local.sh", *ENTRY_ARGS], probe_env, tmp_path)
    print(f"local.sh: {secs:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path / "out")
    assert [r["rank"] for r in recs] == [0, 1] and all(r["sum"] == 3.0 for r in recs), recs
    assert all(r["argv"] == EXPECTED_ARGV for r in recs)
    # The launcher set the rank variables; setup_distributed_env must not have touched them.
    assert all(not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} & set(r["added"]) for r in recs)
    assert all(r["env"]["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2)) for r in recs)


def test_torchrun_sh(probe_env, tmp_path):
    """launch/torchrun.sh: torchrun --standalone with 2 ranks."""
    proc, secs = run([REPO / "launch" / "torchrun.sh", *ENTRY_ARGS], probe_env, tmp_path)
    print(f"torchrun.sh: {secs:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path / "out")
    assert [r["rank"] for r in recs] == [0, 1] and all(r["sum"] == 3.0 for r in recs), recs
    assert all(r["argv"] == EXPECTED_ARGV and not r["added"].keys() & {"RANK", "MASTER_PORT"} for r in recs)


def test_hostfile_sh_two_nodes_no_ssh(slurm_cluster, probe_env, tmp_path):
    """launch/hostfile.sh on both SLURM nodes in --no_ssh mode (one launcher per node, node rank given)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one rank each\nnode1 slots=1\nnode2 slots=1\n")
    env = {**probe_env, **slurm_cluster, "MASTER_PORT": "29611"}
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
           f'NEUROPRUNE_NODE_RANK=$SLURM_NODEID exec {REPO}/launch/hostfile.sh "$@"', "hostfile.sh",
           hostfile, *ENTRY_ARGS]
    proc, secs = run(cmd, env, tmp_path)
    print(f"hostfile.sh on 2 nodes: {secs:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path / "out")
    assert [r["host"] for r in recs] == ["node1", "node2"] and all(r["sum"] == 3.0 for r in recs), recs
    assert all(r["argv"] == EXPECTED_ARGV for r in recs)
    assert all(r["env"]["MASTER_ADDR"] == "node1" and r["env"]["MASTER_PORT"] == "29611" for r in recs)


@pytest.mark.parametrize("script", ["local.sh", "torchrun.sh", "hostfile.sh", "slurm/one_node.sbatch",
                                    "slurm/multi_node.sbatch"])
def test_launch_scripts_usage(script):
    """Without arguments every launcher prints its usage and exits 2."""
    env = {k: v for k, v in os.environ.items() if k != "NEUROPRUNE_CONFIG"}
    proc = subprocess.run(["bash", REPO / "launch" / script], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 2 and "Usage:" in proc.stderr, proc.stderr
