"""Preemption: SIGTERM and SIGUSR1 become a stop that every rank agrees on at the same point.

A signal handler only sets a flag. Every rank asks :meth:`Preemption.agreed`, an all-reduce of the flag, at
the same points, so all ranks stop at the same step even when only one got the signal:

- the training loop, after every optimizer step (``CheckpointManager.after_step``), which then saves that
  step and ends the run with :data:`~neuroprune_ds.distributed.EXIT_REQUEUE` (the sbatch scripts requeue on
  it);
- head pruning, before each attention block and before the FFN units: the trainer passes ``agreed`` as the
  pruner's ``should_stop``, the pass ends there (the blocks done stay pruned, the others are pruned at the
  next scheduled pass) and the step is saved right after;
- evaluation, before every batch, through :meth:`Preemption.check`, which raises :class:`Interrupted`: the
  trainer saves the step with the evaluation pending, and the resumed run evaluates it first.

Once agreed the decision stays taken, so every later point sees it without another collective.
"""

from __future__ import annotations

import signal

import torch

from neuroprune_ds.collectives import any_rank


class Interrupted(Exception):
    """Raised inside evaluation when every rank agreed to stop for a preemption signal."""


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; :meth:`agreed` turns it into a decision shared by all ranks.

    Args:
        device: where the all-reduced flag lives (the engine's device: NCCL needs a GPU tensor).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None
        self.stop = False
        self._previous = {}

    def install(self) -> None:
        """Install the handlers (main thread only); :meth:`uninstall` restores the previous ones."""
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank got a signal (collective: every rank must call it at the same point)."""
        if not self.stop:
            self.stop = any_rank(self.received is not None, self.device)
        return self.stop

    def check(self) -> None:
        """Raise :class:`Interrupted` when the ranks agree to stop (collective)."""
        if self.agreed():
            raise Interrupted
