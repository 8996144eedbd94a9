"""transformers' Trainer with NeuroPrune vs the NeuroPruner driven by hand, several scenarios in one 2-rank launch.

    torchrun --nproc_per_node 2 tests/hf_trainer_worker.py OUT.pt OUTPUT_DIR stage:gas:schedule ...

schedule: 'steps' (heads pruned every 2 optimizer steps, 4 steps), 'epochs' (heads pruned at the end of each
of 2 epochs of 2 steps) or 'resume' (the 'steps' run stopped after a checkpoint at step 2, resumed by a new
Trainer to step 4). Each scenario trains the equivalence model with ``add_neuroprune`` on a Trainer, recording
the batches every rank's Trainer fed to the model; then trains a fresh copy with ``deepspeed.initialize`` and
the NeuroPruner called by hand on those same batches, with the same optimizer and DeepSpeed settings. Rank 0
writes both runs' gathered fp32 master weights, masks and the Trainer's log history to OUT.pt.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import batch, equivalence_model  # noqa: E402
from worker_harness import (build_engine, ds_config, gathered_masters, join_process_group,  # noqa: E402
                            run_scenarios, save_and_exit, train_step)

from neuroprune_ds.config import NeuroPruneConfig  # noqa: E402
from neuroprune_ds.hf_trainer import add_neuroprune, init_deepspeed_cpu_state  # noqa: E402
from neuroprune_ds.pruner import NeuroPruner  # noqa: E402

FAMILY = "llama"
LR = 1e-3
CLIP = 1.0
MICRO_BATCH = 2
STEPS_PER_EPOCH = {"steps": 4, "epochs": 2, "resume": 4}
EPOCHS = {"steps": 1, "epochs": 2, "resume": 1}


def neuroprune_config(schedule: str) -> NeuroPruneConfig:
    return NeuroPruneConfig(mlp_lambda=1e-2, attn_lambda=1e-2, theta=0.05,
                            prune_every_steps=0 if schedule == "epochs" else 2)


def trainer_ds_config(stage: int, gas: int, world_size: int, *, auto: bool) -> dict:
    """The DeepSpeed JSON; the Trainer gets 'auto' batch fields and fills them from TrainingArguments."""
    batch_fields = ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "train_batch_size": "auto", "gradient_clipping": "auto"} if auto else
                    {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
                     "train_batch_size": MICRO_BATCH * gas * world_size, "gradient_clipping": CLIP})
    return {**ds_config(stage), **batch_fields}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def examples(count: int) -> ListDataset:
    rows = []
    for index in range(0, count, 2):
        pair = batch(FAMILY, step=index, rank=0)
        rows += [{key: value[i] for key, value in pair.items()} for i in range(2)]
    return ListDataset(rows[:count])


class RecordingTrainer(Trainer):
    """Keeps every micro-batch this rank trains on, so the hand-driven run can replay them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.recorded.append({key: value.detach().clone() for key, value in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class EpochMarks(TrainerCallback):
    """How many micro-batches had been trained at each epoch end."""

    def __init__(self, trainer):
        self.trainer, self.marks = trainer, []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.marks.append(len(self.trainer.recorded))


def training_args(output_dir: str, stage: int, gas: int, schedule: str, max_steps: int, **extra):
    # accelerate refuses a second DeepSpeed Accelerator on a configured state: start each Trainer afresh
    # (transformers' TrainingArguments does the same reset when it sets up the state itself).
    AcceleratorState._reset_state(reset_partial_state=True)
    init_deepspeed_cpu_state()
    return TrainingArguments(
        output_dir=output_dir, deepspeed=trainer_ds_config(stage, gas, dist.get_world_size(), auto=True),
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=gas, learning_rate=LR,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=CLIP, optim="adamw_torch",
        num_train_epochs=EPOCHS[schedule], max_steps=max_steps, logging_steps=2, report_to=[],
        disable_tqdm=True, seed=0, accelerator_config={"use_configured_state": True}, **extra)


def run_trainer(stage: int, gas: int, schedule: str, output_dir: str) -> dict:
    unset_hf_deepspeed_config()  # a ZeRO-3 config left by an earlier scenario would build the model in zero.Init
    model = equivalence_model(FAMILY)
    world = dist.get_world_size()
    steps = STEPS_PER_EPOCH[schedule]
    dataset = examples(steps * gas * MICRO_BATCH * world)
    resume = schedule == "resume"
    args = training_args(output_dir, stage, gas, schedule, max_steps=2 if resume else -1,
                         **({"save_strategy": "steps", "save_steps": 2} if resume else {"save_strategy": "no"}))
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset)
    marks = EpochMarks(trainer)
    trainer.add_callback(marks)
    callback = add_neuroprune(trainer, neuroprune_config(schedule))
    trainer.train()
    recorded = trainer.recorded
    if resume:  # a new Trainer, as after preemption: weights, optimizer and masks come from checkpoint-2
        trainer.model_wrapped.destroy()
        unset_hf_deepspeed_config()
        args = training_args(output_dir, stage, gas, schedule, max_steps=4, save_strategy="no")
        trainer = RecordingTrainer(model=equivalence_model(FAMILY), args=args, train_dataset=dataset)
        callback = add_neuroprune(trainer, neuroprune_config(schedule))
        trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
        recorded = recorded + trainer.recorded
    pruner = callback.pruner
    first_inputs = torch.stack([r["input_ids"] for r in recorded])
    everyone = [torch.empty_like(first_inputs) for _ in range(world)]
    dist.all_gather(everyone, first_inputs)
    result = {
        "master": gathered_masters(pruner),
        "alive": {name: mask.clone() for name, mask in pruner.alive.items()},
        "log_history": trainer.state.log_history,
        "accelerate_num_processes": trainer.accelerator.num_processes,
        "ranks_saw_different_batches": not torch.equal(everyone[0], everyone[1]),
        "step_hook_removed": "step" not in vars(trainer.model_wrapped),
        "optimizer_steps": pruner.optimizer_steps,
    }
    trainer.model_wrapped.destroy()
    return result, recorded, marks.marks


def run_by_hand(stage: int, gas: int, schedule: str, recorded: list, epoch_marks: list) -> dict:
    unset_hf_deepspeed_config()
    model = equivalence_model(FAMILY)
    engine = build_engine(model, trainer_ds_config(stage, gas, dist.get_world_size(), auto=False), lr=LR,
                          weight_decay=0.0)
    pruner = NeuroPruner(engine, neuroprune_config(schedule))
    for index, inputs in enumerate(recorded):
        train_step(engine, pruner, inputs)
        if index + 1 in epoch_marks:
            pruner.on_epoch_end()
    result = {"master": gathered_masters(pruner),
              "alive": {name: mask.clone() for name, mask in pruner.alive.items()}}
    engine.destroy()
    return result


def run(scenario: str, output_root: str) -> dict:
    """The Trainer's run of ``stage:gas:schedule`` and the hand-driven one on the same batches."""
    stage, gas, schedule = scenario.split(":")
    try:
        trainer, recorded, marks = run_trainer(int(stage), int(gas), schedule,
                                               os.path.join(output_root, scenario.replace(":", "_")))
        return {"trainer": trainer, "by_hand": run_by_hand(int(stage), int(gas), schedule, recorded, marks)}
    finally:
        gc.collect()


def main() -> None:
    out, output_root, scenarios = sys.argv[1], sys.argv[2], sys.argv[3:]
    join_process_group()
    results, _ = run_scenarios(scenarios, lambda scenario: run(scenario, output_root))
    save_and_exit(results, out)


if __name__ == "__main__":
    main()
