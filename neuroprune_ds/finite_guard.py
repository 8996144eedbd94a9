"""The non-finite guard: NaN/inf in a step's losses or gradients, found by every rank at the same step.

:class:`FiniteGuard` checks before ``engine.step()`` (one all-reduce at the gradient-accumulation boundary):
every rank stops at the same step, or, with ``checkpoint.on_nonfinite: skip``, discards that step's
gradients. Nothing of a bad state is ever saved: the stop comes before the step's checkpoint, and a skipped
step leaves weights and optimizer state as they were.

A skip at ZeRO-0 writes one private field of the engine, ``engine._config.gradient_clipping``, for that one
step: DeepSpeed offers no public way to hold clipping off, and its clipping of no gradients raises.
:meth:`FiniteGuard.after_step` puts it back after that step.
"""

from __future__ import annotations

import copy
import logging

import torch

from neuroprune_ds.collectives import any_rank
from neuroprune_ds.zero_access import ZeroAccess

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf on some rank (raised on every rank at the same step)."""


class FiniteGuard:
    """Collective NaN/inf check of the losses and local gradient shards of one optimizer step.

    Call :meth:`observe` after every ``engine.backward`` (and the pruner's ``after_backward``), before
    ``engine.step()``. At a gradient-accumulation boundary it all-reduces one flag, so every rank takes the
    same decision: raise :class:`NonFiniteError` (policy ``stop``), or (``skip``) make ``engine.step()``
    leave weights and optimizer state untouched on every rank: at ZeRO 1-3 the gradient shards are set to
    NaN so that DeepSpeed's own overflow check discards the step (``engine.skipped_steps`` counts it; the LR
    schedule does not advance); at ZeRO-0 the gradients are dropped, so AdamW skips every parameter
    (gradient clipping, which would fail on no gradients, is held off for that step), and :meth:`after_step`
    puts the LR schedule back where it was, so that it does not advance there either.
    """

    def __init__(self, engine, policy: str, rank: int):
        self.engine, self.policy, self.rank = engine, policy, rank
        self.access = ZeroAccess(engine)
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.bad_loss = False
        self.skipped_steps = 0
        self._held: tuple[float, dict | None, list[float]] | None = None  # ZeRO-0 skip: clipping, LR schedule

    def observe(self, loss: torch.Tensor) -> None:
        self.bad_loss |= not bool(torch.isfinite(loss.detach()).all())
        if not self.engine.is_gradient_accumulation_boundary():
            return
        bad_grad = not self.bad_loss and not self._grads_finite()
        mine = "loss" if self.bad_loss else "gradients" if bad_grad else None
        self.bad_loss = False
        if not any_rank(mine is not None, self.engine.device):
            return
        step = self.engine.global_steps + 1
        where = f"rank {self.rank}: non-finite {mine}" if mine else f"rank {self.rank}: finite"
        if self.policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradients at optimizer step {step} ({where}); every rank stops here and "
                f"nothing of this state is checkpointed. Resume from the last checkpoint with a lower "
                f"schedule.lr or stronger schedule.grad_clip, or set checkpoint.on_nonfinite=skip")
        self.skipped_steps += 1
        log.warning("non-finite loss or gradients at optimizer step %d (%s): step skipped on every rank", step,
                    where)
        self._discard_gradients()

    def _grads_finite(self) -> bool:
        finite = True

        def check(grad: torch.Tensor, piece) -> None:
            nonlocal finite
            finite = finite and bool(torch.isfinite(grad).all())

        for param in self.params:
            self.access.edit_grad(param, check)
            if not finite:
                return False
        return True

    def after_step(self) -> None:
        """Call after every ``engine.step()``: restores clipping and the LR schedule over a step skipped at ZeRO-0."""
        if self._held is None:
            return
        clipping, scheduler_state, group_lrs = self._held
        self._held = None
        self.engine._config.gradient_clipping = clipping
        if scheduler_state is not None:
            self.engine.lr_scheduler.load_state_dict(scheduler_state)
        for group, lr in zip(self.engine.optimizer.param_groups, group_lrs):
            group["lr"] = lr

    def _discard_gradients(self) -> None:
        if not self.engine.zero_optimization() and not self.engine.bfloat16_enabled():
            for param in self.params:
                param.grad = None
            scheduler = self.engine.lr_scheduler
            self._held = (self.engine._config.gradient_clipping,
                          None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
                          [group["lr"] for group in self.engine.optimizer.param_groups])
            self.engine._config.gradient_clipping = 0.0  # DeepSpeed's norm of no gradients raises
            return
        for param in self.params:
            self.access.edit_grad(param, lambda grad, piece: grad.fill_(float("nan")))
