"""Checkpointing and resume of the real trainer, 2 ranks on CPU (gloo): issue 5.

Each test is one or two ``torchrun`` launches of tests/checkpoint_worker.py, which runs several trainings of
``neuroprune_ds.train`` in one process group and injects faults (real signals, SIGKILL, NaN gradients). The
model is a tiny OPT WITH dropout (0.1), so an exact resume also needs every rank's RNG state; NeuroPrune is on
with head pruning every 2 steps, so masks must survive; the LR schedule decays linearly, so it must too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "checkpoint_worker.py"
TOTAL = 6  # optimizer steps of every run; interrupted ones stop at STOP and resume
STOP = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
               PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny OPT with dropout, a word-level tokenizer, and synthetic training text."""
    from synthetic_text import WORDS, save_word_tokenizer, sentence

    root = tmp_path_factory.mktemp("assets")
    save_word_tokenizer(root / "model")
    config = TINY_CONFIGS["opt"]()
    config.vocab_size = len(WORDS) + 2
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 1, 1, 1
    transformers.set_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    (root / "train.txt").write_text("".join(sentence(i) + "\n" for i in range(300)))
    return root


def write_run(tmp_path: Path, assets: Path, name: str, **sections) -> Path:
    run = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / name),
        "model": {"name_or_path": str(assets / "model")},
        "data": {"train": str(assets / "train.txt"), "max_length": 16, "max_eval_examples": 8},
        "schedule": {"max_steps": TOTAL, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "lr": 3e-3,
                     "warmup_steps": 1, "log_every_steps": 1, "seed": 5},
        "neuroprune": {"mlp_lambda": 1e-3, "attn_lambda": 1e-3, "theta": 0.2, "prune_every_steps": 2},
        "checkpoint": {"every_steps": 0},
    }
    for section, values in sections.items():
        run[section] = {**run.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def ds_json(tmp_path: Path, stage: int, **extra) -> str:
    ds = json.loads((REPO / "ds_configs" / f"zero{stage}_fp32.json").read_text())
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    ds.update(extra)
    path = tmp_path / f"ds{stage}{'_u' if extra else ''}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def launch(tmp_path: Path, plan: list[dict], *, ranks: int = 2, label: str = "plan", timeout: int = 420):
    """Run the plan in one launch; returns (exit status, output, {(run, rank): result})."""
    plan_path = tmp_path / f"{label}.json"
    plan_path.write_text(json.dumps(plan))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(_free_port()), str(WORKER), str(plan_path)]
    done = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    results = {}
    for run in plan:
        for rank in range(ranks):
            path = tmp_path / f"result-{run['name']}-rank{rank}.json"
            if path.exists():
                results[run["name"], rank] = json.loads(path.read_text())
    return done.returncode, done.stdout + done.stderr, results


def records(output_dir: str | Path, kind: str) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def tensorboard_losses(output_dir) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(output_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")]


def per_step(output_dir, key="train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r.get(key)) for r in records(output_dir, "train")]


def run_entry(name, config, deepspeed, *overrides, **faults) -> dict:
    return {"name": name, "config": str(config), "deepspeed": deepspeed, "overrides": list(overrides),
            "faults": faults}


# --------------------------------------------------------------------------------------- exact resume


def test_exact_resume_at_every_zero_stage(tmp_path, assets):
    """Per-step losses, lr and grad norms of TOTAL steps equal those of STOP + signal + resume, bit for bit."""
    plan = []
    for stage in range(4):
        ds = ds_json(tmp_path, stage)
        plan += [
            run_entry(f"ref{stage}", write_run(tmp_path, assets, f"ref{stage}"), ds),
            run_entry(f"cut{stage}", write_run(tmp_path, assets, f"cut{stage}"), ds,
                      signal_at={"step": STOP, "rank": 1, "signal": "SIGUSR1"}),
            run_entry(f"resume{stage}", tmp_path / f"cut{stage}.yaml", ds),
        ]
    code, output, results = launch(tmp_path, plan)
    assert code == 0, output[-6000:]
    for stage in range(4):
        ref, cut = tmp_path / f"ref{stage}", tmp_path / f"cut{stage}"
        assert [results[f"cut{stage}", r]["code"] for r in (0, 1)] == [85, 85], output[-3000:]
        assert results[f"cut{stage}", 0]["saved"] == [[STOP, False]]
        assert [results[f"resume{stage}", r]["resumed_step"] for r in (0, 1)] == [STOP, STOP]
        assert [results[f"resume{stage}", r]["code"] for r in (0, 1)] == [0, 0]
        for key in ("train/loss", "train/lr", "train/grad_norm", "sparsity/weight"):
            assert per_step(cut, key) == per_step(ref, key), (stage, key)
        assert [r["step"] for r in records(cut, "train")] == list(range(1, TOTAL + 1))
        assert records(cut, "eval")[-1]["eval/loss"] == records(ref, "eval")[-1]["eval/loss"]
        assert (cut / "checkpoints" / "latest").read_text().strip() == f"step_{TOTAL}"
        summary = json.loads((cut / "neuroprune_summary.json").read_text())
        assert summary == json.loads((ref / "neuroprune_summary.json").read_text())


# ------------------------------------------------------------- partitioned loading, data at scale


def test_zero3_loads_partitioned_trains_like_zero0_and_each_node_tokenizes_once(tmp_path, assets):
    """Under ZeRO-3 every parameter is an empty placeholder with a ds_id right after from_pretrained, and the
    per-step losses, lr and sparsity (weight decay on, so 2-D shapes must be read from ds_shape) equal ZeRO-0's
    whole-model run. Only local rank 0 tokenizes (rank 1 reads its cache), a later run reuses the cache, and
    a datasets.save_to_disk directory of the same token ids trains exactly like the text."""
    import datasets

    text = tmp_path / "text.txt"  # a path of its own: no earlier test has tokenized it
    text.write_text((assets / "train.txt").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets / "model")
    ids = tokenizer(text.read_text().splitlines(), add_special_tokens=True)["input_ids"]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(tmp_path / "tokens")
    sections = {"schedule": {"weight_decay": 0.1}}
    plan = [
        run_entry("z3", write_run(tmp_path, assets, "z3", data={"train": str(text)}, **sections), ds_json(tmp_path, 3)),
        run_entry("z0", write_run(tmp_path, assets, "z0", data={"train": str(text)}, **sections), ds_json(tmp_path, 0)),
        run_entry("tokens", write_run(tmp_path, assets, "tokens", data={"train": str(tmp_path / "tokens")}, **sections),
                  ds_json(tmp_path, 3)),
    ]
    code, output, results = launch(tmp_path, plan)
    assert code == 0, output[-6000:]
    z3, z0 = results["z3", 0]["loaded"], results["z0", 0]["loaded"]
    assert z3["partitioned"] == z3["params"] > 0 and z0["partitioned"] == 0, (z3, z0)
    assert [results[run, 1]["loaded"] for run in ("z3", "tokens")] == [z3, z3]
    for key, tolerance in (("train/loss", 2e-5), ("train/lr", 0.0), ("sparsity/weight", 1e-3)):
        reference = per_step(tmp_path / "z0", key)
        assert [s for s, _ in per_step(tmp_path / "z3", key)] == [s for s, _ in reference] == list(range(1, TOTAL + 1))
        assert [v for _, v in per_step(tmp_path / "z3", key)] == pytest.approx([v for _, v in reference], abs=tolerance)
    for key in ("train/loss", "train/lr", "train/grad_norm", "sparsity/weight"):
        assert per_step(tmp_path / "tokens", key) == per_step(tmp_path / "z3", key), key
    computed = {(run, rank): results[run, rank]["map_computed"] for run in ("z3", "z0", "tokens") for rank in (0, 1)}
    assert computed[("z3", 0)] > 0 and computed[("tokens", 0)] > 0, computed
    assert [computed[("z3", 1)], computed[("z0", 0)], computed[("z0", 1)], computed[("tokens", 1)]] == [0] * 4, computed


# ------------------------------------------------------------------ faults: SIGKILL, eval signal, NaN


def _tags(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "checkpoints").iterdir() if p.is_dir())


def test_sigkill_in_save_then_resume_eval_signal_nonfinite_and_keep_last(tmp_path, assets):
    ds = ds_json(tmp_path, 2)
    base = {"checkpoint": {"every_steps": 2, "keep_last": 2}, "schedule": {"eval_every_steps": 3}}
    killed = write_run(tmp_path, assets, "killed", **base)
    # Launch 1: rank 1 is SIGKILLed inside the save of step 4, after rank 0 began writing it.
    code, output, _ = launch(tmp_path, [run_entry("kill", killed, ds, kill_in_save={"step": 4, "rank": 1})],
                             label="kill")
    assert code != 0, output[-3000:]
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_2"
    assert (ckpt / "step_2" / "complete").is_file()
    assert not (ckpt / "step_4" / "complete").exists()

    nan = {"checkpoint": {"every_steps": 1, "keep_last": 5}, "schedule": {"max_steps": 4}}
    plan = [
        run_entry("ref", write_run(tmp_path, assets, "ref", **base), ds),
        run_entry("after_kill", killed, ds),
        run_entry("eval_cut", write_run(tmp_path, assets, "evalcut", **base), ds,
                  signal_at={"step": 3, "rank": 1, "signal": "SIGTERM", "eval": True}),
        run_entry("eval_resume", tmp_path / "evalcut.yaml", ds),
        run_entry("prune_cut", write_run(tmp_path, assets, "prunecut"), ds,
                  signal_in_prune={"step": 2, "rank": 1, "signal": "SIGUSR1"}),
        run_entry("prune_resume", tmp_path / "prunecut.yaml", ds),
        run_entry("nan_stop", write_run(tmp_path, assets, "nanstop", **nan), ds, nan_grad_at={"step": 3, "rank": 1}),
        run_entry("nan_skip", write_run(tmp_path, assets, "nanskip", **nan), ds, "checkpoint.on_nonfinite=skip",
                  nan_grad_at={"step": 3, "rank": 1}),
    ]
    code, output, results = launch(tmp_path, plan, label="faults")
    assert code == 0, output[-6000:]
    ref = tmp_path / "ref"

    # SIGKILL: resumed from the last complete tag; the broken one was replaced; the run equals the reference.
    assert [results["after_kill", r]["resumed_step"] for r in (0, 1)] == [2, 2]
    assert per_step(tmp_path / "killed") == per_step(ref)
    assert tensorboard_losses(tmp_path / "killed") == tensorboard_losses(ref)  # steps 3-4 of the kill hidden
    assert _tags(tmp_path / "killed") == _tags(ref) == ["step_4", "step_6"]  # keep_last = 2
    assert all((ref / "checkpoints" / t / "complete").is_file() for t in _tags(ref))

    # SIGTERM during the evaluation at step 3: checkpoint of step 3 with the evaluation pending, exit 85; the
    # resumed run evaluates step 3 first, then continues exactly.
    assert [results["eval_cut", r]["code"] for r in (0, 1)] == [85, 85]
    assert results["eval_cut", 0]["saved"] == [[2, False], [3, True]]
    assert results["eval_resume", 0]["pending_eval"] is True
    evalcut = tmp_path / "evalcut"
    assert [(r["step"], r["eval/loss"]) for r in records(evalcut, "eval")] == \
        [(r["step"], r["eval/loss"]) for r in records(ref, "eval")]
    assert per_step(evalcut) == per_step(ref)

    # A signal while head pruning is at its second block (step 2): the pass stops there on every rank, step 2 is
    # checkpointed, and the resumed run prunes all blocks at its next pass (step 4) and finishes.
    for rank in (0, 1):
        assert results["prune_cut", rank]["code"] == 85 and results["prune_cut", rank]["prune_passes"] == [[2, 2]]
        assert results["prune_resume", rank]["resumed_step"] == 2 and results["prune_resume", rank]["code"] == 0
    blocks = len(results["prune_resume", 0]["alive_after_resume"])
    assert results["prune_resume", 0]["prune_passes"] == [[4, blocks], [6, blocks]]  # asked before every block
    assert results["prune_cut", 0]["saved"] == [[2, False]]
    assert [r["step"] for r in records(tmp_path / "prunecut", "train")] == list(range(1, TOTAL + 1))

    # Non-finite gradients on rank 1 only at step 3: both ranks stop at step 3, nothing of it is saved ...
    assert [results["nan_stop", r]["code"] for r in (0, 1)] == [1, 1]
    assert "non-finite loss or gradients at optimizer step 3 (rank 1: non-finite gradients)" in output
    assert _tags(tmp_path / "nanstop") == ["step_1", "step_2"]
    # ... or, with on_nonfinite=skip, step 3 leaves weights and optimizer state untouched on every rank.
    assert [results["nan_skip", r]["code"] for r in (0, 1)] == [0, 0]
    weights = {tag: _fp32_weights(tmp_path / "nanskip" / "checkpoints", tag) for tag in ("step_2", "step_3", "step_4")}
    assert all(torch_equal(weights["step_2"][k], weights["step_3"][k]) for k in weights["step_2"])
    assert not all(torch_equal(weights["step_3"][k], weights["step_4"][k]) for k in weights["step_3"])


def _fp32_weights(ckpt_dir: Path, tag: str) -> dict:
    from neuroprune_ds.export.checkpoint import iter_fp32_weights, read_checkpoint

    info = read_checkpoint(str(ckpt_dir), tag)
    names = ["model.decoder.layers.0.fc1.weight", "model.decoder.layers.1.self_attn.q_proj.weight",
             "model.decoder.embed_tokens.weight"]
    return dict(iter_fp32_weights(info, names))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# ------------------------------------------------------------------------------- world-size changes


def _convert(command: str) -> None:
    done = subprocess.run([sys.executable, *command.split()[1:]], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.mark.parametrize(("stage", "saved_on", "resumed_on"), [(2, 2, 1), (3, 1, 2)])
def test_other_world_size_needs_the_universal_checkpoint_and_keeps_masks(tmp_path, assets, stage, saved_on,
                                                                          resumed_on):
    from neuroprune_ds.checkpoint import universal_command
    from neuroprune_ds.export.checkpoint import read_checkpoint

    ds = ds_json(tmp_path, stage)
    config = write_run(tmp_path, assets, "run")
    code, output, results = launch(tmp_path, [run_entry("save", config, ds, signal_at={
        "step": STOP, "rank": 0, "signal": "SIGUSR1"})], ranks=saved_on, label="save")
    assert code == 0 and results["save", 0]["code"] == 85, output[-3000:]
    tag_dir = tmp_path / "run" / "checkpoints" / f"step_{STOP}"
    saved_alive = {k: v.tolist() for k, v in read_checkpoint(str(tag_dir.parent), tag_dir.name).alive.items()}
    assert any(not all(mask) for mask in saved_alive.values())  # some heads were pruned before the save

    plain = run_entry("plain", config, ds)
    code, output, results = launch(tmp_path, [plain], ranks=resumed_on, label="plain")
    command = universal_command(tag_dir, stage)
    assert results["plain", 0]["code"] == 2 and command in output, output[-3000:]
    assert ("--inject_missing_state" in command) == (stage == 2)

    _convert(command)
    universal = run_entry("universal", config, ds_json(tmp_path, stage, checkpoint={"load_universal": True}),
                          f"checkpoint.resume={tag_dir}_universal")
    code, output, results = launch(tmp_path, [universal], ranks=resumed_on, label="universal")
    assert code == 0, output[-6000:]
    for rank in range(resumed_on):
        result = results["universal", rank]
        assert result["code"] == 0 and result["resumed_step"] == STOP
        assert result["global_steps_after_resume"] == STOP and result["alive_after_resume"] == saved_alive
    steps = per_step(tmp_path / "run")
    assert [s for s, _ in steps] == list(range(1, TOTAL + 1)) and all(loss < 10 for _, loss in steps)


# ------------------------------------------------------------------------------------ SLURM requeue


@pytest.mark.integration
def test_requeued_sbatch_job_continues_where_it_stopped(tmp_path, assets):
    """The shipped one_node.sbatch on a real (local) SLURM: SIGUSR1 to the batch shell mid-training, as
    ``--signal=B:USR1@120`` sends it; the trainer checkpoints and exits 85, the script requeues, the second
    run resumes, and the per-step losses equal an uninterrupted torchrun run of the same config."""
    import time

    from test_slurm import LOCAL_SLURM, SBATCH_DIR, logs

    if os.geteuid() != 0:
        pytest.skip("tools/local_slurm.sh needs root")
    was_running = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    started = subprocess.run([str(LOCAL_SLURM), "start", "--nodes", "2"], capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        conf = subprocess.run([str(LOCAL_SLURM), "env"], capture_output=True, text=True, check=True).stdout
        total = 150
        sections = {"schedule": {"max_steps": total, "log_every_steps": 1}}
        config = write_run(tmp_path, assets, "job", **sections)
        ds = ds_json(tmp_path, 2)
        env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "PYTEST_"))}
        env.update(SLURM_CONF=conf.strip().split("=", 1)[1], NEUROPRUNE_PYTHON=sys.executable,
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
        t0 = time.monotonic()
        job = subprocess.Popen(["sbatch", "--wait", "--parsable", str(SBATCH_DIR / "one_node.sbatch"), str(config),
                                ds], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = tmp_path / "job" / "metrics.jsonl"
        while not (metrics.exists() and '"step": 5,' in metrics.read_text()):
            assert job.poll() is None, f"job ended before the signal:\n{job.communicate()}\n{logs(tmp_path)}"
            assert time.monotonic() - t0 < 240, logs(tmp_path)
            time.sleep(0.2)
        job_id = next(tmp_path.glob("neuroprune-*.out")).stem.split("-")[1]
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True)
        stdout, stderr = job.communicate(timeout=300)
        print(f"requeued training job: {time.monotonic() - t0:.1f} s")
        log = logs(tmp_path)
        assert job.returncode == 0, f"{stdout}\n{stderr}\n{log}"
        assert f"requeueing job {job_id}" in log and f"job {job_id} run 2 on" in log, log
        resumed = int(log.split("resumed from ")[1].split(" at step ")[1].split()[0])
        assert 5 <= resumed < total, log

        reference = run_entry("ref", write_run(tmp_path, assets, "ref", **sections), ds)
        code, output, _ = launch(tmp_path, [reference], label="ref")
        assert code == 0, output[-3000:]
        assert per_step(tmp_path / "job") == per_step(tmp_path / "ref")
        assert [r["step"] for r in records(tmp_path / "job", "train")] == list(range(1, total + 1))
    finally:
        if not was_running:
            subprocess.run([str(LOCAL_SLURM), "stop"], timeout=120)


# ----------------------------------------------------------------------- metrics.jsonl at a resume (one process)


def test_resume_cuts_metrics_jsonl_back_to_the_checkpoint_and_a_save_keeps_the_records_up_to_it(tmp_path):
    """What an interrupted run logged after its last checkpoint is dropped (set-up records stay), in the file
    the new run's logger already appends to; a checkpoint keeps the records up to its step."""
    from neuroprune_ds.logging_utils import METRICS_FILE, MetricsLogger

    crashed = MetricsLogger(tmp_path, enabled=True)
    crashed.log(0, {"setup/load_s": 1.0}, kind="setup")
    for step in range(1, 6):
        crashed.log(step, {"train/loss": float(step)}, kind="train")
    resumed = MetricsLogger(tmp_path, enabled=True)  # SIGKILL: never closed; step 2 is the last checkpoint
    resumed.log(0, {"setup/load_s": 2.0}, kind="setup")
    assert [(r["kind"], r["step"]) for r in resumed.records_through(3)] == \
        [("setup", 0), ("train", 1), ("train", 2), ("train", 3), ("setup", 0)]
    resumed.forget_after(2)
    resumed.log(3, {"train/loss": 30.0}, kind="train")
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"], r.get("train/loss")) for r in records] == \
        [("setup", 0, None), ("train", 1, 1.0), ("train", 2, 2.0), ("setup", 0, None), ("train", 3, 30.0)]
    assert MetricsLogger(tmp_path / "rank1", enabled=False).records_through(3) == []


# ------------------------------------------------------------------------------ skip at ZeRO-0 (one rank)


def test_skipped_step_at_zero0_leaves_weights_moments_and_lr_schedule_where_they_were():
    """At ZeRO 1-3 DeepSpeed's overflow path keeps the LR schedule still over a skipped step; ZeRO-0 must too."""
    import deepspeed
    import torch

    from neuroprune_ds.finite_guard import FiniteGuard
    from tiny_models import batch, equivalence_model, init_single_rank

    init_single_rank()
    model = equivalence_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)  # warm-up: moves every step
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 0}})
    guard = FiniteGuard(engine, "skip", rank=0)

    def step(index: int, poison: bool) -> float:
        loss = engine(**batch("llama", index, 0)).loss
        engine.backward(loss)
        guard.observe(loss * float("nan") if poison else loss)
        engine.step()
        guard.after_step()
        return optimizer.param_groups[0]["lr"]

    step(0, poison=False)
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    moments = {n: optimizer.state[p]["exp_avg"].clone() for n, p in engine.module.named_parameters()}
    lr_before, epoch_before = optimizer.param_groups[0]["lr"], scheduler.last_epoch
    assert step(1, poison=True) == lr_before and scheduler.last_epoch == epoch_before
    assert guard.skipped_steps == 1
    assert all(torch.equal(p, weights[n]) for n, p in engine.module.named_parameters())
    assert all(torch.equal(optimizer.state[p]["exp_avg"], moments[n]) for n, p in engine.module.named_parameters())
    assert step(2, poison=False) == pytest.approx(0.3e-3)  # the warm-up resumes where it stopped: step 2 of it
    engine.destroy()
