"""Trains tiny models with NeuroPrune on 2 ranks and saves checkpoints the way the trainer does.

    torchrun --nproc_per_node 2 tests/dist_export_worker.py OUT_DIR family:stage:dtype ...

Per scenario: the equivalence model (planted redundant heads; layer 1 made to differ from layer 0, so layers
keep different heads) trains a few steps with the pruner (heads are pruned on the way); then a few FFN units
are killed through the pruner's ZeRO access layer (input rows or output column exactly zero, as a hard
threshold at the end of a run leaves them), and the engine saves OUT_DIR/<scenario>/ per the checkpoint
contract (client state, config.json beside the tags, the ``complete`` marker). Rank 0 also
records the logits of the masked model (the gathered fp32 master weights in a plain HF model) on
``reference_batch`` in OUT_DIR/<scenario>/reference.pt, for the test to compare exports with.
"""

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from export_helpers import export_inputs  # noqa: E402
from tiny_models import MODEL_CLASSES, batch, equivalence_model  # noqa: E402
from worker_harness import (build_engine, ds_config, gathered_masters, join_process_group,  # noqa: E402
                            run_scenarios, train_step)

from neuroprune_ds.arch import resolve_architecture  # noqa: E402
from neuroprune_ds.checkpoint import COMPLETE  # noqa: E402
from neuroprune_ds.config import NeuroPruneConfig  # noqa: E402
from neuroprune_ds.distributed import barrier_and_exit  # noqa: E402
from neuroprune_ds.flat_slice import COL, ROW  # noqa: E402
from neuroprune_ds.pruner import NeuroPruner  # noqa: E402

STEPS = 4
NEUROPRUNE = NeuroPruneConfig(mlp_lambda=1e-2, attn_lambda=1e-2, theta=0.05, prune_every_steps=2)
TASKS = {"llama": "causal_lm", "opt": "causal_lm", "t5": "seq2seq", "bart": "seq2seq", "bert": "classification"}
DEAD_INPUT_UNITS = (0, 1, 2)  # input rows zeroed: constant activation (folded into a bias, or silent)
DEAD_OUTPUT_UNITS = (5,)      # output column zeroed: contributes nothing


def scenario_dir(out_dir: str, scenario: str) -> str:
    return os.path.join(out_dir, scenario.replace(":", "_"))


def reference_batch(family: str) -> dict:
    """The batch the test feeds every export of ``family``."""
    return export_inputs(TASKS[family] == "seq2seq", seed=7)


def vary_layer_one(model: torch.nn.Module) -> None:
    """In layer 1, unit 1 stops copying unit 0 and (with 4 units or more) unit 3 copies unit 2 instead."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in resolve_architecture(model).attention:
            if block.layer != 1:
                continue
            for linear, rows in ((block.q, block.heads_per_unit * block.head_dim), (block.k, block.head_dim),
                                 (block.v, block.head_dim)):
                weight = params[linear.weight]
                weight[rows:2 * rows] = 0.02 * torch.randn(weight[rows:2 * rows].shape, generator=gen)
                if block.num_units >= 4:
                    weight[3 * rows:4 * rows] = weight[2 * rows:3 * rows] + 1e-3 * torch.randn(
                        weight[2 * rows:3 * rows].shape, generator=gen)


def kill_ffn_units(pruner: NeuroPruner) -> None:
    """Zero the input rows of DEAD_INPUT_UNITS and the output column of DEAD_OUTPUT_UNITS of every FFN."""
    for block in pruner.arch.ffn:
        keep_rows = torch.ones(block.width)
        keep_rows[list(DEAD_INPUT_UNITS)] = 0
        keep_cols = torch.ones(block.width)
        keep_cols[list(DEAD_OUTPUT_UNITS)] = 0
        edits = [(lin.weight, ROW, keep_rows) for lin in block.inputs] + [(block.output.weight, COL, keep_cols)]
        for name, axis, keep in edits:
            def zero(tensor, piece, axis=axis, keep=keep):
                piece.scale_(tensor, keep, axis)

            pruner.access.edit_weights(pruner.params[name], zero, moments=True)


def run(out_dir: str, scenario: str) -> None:
    family, stage, dtype = scenario.split(":")
    model = equivalence_model(family)
    vary_layer_one(model)
    engine = build_engine(model, ds_config(int(stage), dtype), lr=1e-3, weight_decay=0.01)
    pruner = NeuroPruner(engine, NEUROPRUNE)
    rank = dist.get_rank()
    for step in range(STEPS):
        train_step(engine, pruner, batch(family, step, rank))
    kill_ffn_units(pruner)
    ckpt_dir = scenario_dir(out_dir, scenario)
    client_state = {"neuroprune": pruner.state_dict(), "neuroprune_config": dataclasses.asdict(NEUROPRUNE),
                    "model": {"name_or_path": f"tiny-{family}", "task": TASKS[family], "num_labels": 2}}
    engine.save_checkpoint(ckpt_dir, tag=f"step{STEPS}", client_state=client_state)
    dist.barrier()
    if rank == 0:  # the trainer's marker that every rank's files are on disk
        open(os.path.join(ckpt_dir, f"step{STEPS}", COMPLETE), "w").close()
    master = gathered_masters(pruner)  # collective
    if rank == 0:
        engine.module.config.save_pretrained(ckpt_dir)
        reference = MODEL_CLASSES[family].from_config(engine.module.config).eval()
        loaded = reference.load_state_dict(master, strict=False)
        not_trained = ({n for n, _ in reference.named_parameters(remove_duplicate=False)}
                       - set(dict(reference.named_parameters()))) | set(dict(reference.named_buffers()))
        assert not loaded.unexpected_keys and set(loaded.missing_keys) <= not_trained, loaded  # tied or buffers
        with torch.no_grad():
            logits = reference(**reference_batch(family)).logits
        alive = {name: mask.clone() for name, mask in pruner.alive.items()}
        torch.save({"logits": logits, "alive": alive}, os.path.join(ckpt_dir, "reference.pt"))
    engine.destroy()


def main() -> None:
    out_dir, scenarios = sys.argv[1], sys.argv[2:]
    join_process_group()
    _, failed = run_scenarios(scenarios, lambda scenario: run(out_dir, scenario))
    barrier_and_exit(1 if failed else 0)


if __name__ == "__main__":
    main()
