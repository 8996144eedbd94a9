"""Target-sparsity control: choose the lambda scale so that training lands at a requested weight sparsity.

Why not a plain integral controller on the measured sparsity: with Adam, a weight whose penalty gradient
outweighs its task gradient drifts to zero at about ``lr`` per step whatever lambda is, so the measured
sparsity lags lambda by hundreds of steps and an integral controller winds up and overshoots (measured
here: target 50% -> 64% and still rising on a tiny LLaMA).

Instead the controller predicts where the weights are heading. A penalised weight w_ij with task gradient
g_ij and penalty gradient lambda * f_i (f_i: its group's degree weight omega_i or attention scale) is pushed
to zero when scale * lambda * f_i > |g_ij|. So the predicted sparsity at ``scale`` is the fraction of
weights with r_ij = |g_ij| / (lambda * f_i) < scale, and the scale that reaches a target is a quantile of r.
Each rank histograms log10(r) of its shard (fixed bins, so histograms add up across ranks in the same
all-reduce as the other statistics); the quantile is smoothed over steps, and a small bounded integral
term removes the remaining offset between predicted and measured sparsity.

With ``update: decoupled`` the penalty is not in the gradient but a soft threshold at lr * scale * lambda * f_i
after the optimizer step. A weight at zero stays there when that threshold exceeds the distance the optimizer
step moves it, |delta w_ij|; a weight of magnitude |w_ij| reaches zero within H steps only when it exceeds
|delta w_ij| + |w_ij| / H. So the ratio is r_ij = (|delta w_ij| + |w_ij| / H) / (lr * lambda * f_i) (w_ij after
the optimizer step; the |w| term only for weights that were not zero before it): the same quantile rule, on
the optimizer's own (Adam-normalised) displacement plus the share of the weight the steps left must remove.
H is the steps left until the target ramp ends, and 1 after it (see :func:`decoupled_horizon`); the quantile is
taken at the sparsity wanted when H ends, the full target (the integral term still compares the measured
sparsity with the ramp's target now). Weights in flight are counted by their |w| / H, so the gradient mode's
allowance for them (HORIZON) is 0 here.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch

from neuroprune_ds.flat_slice import ROW, FlatSlice

LOG_MIN, LOG_MAX, BINS = -12.0, 12.0, 480  # 0.05-decade bins over 1e-12 .. 1e12
SMOOTHING = 0.2
INTEGRAL_LIMIT = 3.0  # the integral term moves the scale by at most e^3 either way
SAMPLE_STRIDE = 29
HORIZON = 30  # steps: weights already on their way to zero keep going; aim at where sparsity will be then


def decoupled_horizon(ramp_steps: int, optimizer_steps: int) -> int:
    """H of the decoupled ratio at the step after ``optimizer_steps``: the steps left until the target ramp ends,
    this one included. After the ramp it stays 1, where the ramp's last step left it: the threshold must then
    bring the sparsity to the target at this very step (the weights already at zero, held by |delta w| alone,
    fill the quantile first, so once there the rule only holds it), while a longer horizon would divide the
    |w| term by it at the ramp's end and slow a run still short of its target just when it has few steps left."""
    return max(ramp_steps - optimizer_steps, 1)


def decoupled_drive(before: torch.Tensor, after: torch.Tensor, horizon: int) -> torch.Tensor:
    """|delta w| + |w after| / H per sampled weight, the |w| term only where the weight was not zero before the
    optimizer step: the per-step threshold that brings it to zero within ``horizon`` steps (or holds it there)."""
    reach = after.abs().div_(horizon).masked_fill_(before == 0, 0)
    return reach.add_((after - before).abs())


def sampled_inverse(piece: FlatSlice, axis: str, inverse_penalty: torch.Tensor, count: int, device,
                    stride: int = SAMPLE_STRIDE) -> torch.Tensor:
    """inverse_penalty[group] (float64) of the first ``count`` elements at every ``stride``-th position of a
    local shard, on ``device``.

    A quantile needs a sample, not every weight; the prime stride does not alias with power-of-two row
    widths, so this costs a small fraction of a pass.

    Args:
        piece: the shard's slice of the parameter.
        axis: the group axis of this parameter.
        inverse_penalty: 1 / (lambda * f) per group.
        count: how many elements were sampled.
        device: where the result lives.
        stride: the sampling stride.
    """
    flat_index = torch.arange(piece.offset, piece.offset + count * stride, stride, device=device)
    group = flat_index // piece.cols if axis == ROW else flat_index % piece.cols
    return inverse_penalty.to(device)[group]


def sampled_ratios(sampled: torch.Tensor, piece: FlatSlice, axis: str, inverse_penalty: torch.Tensor,
                   stride: int = SAMPLE_STRIDE) -> torch.Tensor:
    """r = |x| * inverse_penalty[group] (float64) at every ``stride``-th element of a local shard x, from
    ``sampled = x[::stride]`` (1-D: the task gradient, or the decoupled mode's drive), on its device
    (see :func:`sampled_inverse`)."""
    return sampled.abs() * sampled_inverse(piece, axis, inverse_penalty, sampled.numel(), sampled.device, stride)


def add_histogram_(hist: torch.Tensor, ratios: torch.Tensor) -> None:
    """Add the log10 histogram (BINS fixed bins over 10^LOG_MIN .. 10^LOG_MAX) of ``ratios`` into ``hist``."""
    position = (torch.log10(ratios).clamp_(LOG_MIN, LOG_MAX) - LOG_MIN) * (BINS / (LOG_MAX - LOG_MIN))
    hist += torch.bincount(position.long().clamp_(0, BINS - 1), minlength=BINS).to(hist)


def add_ratio_histogram_(hist: torch.Tensor, grad: torch.Tensor, piece: FlatSlice, axis: str,
                         inverse_penalty: torch.Tensor, stride: int = SAMPLE_STRIDE) -> None:
    """Add the log10 histogram of the :func:`sampled_ratios` of one local shard ``grad`` into ``hist``
    (float64 (BINS,))."""
    add_histogram_(hist, sampled_ratios(grad[::stride], piece, axis, inverse_penalty, stride))


def _values(hist: torch.Tensor | list[float]) -> list[float]:
    return hist.tolist() if torch.is_tensor(hist) else hist


def fraction_below(hist: torch.Tensor | list[float], scale: float) -> float:
    """The fraction of the histogrammed ratios below ``scale`` (whole bins: those whose upper edge is <= it)."""
    counts = _values(hist)
    total = math.fsum(counts)
    if total == 0:
        return 0.0
    full_bins = int((math.log10(scale) - LOG_MIN) * BINS / (LOG_MAX - LOG_MIN))
    return math.fsum(counts[:min(max(full_bins, 0), BINS)]) / total


def quantile_scale(hist: torch.Tensor | list[float], fraction: float) -> float:
    """The smallest scale s such that at least ``fraction`` of the histogrammed ratios are below s."""
    cumulative = list(itertools.accumulate(_values(hist)))
    total = cumulative[-1]
    if total == 0:
        return 1.0
    index = min(bisect.bisect_left(cumulative, min(max(fraction, 0.0), 1.0) * total), BINS - 1)
    upper_edge = LOG_MIN + (index + 1) * (LOG_MAX - LOG_MIN) / BINS
    return 10.0 ** upper_edge


class SparsityController:
    """The lambda scale for a target sparsity: a smoothed feed-forward quantile times an integral correction.

    Args:
        gain: how fast the integral term reacts to (target - measured), per step.
        horizon: the steps over which weights already heading to zero are expected to keep adding sparsity
            (HORIZON in gradient mode). 0 in decoupled mode: its ratios count the weights in flight already.
    """

    def __init__(self, gain: float, horizon: int = HORIZON):
        self.gain = gain
        self.horizon = horizon
        self.log_feedforward: float | None = None
        self.integral = 0.0
        self.previous: float | None = None
        self.rate = 0.0
        self.pushed_fraction = 0.0  # of the last step's sampled weights, those the penalty outweighs at its scale

    def update(self, hist: torch.Tensor | list[float] | None, target: float, measured: float,
               aim: float | None = None) -> float:
        """One step; returns the new lambda scale.

        Args:
            hist: summed histogram of log10 ratios of all penalised weights, as a tensor or its values on the
                host (None: keep the feed-forward term).
            target: the sparsity wanted now, the fraction of penalised weights that must be zero.
            measured: the sparsity measured now.
            aim: the sparsity the histogram's ratios are to reach at their horizon, where the quantile is taken
                (default ``target``). Decoupled mode aims at the ramp's end, where its H ends.
        """
        if self.previous is not None:
            self.rate += SMOOTHING * ((measured - self.previous) - self.rate)
        self.previous = measured
        ahead = self.horizon * max(self.rate, 0.0)  # sparsity that weights in flight will still add
        hist = None if hist is None else _values(hist)
        if hist is not None and math.fsum(hist) > 0:
            log_now = math.log(quantile_scale(hist, (target if aim is None else aim) - ahead))
            if self.log_feedforward is None:
                self.log_feedforward = log_now
            self.log_feedforward += SMOOTHING * (log_now - self.log_feedforward)
        error = target - (measured + ahead)
        self.integral = min(INTEGRAL_LIMIT, max(-INTEGRAL_LIMIT, self.integral + self.gain * error))
        scale = math.exp((self.log_feedforward or 0.0) + self.integral)
        if hist is not None:
            self.pushed_fraction = fraction_below(hist, scale)
        return scale

    def state_dict(self) -> dict:
        return {"log_feedforward": self.log_feedforward, "integral": self.integral, "previous": self.previous,
                "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.log_feedforward = state["log_feedforward"]
        self.integral = state["integral"]
        self.previous = state["previous"]
        self.rate = state["rate"]
