"""FP32 vs INT4: where the quantized model starts to drift, from the INT4 doctor's results.

    plot_step_divergence(teacher_forced(ref, test, prompt))   per step: KL(fp32 || int4) of the next-token distribution
    plot_layer_divergence(compare_layers(ref, test, prompt))  per layer: SQNR (dB) of attn_out / mlp_out / hidden
    plot_int4_summary(forced, layers)                         both side by side
    plot_recipe_accuracy(recipe_accuracy(root, recipes))      exact-match accuracy per recipe (SIMULATED ones hatched)
    plot_int4_block(weights, dequantized, scale, zero_point)  one 32-weight block: values, grid, rounded values, error

Each takes the doctor's result object (`qwen3vl_lab.debug`: TeacherForced or Comparison, LayerReport,
AccuracyResult) or plain arrays: a KL value per step (with `top1_agree`), an SQNR value per layer/tensor
(with `names`), an accuracy per recipe (with `labels`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

from ..errors import UserError
from ..stats import wilson_interval
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
                         ax=None, title: str | None = None, name: str = "int4"):
    """KL divergence (nats) between the fp32 and INT4 next-token distributions at each step (log scale).

    data: a TeacherForced / Comparison from `qwen3vl_lab.debug`, or one KL value per step.
    Steps where the two models' most likely token differs are marked with an x.
    labels: tick labels per step (e.g. the reference tokens). name: the test model in titles ("int4").
    """
    series = _step_series(data, top1_agree, None)
    if not series or all(len(kl) == 0 for _, kl, _ in series):
        raise UserError("no steps to plot; pass one KL value per step (or the doctor's teacher_forced result)")
    fig, ax = figure_of(ax, figsize=(6.4, 3.2))
    marked = False
    for label, kl, agree in series:
        x = np.arange(len(kl))
        line, = ax.semilogy(x, np.maximum(kl, 1e-12), "o-", markersize=4,
                            label=(label[:32] if label and len(series) > 1 else f"KL(fp32 || {name})"))
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
    ax.set_title(title or f"fp32 vs {name}: next-token divergence per step", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_layer_divergence(data, *, names: Sequence[str] | None = None, threshold_db: float | None = None,
                          ax=None, title: str | None = None, name: str = "int4"):
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
        ax.set_title(title or f"fp32 vs {name} per layer: SQNR of each layer's outputs (higher = closer)", fontsize=9)
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
    ax.set_title(title or f"fp32 vs {name} per layer: signal-to-quantization-noise ratio", fontsize=9)
    fig.tight_layout()
    return fig


def plot_int4_summary(steps, layers, *, title: str | None = None, name: str = "int4"):
    """Left: KL per step (`plot_step_divergence`); right: SQNR per layer (`plot_layer_divergence`).

    name: the test model in titles and legend (e.g. a recipe name)."""
    fig, (ax_s, ax_l) = new_figure(ncols=2, figsize=(12.0, 3.8))
    plot_step_divergence(steps, ax=ax_s, name=name)
    plot_layer_divergence(layers, ax=ax_l, name=name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


BITS_COLORS = {32: "#8c8c8c", 8: "#55a868", 4: "#4c72b0", 3: "#dd8452", 2: "#c44e52"}  # fp32 grey ... 2-bit red


def _accuracy_rows(data, labels, simulated, well_formed, bits):
    """-> (labels, accuracy (R,), simulated (R,) bool, well_formed (R,) or None, bits (R,) or None)."""
    if hasattr(data, "rows") and hasattr(data, "accuracy"):  # shapes.accuracy.AccuracyResult
        rows = data.rows
        return ([r.label for r in rows], data.accuracy("all"), np.array([r.simulated for r in rows]),
                np.asarray(data.well_formed, np.float64), np.array([r.bits for r in rows]))
    acc = np.asarray(data, np.float64).reshape(-1)
    if labels is None or len(labels) != len(acc):
        raise UserError(f"pass one label per accuracy value ({len(acc)} values), or the result of recipe_accuracy")
    sim = np.zeros(len(acc), bool) if simulated is None else np.asarray(simulated, bool).reshape(-1)
    names = [f"{lab} SIMULATED" if s and "SIMULATED" not in lab.upper() else lab for lab, s in zip(labels, sim)]
    return (names, acc, sim, None if well_formed is None else np.asarray(well_formed, np.float64).reshape(-1),
            None if bits is None else np.asarray(bits).reshape(-1))


def _intervals(data) -> np.ndarray | None:
    """(R, 2) 95% Wilson intervals of an AccuracyResult's rows (from their correct / total counts), else None."""
    rows = getattr(data, "rows", None)
    if not rows or not all(r.table and "all" in r.table for r in rows):
        return None
    return np.array([wilson_interval(r.table["all"]["correct"], r.table["all"]["total"]) for r in rows])


def plot_recipe_accuracy(data, *, labels: Sequence[str] | None = None, simulated=None, well_formed=None,
                         bits=None, reference: float | None = None, ax=None, title: str | None = None):
    """Exact-match accuracy per quantization recipe: one bar each, in the order given (top to bottom).

    data: an AccuracyResult (`qwen3vl_lab.shapes.accuracy.recipe_accuracy`), or accuracies in [0, 1]
    with their `labels` (and optionally `simulated` flags, `well_formed` shares, `bits`).
    Bar colour = bits (grey fp32, blue 4, orange 3, red 2); hatched bars are SIMULATED (fp32 weights
    rounded to the grid, what MatMulNBits cannot run) and say so in their label. A black diamond marks
    the share of well-formed answers (some answer of the task, right or wrong): a bar far left of its
    diamond is a model that still talks but errs; both far left is word salad. The dashed line is
    fp32's accuracy (`reference`, taken from the fp32 row of a result). A result's bars carry their 95% Wilson
    interval (`stats.wilson_interval` of each row's correct / total).
    """
    names, acc, sim, formed, nbits = _accuracy_rows(data, labels, simulated, well_formed, bits)
    if len(acc) == 0:
        raise UserError("no recipes to plot; pass one accuracy per recipe (or the result of recipe_accuracy)")
    if reference is None and hasattr(data, "rows"):
        ref = [a for r, a in zip(data.rows, acc) if r.kind == "fp32"]
        reference = ref[0] if ref else None
    fig, ax = figure_of(ax, figsize=(9.5, 0.36 * len(acc) + 1.5))
    y = np.arange(len(acc))[::-1]  # first recipe at the top
    colors = [BITS_COLORS.get(int(b), COLORS["prefill"]) if nbits is not None else COLORS["prefill"]
              for b in (nbits if nbits is not None else np.zeros(len(acc)))]
    for yi, a, c, s in zip(y, acc, colors, sim):
        ax.barh(yi, a, color=c, hatch="///" if s else None, edgecolor="white" if s else c, linewidth=0)
        ax.text(a + 0.01, yi + 0.22, f"{a:.0%}", va="center", fontsize=7)
    intervals = _intervals(data)
    if intervals is not None:  # the 95% Wilson interval of each accuracy: how sure a few dozen questions make it
        ax.errorbar(acc, y, xerr=np.abs(intervals - acc[:, None]).T, fmt="none", ecolor="black", elinewidth=0.8,
                    capsize=2)
    if formed is not None:
        ax.plot(formed, y, "D", color="black", markersize=4)
    if reference is not None:
        ax.axvline(reference, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlim(0, 1.08)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("exact-match accuracy (held-out shapes questions)")
    handles = [Patch(color=BITS_COLORS[b], label="fp32" if b == 32 else f"{b}-bit")
               for b in sorted(BITS_COLORS, reverse=True) if nbits is not None and b in set(int(v) for v in nbits)]
    if sim.any():
        handles.append(Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white", label="SIMULATED (rounded fp32)"))
    if formed is not None:
        handles.append(Line2D([], [], marker="D", color="black", linestyle="", markersize=4,
                              label="well-formed answers"))
    if reference is not None:
        handles.append(Line2D([], [], color="gray", linestyle="--", label="fp32"))
    if intervals is not None:
        handles.append(Line2D([], [], color="black", marker="|", linestyle="-", label="95% interval"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title or "answers per recipe: where quantization hurts and where it does not", fontsize=9)
    fig.tight_layout()
    return fig


def plot_int4_block(weights, dequantized, scale: float, zero_point: int, *, bits: int = 4, ax=None,
                    title: str | None = None):
    """One quantization block drawn: its fp32 weights, the grid of 2^bits levels (q - zero_point) * scale, where each
    weight rounds to, and the rounding error (never more than half a step, |scale| / 2, inside the grid).

    weights (L,) fp32 values of one block (32 for `export --precision int4`); dequantized (L,) what the kernel
    multiplies by (e.g. `debug.weights.dequantize` of the stored codes); scale and zero_point as stored.
    """
    w = np.asarray(weights, np.float64).reshape(-1)
    wq = np.asarray(dequantized, np.float64).reshape(-1)
    if w.shape != wq.shape or w.size == 0:
        raise UserError(f"weights {w.shape} and dequantized {wq.shape} must be the same block of values")
    levels = (np.arange(2 ** bits) - zero_point) * scale  # the grid: every value a code can stand for
    if ax is None:
        fig, (ax_v, ax_e) = new_figure(nrows=2, figsize=(10.0, 5.6), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1.2]})
    else:
        fig, ax_v, ax_e = ax.figure, ax, None
    x = np.arange(w.size)
    for v in levels:
        ax_v.axhline(v, color="#dddddd", linewidth=0.8, zorder=0)
    ax_v.vlines(x, w, wq, color=COLORS["chosen"], linewidth=1.2, zorder=1)
    ax_v.plot(x, w, "o", color=COLORS["prefill"], markersize=5, label="fp32 weight", zorder=2)
    ax_v.plot(x, wq, "_", color="black", markersize=12, mew=2, label="rounded: (q - zero point) x scale", zorder=3)
    ax_v.set_ylabel("weight value")
    ax_v.legend(fontsize=7, loc="upper right", ncol=2)
    codes = np.rint(wq / scale + zero_point).astype(int) if scale else np.full(w.size, zero_point)
    for xi, q in zip(x, codes):
        ax_v.annotate(str(q), (xi, wq[xi]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6)
    ax_v.set_title(title or (f"one {w.size}-weight block at {bits} bits: {2 ** bits} levels (grey lines), scale "
                             f"{scale:.3g}, zero point {zero_point}; the number is the stored code q"), fontsize=9)
    if ax_e is not None:
        ax_e.bar(x, w - wq, color=COLORS["chosen"], width=0.7)
        ax_e.axhline(abs(scale) / 2, color="gray", linestyle="--", linewidth=1)
        ax_e.axhline(-abs(scale) / 2, color="gray", linestyle="--", linewidth=1)
        ax_e.set_ylabel("error\n(fp32 - rounded)")
        ax_e.set_xlabel("weight index in the block (32 consecutive inputs of one output column)")
        ax_e.text(w.size - 0.5, abs(scale) / 2, " half a step", fontsize=7, va="bottom", ha="right", color="gray")
    fig.tight_layout()
    return fig
