"""Launcher -> torch.distributed environment mapping (pure logic on env dicts) and the launch scripts' GPU check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuroprune_ds import distributed as D

# What srun exports to task 1 of `sbatch -N2 --ntasks-per-node=1` (recorded on tools/local_slurm.sh).
SRUN_TASK1 = {
    "SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
    "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NODELIST": "node[1-2]",
    "SLURM_CPUS_ON_NODE": "1",
}


def fixed_port():
    return 31337


# ------------------------------------------------------------------------------------------ nodelist --

@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("a,b", ["a", "b"]),
    ("n[01-03,7]", ["n01", "n02", "n03", "n7"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("gpu[3-4],cpu1", ["gpu3", "gpu4", "cpu1"]),
    ("login,n[1-2],x[5]", ["login", "n1", "n2", "x5"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("node-a.b[1-2].local", ["node-a.b1.local", "node-a.b2.local"]),
    (" node[3,1] ", ["node3", "node1"]),
])
def test_expand_nodelist(text, hosts):
    assert D.expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-2", "node1-2]", "n[a-b]", "n[3-1]", "a,,b", "n[1-]", "n[[1]]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        D.expand_nodelist(bad)


@pytest.mark.parametrize("spec, counts", [
    ("2", [2]), ("1(x2)", [1, 1]), ("2(x3),1", [2, 2, 2, 1]), ("4,2(x2)", [4, 2, 2]),
])
def test_expand_tasks_per_node(spec, counts):
    assert D.expand_tasks_per_node(spec) == counts


def test_expand_tasks_per_node_rejects():
    with pytest.raises(ValueError):
        D.expand_tasks_per_node("2(3)")


# ------------------------------------------------------------------------------------------- launchers --

def test_srun_task_maps_everything():
    env = D.env_from_launcher(SRUN_TASK1, cpu_count=2, port_picker=fixed_port)
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "node1", "MASTER_PORT": str(15000 + 1), "OMP_NUM_THREADS": "1"}


def test_srun_one_node_two_tasks_splits_cpus():
    environ = {**SRUN_TASK1, "SLURM_NODEID": "0", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2",
               "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "8",
               "SLURM_JOB_NODELIST": "node1", "SLURM_STEP_NODELIST": "node1"}
    env = D.env_from_launcher(environ, cpu_count=16)
    assert env["LOCAL_RANK"] == "1" and env["LOCAL_WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "node1"
    assert env["OMP_NUM_THREADS"] == "4"  # 8 allocated CPUs / 2 tasks, not 16 visible / 2


def test_local_world_size_follows_this_nodes_count():
    environ = {**SRUN_TASK1, "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
               "SLURM_NTASKS_PER_NODE": "9"}
    assert D.env_from_launcher(environ, cpu_count=4)["LOCAL_WORLD_SIZE"] == "1"


def test_local_world_size_from_ntasks_per_node_only():
    environ = {k: v for k, v in SRUN_TASK1.items() if "TASKS_PER_NODE" not in k or k == "SLURM_NTASKS_PER_NODE"}
    environ["SLURM_NTASKS_PER_NODE"] = "3"
    assert D.env_from_launcher(environ, cpu_count=4)["LOCAL_WORLD_SIZE"] == "3"


def test_step_nodelist_wins_over_job_nodelist():
    # `srun -N1 -w node2` inside a 2-node job: the step's first node is the master, not the job's.
    environ = {**SRUN_TASK1, "SLURM_STEP_NODELIST": "node2", "SLURM_PROCID": "0"}
    assert D.env_from_launcher(environ, cpu_count=1)["MASTER_ADDR"] == "node2"


def test_nodelist_fallbacks():
    environ = {k: v for k, v in SRUN_TASK1.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")}
    environ["SLURM_NODELIST"] = "c[07-08]"
    assert D.env_from_launcher(environ, cpu_count=1)["MASTER_ADDR"] == "c07"


def test_cpus_per_task_sets_omp():
    env = D.env_from_launcher({**SRUN_TASK1, "SLURM_CPUS_PER_TASK": "6"}, cpu_count=2)
    assert env["OMP_NUM_THREADS"] == "6"


def test_user_settings_are_kept():
    environ = {**SRUN_TASK1, "MASTER_PORT": "29999", "MASTER_ADDR": "10.0.0.1", "OMP_NUM_THREADS": "3"}
    env = D.env_from_launcher(environ, cpu_count=2)
    assert "MASTER_PORT" not in env and "MASTER_ADDR" not in env and "OMP_NUM_THREADS" not in env
    assert env["RANK"] == "1"


def test_master_port_is_stable_and_below_ephemeral_range():
    assert D.slurm_master_port("123") == D.slurm_master_port(123) == 15123
    ports = {D.slurm_master_port(j) for j in range(0, 200000, 7)}
    assert min(ports) >= 15000 and max(ports) < 32768


@pytest.mark.parametrize("launcher_env, kind", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1"}, "torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CROSS_RANK": "0", "CROSS_SIZE": "1",
      "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "deepspeed"),
])
def test_launchers_win_over_slurm(launcher_env, kind):
    # e.g. `srun deepspeed ...` or torchrun inside an allocation: the launcher's values are the truth.
    environ = {**SRUN_TASK1, **launcher_env}
    assert D.detect_launcher(environ) == kind
    env = D.env_from_launcher(environ, cpu_count=2)
    assert not set(env) & set(launcher_env)
    assert set(env) <= {"LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"}


def test_deepspeed_launcher_gets_local_world_size_and_omp():
    environ = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert D.env_from_launcher(environ, cpu_count=2) == {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}


def test_no_launcher_is_a_world_of_one():
    env = D.env_from_launcher({}, cpu_count=2, port_picker=fixed_port)
    assert env == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "31337", "OMP_NUM_THREADS": "2"}


def test_batch_script_without_srun_is_not_a_rank():
    environ = {k: v for k, v in SRUN_TASK1.items() if not k.startswith("SLURM_STEP")}
    environ["SLURM_PROCID"] = "0"
    assert D.detect_launcher(environ) == "slurm-batch"
    env = D.env_from_launcher(environ, cpu_count=2, port_picker=fixed_port)
    assert env["WORLD_SIZE"] == "1" and env["RANK"] == "0"


def test_setup_distributed_env_updates_mapping_in_place():
    environ = dict(SRUN_TASK1)
    added = D.setup_distributed_env(environ)
    assert environ["RANK"] == "1" and environ["MASTER_ADDR"] == "node1"
    assert set(added) <= set(environ)
    assert D.setup_distributed_env(environ) == {}  # idempotent


def test_barrier_and_exit_flushes_and_uses_status():
    code = ("import sys; from neuroprune_ds.distributed import barrier_and_exit\n"
            "sys.stdout.write('unflushed'); barrier_and_exit(7)\n"
            "print('not reached')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 7
    assert proc.stdout == "unflushed"


# ------------------------------------------------------------------------------------------ GPU binding --

NODE_OF_8 = {**SRUN_TASK1, "SLURM_NODEID": "0", "SLURM_LOCALID": "5", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
             "SLURM_STEP_TASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8"}


@pytest.mark.parametrize("visible, local_rank", [
    ("0,1,2,3,4,5,6,7", "5"),  # --gpus-per-node=8: every task sees the node's GPUs and takes its own index
    ("5", "0"),                # --gpus-per-task=1 without device cgroups: its GPU, renumbered as device 0
    ("0", "0"),                # --gpus-per-task=1 with ConstrainDevices=yes
    (None, "5"),               # no GPUs (CPU nodes): the local task index
])
def test_local_rank_is_the_tasks_device_among_those_it_sees(visible, local_rank):
    environ = dict(NODE_OF_8) if visible is None else {**NODE_OF_8, "CUDA_VISIBLE_DEVICES": visible}
    env = D.env_from_launcher(environ, cpu_count=8)
    assert env["LOCAL_RANK"] == local_rank and env["LOCAL_WORLD_SIZE"] == "8"
    visible_count = len(visible.split(",")) if visible else 8
    assert int(env["LOCAL_RANK"]) < visible_count  # a valid device ordinal: cuda:LOCAL_RANK exists


@pytest.mark.parametrize("visible, ranks, ok", [("", 8, True), ("0,1,2,3,4,5,6,7", 8, True), ("0,1", 8, False),
                                                ("4", 1, True)])
def test_local_launchers_refuse_fewer_visible_gpus_than_ranks(visible, ranks, ok):
    """launch/_common.sh (local.sh, torchrun.sh, hostfile.sh): rank r binds cuda:r of the visible GPUs."""
    common = Path(__file__).resolve().parents[1] / "launch" / "_common.sh"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    done = subprocess.run(["bash", "-c", f'source "{common}"; check_visible_gpus {ranks}'], env=env,
                          capture_output=True, text=True)
    assert (done.returncode == 0) == ok, done.stderr
    if not ok:
        assert f"{ranks} ranks per node but CUDA_VISIBLE_DEVICES={visible} shows 2 GPU(s)" in done.stderr
