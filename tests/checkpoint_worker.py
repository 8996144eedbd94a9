"""Runs several trainings of ``neuroprune_ds.train`` in ONE distributed launch (see tests/test_checkpoint.py).

Usage (under torchrun, or alone for one rank): ``python tests/checkpoint_worker.py PLAN.json``. The plan is a
list of runs ``{"name", "config", "deepspeed", "overrides", "faults", "guard_devices"}``; each is
``run_training`` of the real trainer, so a launch pays the process start and imports once. Faults are
injected from here, never from the package: ``signal_at`` (a real SIGUSR1/SIGTERM sent to one rank after an
optimizer step, or during the evaluation at that step), ``kill_in_save`` (SIGKILL of one rank inside a save,
after the others started writing), ``signal_in_prune`` (a signal to one rank while head pruning is at its
second block), ``nan_grad_at`` (NaN in one rank's gradient shard at a step). ``guard_devices`` records the
tensors the library creates without a device (tests/device_guard.py). Results (exit status, resume details,
pruner masks after resume, head-pruning passes, those tensors, how this rank's model came back from loading,
how many datasets map passes this rank computed rather than read from the cache) go to
``<plan dir>/result-<name>-rank<r>.json``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

from worker_harness import start_plan_worker

from neuroprune_ds.distributed import barrier_and_exit


def main(plan_path: str) -> None:
    plan = start_plan_worker(plan_path)
    import datasets

    from neuroprune_ds import checkpoint, finite_guard, preemption, pruner, train

    original = {name: getattr(checkpoint.CheckpointManager, name) for name in ("after_step", "save", "resume")}
    original_check = preemption.Preemption.check
    original_observe = finite_guard.FiniteGuard.observe
    original_prune = pruner.NeuroPruner.prune_heads
    original_load_model = train.load_model
    original_map_single = datasets.Dataset._map_single
    for run in plan:
        faults = run.get("faults", {})
        record: dict = {"map_computed": 0}

        def load_model(*args, record=record, **kwargs):
            model = original_load_model(*args, **kwargs)
            params = list(model.parameters())
            record["loaded"] = {"partitioned": sum(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
                                "params": len(params), "dtypes": sorted({str(p.dtype) for p in params})}
            return model

        @functools.wraps(original_map_single)  # datasets reads its signature for the cache fingerprint
        def map_single(*args, record=record, **kwargs):  # runs only when map misses the cache
            record["map_computed"] += 1
            yield from original_map_single(*args, **kwargs)

        def after_step(self, step, window, faults=faults):
            sig = faults.get("signal_at")
            if sig and not sig.get("eval") and step == sig["step"] and self.rank == sig["rank"]:
                os.kill(os.getpid(), getattr(signal, sig["signal"]))
            return original["after_step"](self, step, window)

        def check(self, faults=faults):
            sig = faults.get("signal_at")
            manager = self._manager
            if (sig and sig.get("eval") and manager.engine.global_steps == sig["step"]
                    and manager.rank == sig["rank"] and self.received is None):
                os.kill(os.getpid(), getattr(signal, sig["signal"]))
            return original_check(self)

        def save(self, step, window=None, *, pending_eval=False, faults=faults):
            kill = faults.get("kill_in_save")
            if kill and step == kill["step"] and self.rank == kill["rank"]:
                import time

                time.sleep(1.0)  # the other rank is inside engine.save_checkpoint by now
                os.kill(os.getpid(), signal.SIGKILL)
            tag_dir = original["save"](self, step, window, pending_eval=pending_eval)
            record.setdefault("saved", []).append([step, pending_eval])
            return tag_dir

        def resume(self):
            self.preemption._manager = self
            resumed = original["resume"](self)
            if resumed is not None:
                record["resumed_step"] = resumed.step
                record["pending_eval"] = resumed.pending_eval
            if self.session.pruner is not None:
                record["alive_after_resume"] = {k: v.tolist() for k, v in self.session.pruner.alive.items()}
            record["global_steps_after_resume"] = self.engine.global_steps
            return resumed

        def observe(self, loss, faults=faults):
            nan = faults.get("nan_grad_at")
            if (nan and self.rank == nan["rank"] and self.engine.global_steps + 1 == nan["step"]
                    and self.engine.is_gradient_accumulation_boundary()):
                for param in self.params:
                    self.access.edit_grad(param, lambda grad, piece: grad.fill_(float("nan")))
            return original_observe(self, loss)

        def prune_heads(self, should_stop=None, faults=faults):
            import torch.distributed as dist

            sig, asked = faults.get("signal_in_prune"), []

            def stop():  # the signal arrives while the pass is at its second block
                if (sig and self.optimizer_steps == sig["step"] and dist.get_rank() == sig["rank"]
                        and len(asked) == 1):
                    os.kill(os.getpid(), getattr(signal, sig["signal"]))
                asked.append(1)
                return should_stop()

            changes = original_prune(self, None if should_stop is None else stop)
            record.setdefault("prune_passes", []).append([self.optimizer_steps, len(asked)])
            return changes

        pruner.NeuroPruner.prune_heads = prune_heads
        checkpoint.CheckpointManager.after_step = after_step
        checkpoint.CheckpointManager.save = save
        checkpoint.CheckpointManager.resume = resume
        preemption.Preemption.check = check
        finite_guard.FiniteGuard.observe = observe
        train.load_model = load_model
        datasets.Dataset._map_single = staticmethod(map_single)
        args = train.parse_args(["--config", run["config"], "--deepspeed", run["deepspeed"], *run.get("overrides", [])])
        if run.get("guard_devices"):  # record tensors the library creates without a device (tests/device_guard.py)
            from device_guard import DevicelessFactories

            with DevicelessFactories() as guard:
                code = train.run_training(args)
            record["deviceless"] = sorted(guard.found)
        else:
            code = train.run_training(args)
        record["code"] = code
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        out = Path(plan_path).parent / f"result-{run['name']}-rank{rank}.json"
        out.write_text(json.dumps(record))
        print(f"checkpoint_worker: run {run['name']} rank {rank} exit {code}", flush=True)
        if dist.is_initialized():
            dist.barrier()
    barrier_and_exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
