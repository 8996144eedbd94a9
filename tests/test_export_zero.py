"""Checkpoints of real 2-rank DeepSpeed runs with NeuroPrune, converted to both formats and reloaded.

One torchrun launch (tests/dist_export_worker.py) trains a tiny model of every family at ZeRO-3 (plus LLaMA at
ZeRO 0-2 and OPT at ZeRO-3 bf16) with head pruning, kills a few FFN units through the pruner's ZeRO access
layer, and saves each per the checkpoint contract with the masked model's logits beside it. Each checkpoint
goes through ``neuroprune convert`` in both formats (the converter verifies itself), then one fresh process
where neuroprune_ds cannot be imported loads every export: logits must match the masked model's to 1e-4
and the compact parameter count the one computed by hand from the masks.
"""

import contextlib
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import dist_export_worker as W
from export_helpers import AUTO_CLASS, expected_parameters, reload_in_fresh_process
from neuroprune_ds import cli
from neuroprune_ds.arch import resolve_architecture
from tiny_models import tiny_model

pytestmark = pytest.mark.dist
SCENARIOS = [f"{family}:3:fp32" for family in W.TASKS] + ["llama:0:fp32", "llama:1:fp32", "llama:2:fp32",
                                                           "opt:3:bf16"]
FORMATS = ("dense", "compact")
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def family_of(scenario: str) -> str:
    return scenario.split(":")[0]


def convert(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["convert", *args])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), os.path.join(os.path.dirname(__file__), "dist_export_worker.py"),
           str(root), *SCENARIOS]
    proc = subprocess.run(cmd, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    done, jobs = {}, []
    for scenario in SCENARIOS:
        ckpt = W.scenario_dir(str(checkpoints), scenario)
        family = family_of(scenario)
        for fmt in FORMATS:
            out = str(root / f"{os.path.basename(ckpt)}_{fmt}")
            # exact fp32 master weights (a bf16 run exports bf16 by default: see test_export_dtype_...)
            status, stdout, stderr = convert(ckpt, out, "--format", fmt, "--dtype", "fp32")
            done[scenario, fmt] = {"status": status, "stdout": stdout, "stderr": stderr, "dir": out}
            jobs.append({"dir": out, "auto_class": AUTO_CLASS[W.TASKS[family]], "trust_remote_code": fmt == "compact",
                         "inputs": W.reference_batch(family),
                         "generate": 3 if W.TASKS[family] != "classification" else 0, "key": (scenario, fmt)})
    for job, result in zip(jobs, reload_in_fresh_process(jobs, str(root))):
        done[job["key"]]["result"] = result
    return done


def reference(checkpoints, scenario: str) -> dict:
    return torch.load(os.path.join(W.scenario_dir(str(checkpoints), scenario), "reference.pt"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_export_of_a_zero_checkpoint_matches_the_masked_model(checkpoints, exports, scenario, fmt):
    done = exports[scenario, fmt]
    assert done["status"] == 0, done["stderr"]
    assert "verification: max |logits diff|" in done["stdout"] and "peak RSS" in done["stdout"], done["stdout"]
    result = done["result"]
    assert "error" not in result, result.get("error")
    ref = reference(checkpoints, scenario)
    diff = float((result["logits"] - ref["logits"]).abs().max())
    assert diff <= 1e-4, f"{scenario}/{fmt}: max |logits diff| {diff}"
    model = tiny_model(family_of(scenario))
    if fmt == "dense":
        assert result["parameters"] == sum(p.numel() for p in model.parameters())
        assert result["module"].startswith("transformers.models.")
    else:
        dead = set(W.DEAD_INPUT_UNITS) | set(W.DEAD_OUTPUT_UNITS)
        dead_ffn = {block.name: dead for block in resolve_architecture(model).ffn}
        assert result["parameters"] == expected_parameters(model, ref["alive"], dead_ffn)
        assert result["module"].startswith("transformers_modules."), result["module"]  # layers keep different heads


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if W.TASKS[family_of(s)] != "classification"])
def test_compact_generates_like_dense(exports, scenario):
    dense, compact = (exports[scenario, fmt]["result"] for fmt in FORMATS)
    assert torch.equal(compact["generated"], dense["generated"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_neuroprune_json_has_the_trained_masks(checkpoints, exports, scenario):
    ref = reference(checkpoints, scenario)
    assert any(not bool(mask.all()) for mask in ref["alive"].values()), "the run pruned no head"
    with open(os.path.join(exports[scenario, "compact"]["dir"], "neuroprune.json")) as f:
        record = json.load(f)
    kept = {a["name"]: a["kept_kv_heads"] for a in record["attention"]}
    assert kept == {name: torch.nonzero(mask).flatten().tolist() for name, mask in ref["alive"].items()}
    assert record["source"]["tag"] == f"step{W.STEPS}" and record["source"]["optimizer_steps"] == W.STEPS
    assert record["neuroprune_config"]["theta"] == W.NEUROPRUNE.theta


def test_cli_refuses_to_overwrite_and_names_the_tags(checkpoints, exports):
    ckpt = W.scenario_dir(str(checkpoints), SCENARIOS[0])
    status, _, err = convert(ckpt, exports[SCENARIOS[0], "dense"]["dir"], "--format", "dense")
    assert status == cli.EXIT_INVALID and "pass --overwrite" in err
    status, _, err = convert(ckpt, exports[SCENARIOS[0], "dense"]["dir"] + "_x", "--format", "dense", "--tag", "nope")
    assert status == cli.EXIT_INVALID and f"step{W.STEPS}" in err


def test_threshold_and_the_tools_wrapper(checkpoints, tmp_path):
    """tools/convert_to_hf.py in its own process, with --threshold: more zeros, still verified."""
    ckpt = W.scenario_dir(str(checkpoints), "opt:3:fp32")
    wrapper = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "convert_to_hf.py")
    proc = subprocess.run([sys.executable, wrapper, ckpt, str(tmp_path / "out"), "--format", "compact", "--tag",
                           f"step{W.STEPS}", "--threshold", "2e-3"], env=dict(os.environ, **ENV),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / "out" / "neuroprune.json") as f:
        record = json.load(f)
    assert record["threshold"] == 2e-3 and record["verification"]["max_abs_diff"] <= 1e-4
    status, _, _ = convert(ckpt, str(tmp_path / "plain"), "--format", "compact")
    with open(tmp_path / "plain" / "neuroprune.json") as f:
        assert status == 0 and json.load(f)["weight_sparsity"] < record["weight_sparsity"]
    status, _, err = convert(ckpt, str(tmp_path / "epsilon"), "--format", "dense", "--threshold")
    with open(tmp_path / "epsilon" / "neuroprune.json") as f:
        assert status == 0 and json.load(f)["threshold"] == W.NEUROPRUNE.epsilon, err


def load_weights(export_dir: str) -> dict[str, torch.Tensor]:
    weights = {}
    for name in os.listdir(export_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(export_dir, name), "pt") as handle:
                weights.update({key: handle.get_tensor(key) for key in handle.keys()})
    return weights


@pytest.mark.parametrize(("scenario", "fmt", "option", "dtype"), [
    ("opt:3:bf16", "compact", None, torch.bfloat16),        # the run's dtype is the default
    ("llama:3:fp32", "compact", None, torch.float32),
    ("llama:3:fp32", "dense", "fp16", torch.float16),
    ("t5:3:fp32", "compact", "bf16", torch.bfloat16)])
def test_export_dtype_rounds_the_fp32_export_and_verifies(checkpoints, exports, tmp_path, scenario, fmt, option,
                                                          dtype):
    """Every floating tensor is the fp32 export's rounded to the dtype, config.json says so, and the
    converter's own check passes against the masked model rounded alike."""
    out = str(tmp_path / "out")
    status, stdout, stderr = convert(W.scenario_dir(str(checkpoints), scenario), out, "--format", fmt,
                                     *(["--dtype", option] if option else []))
    assert status == 0, stderr
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    assert f"weights {name}" in stdout and "verification: max |logits diff|" in stdout, stdout
    reference = load_weights(exports[scenario, fmt]["dir"])
    written = load_weights(out)
    assert written.keys() == reference.keys()
    for key, tensor in written.items():
        expected = reference[key].to(dtype) if reference[key].is_floating_point() else reference[key]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), key
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == str(dtype).removeprefix("torch.")
    with open(os.path.join(out, "neuroprune.json")) as f:
        record = json.load(f)
    assert record["dtype"] == name and record["verification"]["max_abs_diff"] <= record["verification"]["atol"]


@pytest.fixture
def run_dir(checkpoints, tmp_path):
    """A run directory as the trainer leaves it: RUN/checkpoints (a copy of a real one) and metrics.jsonl."""
    run = tmp_path / "run"
    shutil.copytree(W.scenario_dir(str(checkpoints), "llama:3:fp32"), run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    return run


def snapshot(directory) -> dict[str, int]:
    return {os.path.relpath(os.path.join(root, f), directory): os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(directory) for f in files}


def test_overwrite_never_removes_the_checkpoint_or_what_holds_it(run_dir):
    before = snapshot(run_dir)
    ckpt = str(run_dir / "checkpoints")
    for out, reason in ((str(run_dir), "contains the checkpoint"), (ckpt, "is the checkpoint"),
                        (str(run_dir / "checkpoints" / f"step{W.STEPS}"), "lies inside the checkpoint")):
        status, stdout, err = convert(ckpt, out, "--format", "dense", "--overwrite")
        assert status == cli.EXIT_INVALID and reason in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(run_dir) == before


def test_export_directory_has_normal_permissions(run_dir, tmp_path):
    umask = os.umask(0o022)
    try:
        status, _, err = convert(str(run_dir / "checkpoints"), str(tmp_path / "out"), "--format", "compact")
    finally:
        os.umask(umask)
    assert status == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755


def test_refuses_an_incomplete_tag_unless_allowed(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints"
    (ckpt / f"step{W.STEPS}" / "complete").unlink()
    status, _, err = convert(str(ckpt), str(tmp_path / "out"), "--format", "dense")
    assert status == cli.EXIT_INVALID and f"'step{W.STEPS}' has no 'complete' marker" in err
    assert "--allow-incomplete" in err and not (tmp_path / "out").exists()
    status, _, err = convert(str(ckpt), str(tmp_path / "out"), "--format", "dense", "--allow-incomplete")
    assert status == 0, err


def test_names_a_truncated_shard(run_dir, tmp_path):
    shard = next((run_dir / "checkpoints" / f"step{W.STEPS}").glob("*optim_states.pt"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    status, _, err = convert(str(run_dir / "checkpoints"), str(tmp_path / "out"), "--format", "dense")
    assert status == cli.EXIT_INVALID and str(shard) in err and "truncated or corrupt" in err, err


def test_hints_the_checkpoint_directory(run_dir, tmp_path):
    status, _, err = convert(str(run_dir), str(tmp_path / "out"), "--format", "dense")
    assert status == cli.EXIT_INVALID and f"convert {run_dir / 'checkpoints'}" in err, err
    status, _, err = convert(str(run_dir / "checkpoints" / f"step{W.STEPS}"), str(tmp_path / "out"), "--format",
                             "dense")
    assert status == cli.EXIT_INVALID and f"--tag step{W.STEPS}" in err, err


@pytest.mark.parametrize(("value", "message"), [("-1", "finite number >= 0"), ("nan", "finite number >= 0"),
                                                ("1e9", "zeroes every penalised weight")])
def test_refuses_a_threshold_out_of_range(run_dir, tmp_path, value, message):
    status, _, err = convert(str(run_dir / "checkpoints"), str(tmp_path / "out"), "--format", "dense",
                             "--threshold", value)
    assert status == cli.EXIT_INVALID and message in err and not (tmp_path / "out").exists(), err
    assert not math.isnan(float(value)) or "nan" in err


@pytest.mark.parametrize("scenario", ["llama:0:fp32", "llama:2:fp32", "llama:3:fp32"])
def test_iter_fp32_weights_reads_the_master_weights(checkpoints, exports, scenario):
    from neuroprune_ds.export.checkpoint import iter_fp32_weights, read_checkpoint

    info = read_checkpoint(W.scenario_dir(str(checkpoints), scenario))
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight"]
    weights = dict(iter_fp32_weights(info, names))
    exported = load_weights(exports[scenario, "dense"]["dir"])  # the masks leave these untouched
    for name in names:
        assert weights[name].dtype == torch.float32 and not weights[name].requires_grad
        assert torch.equal(weights[name], exported[name]), name
