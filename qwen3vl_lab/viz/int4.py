"""FP32 vs INT4: where the quantized model starts to drift (from the INT4 doctor's numbers).

    plot_step_divergence(kl, top1_agree=...)     per decode step: KL(fp32 || int4) of the next-token distribution
    plot_layer_divergence(sqnr_db, names=...)    per layer: signal-to-quantization-noise ratio in dB

Both take plain arrays, so they work with any source of the numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
from .figure import COLORS, figure_of


def plot_step_divergence(kl: np.ndarray, *, top1_agree: np.ndarray | None = None, labels: Sequence[str] | None = None,
                         ax=None, title: str | None = None):
    """KL divergence (nats) between the fp32 and INT4 next-token distributions at each step (log scale).

    top1_agree (N,) bool: steps where the two models' most likely token differs are marked with a red x.
    """
    kl = np.asarray(kl, np.float64).reshape(-1)
    if kl.size == 0:
        raise UserError("no steps to plot; pass one KL value per step")
    fig, ax = figure_of(ax, figsize=(6.4, 3.2))
    x = np.arange(len(kl))
    ax.semilogy(x, np.maximum(kl, 1e-12), "o-", color=COLORS["prefill"], label="KL(fp32 || int4)")
    if top1_agree is not None:
        bad = np.flatnonzero(~np.asarray(top1_agree, bool).reshape(-1))
        if len(bad):
            ax.plot(bad, np.maximum(kl[bad], 1e-12), "x", color=COLORS["chosen"], markersize=10, mew=2,
                    label="top-1 token differs")
    if labels is not None:
        ax.set_xticks(x)
        ax.set_xticklabels([repr(lab) for lab in labels], rotation=60, fontsize=7)
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title or "fp32 vs int4: next-token distribution divergence per step", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_layer_divergence(sqnr_db: np.ndarray, *, names: Sequence[str] | None = None, threshold_db: float | None = None,
                          ax=None, title: str | None = None):
    """SQNR (dB, higher = closer to fp32) of each compared tensor, in graph order; below threshold in red."""
    s = np.asarray(sqnr_db, np.float64).reshape(-1)
    if s.size == 0:
        raise UserError("no layers to plot; pass one SQNR value per layer")
    fig, ax = figure_of(ax, figsize=(max(6.0, 0.22 * len(s) + 2), 3.4))
    x = np.arange(len(s))
    colors = [COLORS["chosen"] if threshold_db is not None and v < threshold_db else COLORS["prefill"] for v in s]
    ax.bar(x, s, color=colors)
    if threshold_db is not None:
        ax.axhline(threshold_db, color="gray", linestyle="--", linewidth=1)
    if names is not None:
        if len(names) != len(s):
            raise UserError(f"{len(names)} names for {len(s)} values; pass one name per value")
        ax.set_xticks(x)
        ax.set_xticklabels(list(names), rotation=75, fontsize=6)
    ax.set_xlabel("layer / tensor (graph order)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title or "fp32 vs int4 per layer: signal-to-quantization-noise ratio", fontsize=9)
    fig.tight_layout()
    return fig
