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
after the optimizer step. A weight then stays at (or heads to) zero when that threshold exceeds the distance
the optimizer step moves it, |delta w_ij|, so the ratio is r_ij = |delta w_ij| / (lr * lambda * f_i): the same
quantile rule, measured on the optimizer's own (Adam-normalised) displacement instead of the raw gradient.
"""

from __future__ import annotations

import math

import torch

from neuroprune_ds.flat_slice import ROW, FlatSlice

LOG_MIN, LOG_MAX, BINS = -12.0, 12.0, 480  # 0.05-decade bins over 1e-12 .. 1e12
SMOOTHING = 0.2
INTEGRAL_LIMIT = 3.0  # the integral term moves the scale by at most e^3 either way
SAMPLE_STRIDE = 29
HORIZON = 30  # steps: weights already on their way to zero keep going; aim at where sparsity will be then


def add_ratio_histogram_(hist: torch.Tensor, grad: torch.Tensor, piece: FlatSlice, axis: str,
                         inverse_penalty: torch.Tensor, stride: int = SAMPLE_STRIDE) -> None:
    """Add the log10 histogram of r = |grad| * inverse_penalty[group] of a local shard into ``hist``.

    Only every ``stride``-th element is sampled (a quantile needs a sample, not every weight; the prime
    stride does not alias with power-of-two row widths), so this costs a small fraction of a pass.

    Args:
        hist: float64 (BINS,) accumulator.
        grad: the local task-gradient shard (1-D), read only.
        piece: its slice of the parameter.
        axis: the group axis of this parameter.
        inverse_penalty: 1 / (lambda * f) per group.
        stride: sampling stride.
    """
    add_sampled_ratio_histogram_(hist, grad[::stride].abs(), piece, axis, inverse_penalty, stride)


def add_sampled_ratio_histogram_(hist: torch.Tensor, magnitude: torch.Tensor, piece: FlatSlice, axis: str,
                                 inverse_penalty: torch.Tensor, stride: int = SAMPLE_STRIDE) -> None:
    """As :func:`add_ratio_histogram_`, given ``magnitude`` = |x|[::stride] of a local shard x already sampled."""
    flat_index = torch.arange(0, magnitude.numel(), device=magnitude.device) * stride + piece.offset
    group = flat_index // piece.cols if axis == ROW else flat_index % piece.cols
    ratio = magnitude.double() * inverse_penalty.to(magnitude.device)[group]
    position = (torch.log10(ratio).clamp_(LOG_MIN, LOG_MAX) - LOG_MIN) * (BINS / (LOG_MAX - LOG_MIN))
    hist += torch.bincount(position.long().clamp_(0, BINS - 1), minlength=BINS).to(hist)


def fraction_below(hist: torch.Tensor, scale: float) -> float:
    """The fraction of the histogrammed ratios below ``scale`` (whole bins: those whose upper edge is <= it)."""
    total = float(hist.sum())
    if total == 0:
        return 0.0
    full_bins = int((math.log10(scale) - LOG_MIN) * BINS / (LOG_MAX - LOG_MIN))
    return float(hist[:min(max(full_bins, 0), BINS)].sum()) / total


def quantile_scale(hist: torch.Tensor, fraction: float) -> float:
    """The smallest scale s such that at least ``fraction`` of the histogrammed ratios are below s."""
    total = float(hist.sum())
    if total == 0:
        return 1.0
    cumulative = torch.cumsum(hist, dim=0)
    index = int(torch.searchsorted(cumulative, torch.tensor(min(max(fraction, 0.0), 1.0) * total,
                                                            dtype=cumulative.dtype, device=cumulative.device)))
    index = min(index, BINS - 1)
    upper_edge = LOG_MIN + (index + 1) * (LOG_MAX - LOG_MIN) / BINS
    return 10.0 ** upper_edge


class SparsityController:
    """The lambda scale for a target sparsity: a smoothed feed-forward quantile times an integral correction.

    Args:
        gain: how fast the integral term reacts to (target - measured), per step.
    """

    def __init__(self, gain: float):
        self.gain = gain
        self.log_feedforward: float | None = None
        self.integral = 0.0
        self.previous: float | None = None
        self.rate = 0.0
        self.pushed_fraction = 0.0  # of the last step's sampled weights, those the penalty outweighs at its scale

    def update(self, hist: torch.Tensor | None, needed_fraction: float, target: float, measured: float) -> float:
        """One step; returns the new lambda scale.

        Args:
            hist: summed histogram of log10 ratios of all penalised weights (None: keep the feed-forward term).
            needed_fraction: fraction of penalised weights that must be zero to reach ``target``.
            target: the sparsity wanted now.
            measured: the sparsity measured now.
        """
        if self.previous is not None:
            self.rate += SMOOTHING * ((measured - self.previous) - self.rate)
        self.previous = measured
        ahead = HORIZON * max(self.rate, 0.0)  # sparsity that weights in flight will still add
        if hist is not None and float(hist.sum()) > 0:
            log_now = math.log(quantile_scale(hist, needed_fraction - ahead))
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
