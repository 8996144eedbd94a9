"""``neuroprune report``: the plots are valid PNGs and every number of the summary equals its source
(neuroprune.json, the weights, neuroprune_summary.json, metrics.jsonl)."""

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from neuroprune_ds import cli
from neuroprune_ds.report import make_report
from tiny_models import tiny_model

EPSILON = 1e-4
HEAD_NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
FFN_NAMES = ["model.layers.0.mlp", "model.layers.1.mlp"]


def pruned_llama():
    """The tiny LLaMA (d_model 32, FFN 48, 4 heads in 2 KV groups) with FFN units 0-9 of layer 0 dead and
    every third input weight of layer 1 below epsilon."""
    model = tiny_model("llama")
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj"):
            model.model.layers[0].mlp.get_submodule(proj).weight[:10] = 0.0
            model.model.layers[1].mlp.get_submodule(proj).weight.view(-1)[::3] = 1e-5
        model.model.layers[0].mlp.down_proj.weight[:, :10] = 0.0
    return model


def write_metrics(directory, steps=(2, 4, 6)):
    records = [{"kind": "setup", "step": 0, "time": 0.0, "setup/engine_s": 1.0}]
    for step in steps:
        records.append({"kind": "train", "step": step, "time": 1.0, "train/loss": 5.0 - 0.25 * step,
                        "sparsity/weight": 0.05 * step, "heads_kept/" + HEAD_NAMES[0]: 4.0 - (step > 2) * 2.0,
                        "heads_kept/" + HEAD_NAMES[1]: 4.0, "ffn_alive/" + FFN_NAMES[0]: 48.0 - step,
                        "ffn_alive/" + FFN_NAMES[1]: 48.0})
    records.append({"kind": "eval", "step": steps[-1], "time": 2.0, "eval/loss": 3.5, "eval/perplexity": "inf"})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A dense-format export in the exporter's layout: safetensors weights, config.json, neuroprune.json
    (numbers computed here from the weights), and the run's metrics.jsonl in the source checkpoint's parent."""
    root = tmp_path_factory.mktemp("report")
    run_dir, export_dir, dense_dir = root / "run", root / "export", root / "dense"
    (run_dir / "checkpoints").mkdir(parents=True)
    write_metrics(run_dir)
    tiny_model("llama").save_pretrained(dense_dir)
    model = pruned_llama()
    model.save_pretrained(export_dir)
    params = dict(model.named_parameters())
    penalised = [f"{b}.{p}.weight" for b in HEAD_NAMES for p in ("q_proj", "k_proj", "v_proj")]
    penalised += [f"{b}.{p}.weight" for b in FFN_NAMES for p in ("gate_proj", "up_proj", "down_proj")]
    small = sum(int((params[n].abs() < EPSILON).sum()) for n in penalised)
    record = {
        "format": "dense", "config": "stock", "model_type": "llama",
        "source": {"checkpoint": str(run_dir / "checkpoints"), "tag": "global_step6", "optimizer_steps": 6,
                   "name_or_path": str(dense_dir), "task": "causal_lm"},
        "attention": [{"name": HEAD_NAMES[0], "stack": "decoder", "layer": 0, "kind": "self", "num_heads": 4,
                       "num_kv_heads": 2, "kept_heads": [2, 3], "kept_kv_heads": [1]},
                      {"name": HEAD_NAMES[1], "stack": "decoder", "layer": 1, "kind": "self", "num_heads": 4,
                       "num_kv_heads": 2, "kept_heads": [0, 1, 2, 3], "kept_kv_heads": [0, 1]}],
        "ffn": [{"name": FFN_NAMES[0], "stack": "decoder", "layer": 0, "width": 48, "kept_units": 38,
                 "folded_units": 0},
                {"name": FFN_NAMES[1], "stack": "decoder", "layer": 1, "width": 48, "kept_units": 48,
                 "folded_units": 0}],
        "parameters": {"dense": 20000, "export": 18000},
        "weight_sparsity": small / sum(params[n].numel() for n in penalised),
        "structural_sparsity": 0.123456789,
        "threshold": None, "verification": {"max_abs_diff": 0.0, "atol": 1e-4},
        "neuroprune_config": {"epsilon": EPSILON},
    }
    (export_dir / "neuroprune.json").write_text(json.dumps(record))
    report = make_report(export_dir)
    return {"dir": export_dir, "report": report, "record": record, "model": model, "run": run_dir}


def table(markdown: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header row starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def overview(markdown: str) -> dict[str, str]:
    return dict(table(markdown, "quantity | value")[:4])


def assert_valid_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"


def test_export_report_writes_every_plot_as_a_valid_png(export):
    out = export["report"].parent
    assert export["report"] == export["dir"] / "report" / "report.md"
    for name in ("heads_kept.png", "ffn_kept.png", "ffn_degree.png", "training.png"):
        assert_valid_png(out / name)
        assert f"]({name})" in export["report"].read_text()


def test_summary_numbers_equal_neuroprune_json(export):
    markdown, record = export["report"].read_text(), export["record"]
    totals = overview(markdown)
    assert float(totals["weight sparsity"]) == pytest.approx(record["weight_sparsity"], abs=5e-7)
    assert float(totals["structural sparsity"]) == pytest.approx(record["structural_sparsity"], abs=5e-7)
    assert totals["attention heads kept"] == "6 / 8"
    assert totals["FFN units kept"] == "86 / 96"
    heads = table(markdown, "block | stack | kind | layer | heads kept")
    assert [(r[0], int(r[4]), int(r[5]), [int(h) for h in r[6].split(",")]) for r in heads] == [
        (a["name"], len(a["kept_heads"]), a["num_heads"], a["kept_heads"]) for a in record["attention"]]
    ffn = table(markdown, "block | stack | layer | units kept")
    assert [(r[0], int(r[3]), int(r[4])) for r in ffn] == [(f["name"], f["kept_units"], f["width"])
                                                           for f in record["ffn"]]


def test_degree_statistics_equal_the_weights(export):
    """Degrees: per FFN unit, gate + up input weights with |w| >= epsilon (full degree 2 x 32); the dense
    reference is the base model named in neuroprune.json's source."""
    rows = {r[0]: r[1:] for r in table(export["report"].read_text(), "model | units")}
    for label, model in (("NeuroPrune", export["model"]), ("dense (dense)", tiny_model("llama"))):
        params = dict(model.named_parameters())
        degrees = np.concatenate([sum((params[f"{b}.{p}.weight"].abs() >= EPSILON).sum(dim=1).numpy()
                                      for p in ("gate_proj", "up_proj")) for b in FFN_NAMES])
        assert rows[label] == ["96", str(int((degrees == 0).sum())), f"{np.median(degrees):g}",
                               f"{degrees.mean():.1f}"], label
    assert int(rows["NeuroPrune"][1]) == 10
    assert rows["dense (dense)"][:3] == ["96", "0", "64"]
    assert "full degree 64" in export["report"].read_text()


def test_training_numbers_equal_the_last_metrics_records(export):
    markdown = export["report"].read_text()
    assert str(export["run"] / "metrics.jsonl") in markdown
    rows = dict(r for r in table(markdown[markdown.index("## Training"):], "quantity | value"))
    assert rows["last logged step"] == "6"
    assert float(rows["train/loss at step 6"]) == pytest.approx(3.5)
    assert float(rows["sparsity/weight at step 6"]) == pytest.approx(0.3)
    assert float(rows["eval/loss at step 6"]) == pytest.approx(3.5)
    assert "eval/perplexity at step 6" not in rows  # written as the string "inf": not a finite number


def test_run_directory_report_expands_kv_groups_to_heads(tmp_path):
    summary = {"attention": [{"name": HEAD_NAMES[0], "stack": "decoder", "layer": 0, "kind": "self", "num_units": 2,
                              "heads_per_unit": 2, "kept_units": [1]},
                             {"name": HEAD_NAMES[1], "stack": "decoder", "layer": 1, "kind": "self", "num_units": 2,
                              "heads_per_unit": 2, "kept_units": [0, 1]}],
               "ffn": [{"name": FFN_NAMES[0], "stack": "decoder", "layer": 0, "width": 48, "alive_units": 40},
                       {"name": FFN_NAMES[1], "stack": "decoder", "layer": 1, "width": 48, "alive_units": 47}],
               "weight_sparsity": 0.25}
    (tmp_path / "neuroprune_summary.json").write_text(json.dumps(summary))
    write_metrics(tmp_path)
    report = make_report(tmp_path)
    for name in ("heads_kept.png", "ffn_kept.png", "training.png"):
        assert_valid_png(report.parent / name)
    assert not (report.parent / "ffn_degree.png").exists()
    markdown = report.read_text()
    totals = overview(markdown)
    assert float(totals["weight sparsity"]) == 0.25
    assert totals["structural sparsity"].startswith("n/a")
    assert totals["attention heads kept"] == "6 / 8"
    assert totals["FFN units kept"] == "87 / 96"
    heads = table(markdown, "block | stack | kind | layer | heads kept")
    assert [r[6] for r in heads] == ["2, 3", "0, 1, 2, 3"]
    assert "report an export" in markdown


def test_cli_report_exit_status(export, tmp_path, capsys):
    assert cli.main(["report", str(export["dir"]), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file()
    assert cli.main(["report", str(tmp_path / "out")]) == 2
    assert "neither neuroprune.json" in capsys.readouterr().err


def test_cli_report_names_an_out_that_is_a_file_and_a_run_pointing_nowhere(export, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["report", str(export["dir"]), "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert cli.main(["report", str(export["dir"]), "--run", str(tmp_path / "nowhere")]) == 2
    assert f"--run {tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err
    assert cli.main(["report", str(export["dir"]), "--run", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_report_of_a_real_compact_export(tmp_path):
    """The exporter's own neuroprune.json and compact weights (kept units removed) read back exactly."""
    convert = pytest.importorskip("neuroprune_ds.export.convert")
    from neuroprune_ds.config import NeuroPruneConfig

    model = pruned_llama()
    alive = {HEAD_NAMES[0]: torch.tensor([False, True]), HEAD_NAMES[1]: torch.tensor([True, True])}
    convert.export_model(model, alive, str(tmp_path / "export"), "compact", task="causal_lm",
                         neuroprune=NeuroPruneConfig(epsilon=EPSILON))
    record = json.loads((tmp_path / "export" / "neuroprune.json").read_text())
    # The sparsity is over the penalised matrices, Q, K, V and the FFN's (the output projections are not):
    # KV group 0 of layer 0 is pruned (q rows 0-15, k and v rows 0-7), FFN units 0-9 of layer 0 are removed.
    params = {n: p.detach().clone() for n, p in pruned_llama().named_parameters()}
    for proj, rows in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
        params[f"{HEAD_NAMES[0]}.{proj}.weight"][:rows] = 0.0
    penalised = [f"{b}.{p}.weight" for b in HEAD_NAMES for p in ("q_proj", "k_proj", "v_proj")]
    penalised += [f"{b}.{p}.weight" for b in FFN_NAMES for p in ("gate_proj", "up_proj", "down_proj")]
    total = sum(params[n].numel() for n in penalised)
    assert total == 2 * (32 * 32 + 2 * 16 * 32 + 3 * 48 * 32)
    assert record["weight_sparsity"] == sum(int((params[n].abs() < EPSILON).sum()) for n in penalised) / total
    assert record["structural_sparsity"] == (16 * 32 + 2 * 8 * 32 + 10 * 3 * 32) / total
    markdown = make_report(tmp_path / "export").read_text()
    totals = overview(markdown)
    assert float(totals["weight sparsity"]) == pytest.approx(record["weight_sparsity"], abs=5e-7)
    assert float(totals["structural sparsity"]) == pytest.approx(record["structural_sparsity"], abs=5e-7)
    heads = table(markdown, "block | stack | kind | layer | heads kept")
    assert [[int(h) for h in r[6].split(",")] for r in heads] == [a["kept_heads"] for a in record["attention"]]
    assert [r[6] for r in heads] == ["2, 3", "0, 1, 2, 3"]
    ffn = table(markdown, "block | stack | layer | units kept")
    assert [int(r[3]) for r in ffn] == [f["kept_units"] for f in record["ffn"]] == [38, 48]
    degrees = {r[0]: r[1:] for r in table(markdown, "model | units")}
    assert degrees["NeuroPrune"][:2] == ["96", "10"]  # the 10 units the compact export removed: degree 0
