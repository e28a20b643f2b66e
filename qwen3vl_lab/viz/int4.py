"""FP32 vs INT4: where the quantized model starts to drift, from the INT4 doctor's results.

    plot_step_divergence(teacher_forced(ref, test, prompt))   per step: KL(fp32 || int4) of the next-token distribution
    plot_layer_divergence(compare_layers(ref, test, prompt))  per layer: SQNR (dB) of attn_out / mlp_out / hidden
    plot_int4_summary(forced, layers)                         both side by side

Each takes the doctor's result object (`qwen3vl_lab.debug`: TeacherForced or Comparison, LayerReport)
or plain arrays: a KL value per step (with `top1_agree`), an SQNR value per layer/tensor (with `names`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
from .figure import COLORS, figure_of, new_figure

LAYER_KINDS = ("attn_out", "mlp_out", "hidden")  # the decoder tensors the doctor taps per layer


def _step_series(data, top1_agree, label) -> list[tuple[str | None, np.ndarray, np.ndarray | None]]:
    """-> [(label, kl (T,), top1_agree (T,) or None)] from a Comparison, a TeacherForced or an array."""
    if hasattr(data, "forced"):  # debug.compare.Comparison: every prompt
        return [(f.label, np.asarray(f.kl, np.float64), np.asarray(f.top1_agree, bool)) for f in data.forced]
    if hasattr(data, "kl") and hasattr(data, "top1_agree"):  # debug.compare.TeacherForced
        return [(data.label, np.asarray(data.kl, np.float64), np.asarray(data.top1_agree, bool))]
    kl = np.asarray(data, np.float64).reshape(-1)
    return [(label, kl, None if top1_agree is None else np.asarray(top1_agree, bool).reshape(-1))]


def plot_step_divergence(data, *, top1_agree: np.ndarray | None = None, labels: Sequence[str] | None = None,
                         ax=None, title: str | None = None):
    """KL divergence (nats) between the fp32 and INT4 next-token distributions at each step (log scale).

    data: a TeacherForced / Comparison from `qwen3vl_lab.debug`, or one KL value per step.
    Steps where the two models' most likely token differs are marked with an x.
    labels: tick labels per step (e.g. the reference tokens).
    """
    series = _step_series(data, top1_agree, None)
    if not series or all(len(kl) == 0 for _, kl, _ in series):
        raise UserError("no steps to plot; pass one KL value per step (or the doctor's teacher_forced result)")
    fig, ax = figure_of(ax, figsize=(6.4, 3.2))
    marked = False
    for name, kl, agree in series:
        x = np.arange(len(kl))
        line, = ax.semilogy(x, np.maximum(kl, 1e-12), "o-", markersize=4,
                            label=(name[:32] if name and len(series) > 1 else "KL(fp32 || int4)"))
        if agree is not None and (~agree).any():
            bad = np.flatnonzero(~agree)
            ax.plot(bad, np.maximum(kl[bad], 1e-12), "x", color=COLORS["chosen"], markersize=10, mew=2,
                    label=None if marked else "top-1 token differs")
            marked = True
    if labels is not None:
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels([repr(lab) for lab in labels], rotation=60, fontsize=7)
    ax.set_xlabel("step (0 = prefill), teacher forced on the fp32 tokens")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title or "fp32 vs int4: next-token divergence per step", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_layer_divergence(data, *, names: Sequence[str] | None = None, threshold_db: float | None = None,
                          ax=None, title: str | None = None):
    """SQNR (dB, higher = closer to fp32) per decoder layer, or per named tensor in graph order.

    data: a LayerReport from `qwen3vl_lab.debug` (one group of bars per layer: attn_out, mlp_out,
    hidden), or an array of SQNR values with their `names`. threshold_db: values below it in red.
    """
    if hasattr(data, "series"):  # debug.layers.LayerReport
        layers = np.asarray(data.layers)
        fig, ax = figure_of(ax, figsize=(max(6.0, 0.6 * len(layers) + 2.5), 3.4))
        width = 0.8 / len(LAYER_KINDS)
        for i, kind in enumerate(LAYER_KINDS):
            s = np.asarray(data.series(kind, "sqnr_db"), np.float64)
            ax.bar(layers + (i - 1) * width, np.where(np.isfinite(s), s, np.nan), width, label=kind,
                   color=(COLORS["prefill"], COLORS["decode"], COLORS["image"])[i])
        if threshold_db is not None:
            ax.axhline(threshold_db, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(layers)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("SQNR (dB)")
        ax.legend(fontsize=7, ncol=3)
        ax.set_title(title or "fp32 vs int4 per layer: SQNR of each layer's outputs (higher = closer)", fontsize=9)
        fig.tight_layout()
        return fig
    s = np.asarray(data, np.float64).reshape(-1)
    if s.size == 0:
        raise UserError("no layers to plot; pass one SQNR value per layer (or the doctor's compare_layers result)")
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


def plot_int4_summary(steps, layers, *, title: str | None = None):
    """Left: KL per step (`plot_step_divergence`); right: SQNR per layer (`plot_layer_divergence`)."""
    fig, (ax_s, ax_l) = new_figure(ncols=2, figsize=(12.0, 3.8))
    plot_step_divergence(steps, ax=ax_s)
    plot_layer_divergence(layers, ax=ax_l)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
