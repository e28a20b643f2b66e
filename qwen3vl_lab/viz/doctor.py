"""Simple matplotlib figures of the doctor's results, and `write_figures` for `qwen3vl-lab doctor --report_dir`.

    fig = plot_comparison(report.comparison)     # KL per step, one line per prompt
    fig = plot_layers(report.layers)             # SQNR per layer: attn_out, mlp_out, hidden
    fig = plot_weights(report.weights)           # relative error per weight matrix
    fig = plot_sweep(result)                     # mean KL per recipe, best first

The step and layer figures are the notebooks' own (`viz/int4.py`); the weight and sweep figures are
drawn here. The doctor (`debug/`) computes, viz draws: debug never imports viz.
Figures are created detached from pyplot (`matplotlib.figure.Figure`), so nothing pops up or leaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..debug.compare import Comparison
from ..debug.layers import KINDS, LayerReport
from ..debug.weights import WeightReport
from .int4 import plot_layer_divergence, plot_step_divergence


def _figure(figsize=(7.0, 3.6)):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def plot_comparison(cmp: Comparison):
    """KL(P_ref || P_test) per step for each prompt (log scale); x marks steps whose top-1 token differs."""
    fig, ax = _figure()
    for f in cmp.forced:
        line, = ax.semilogy(f.steps, np.maximum(f.kl, 1e-12), "o-", markersize=3, label=f.label[:30])
        bad = ~f.top1_agree
        ax.plot(f.steps[bad], np.maximum(f.kl[bad], 1e-12), "x", color=line.get_color(), markersize=8)
    ax.set_xlabel("generated step")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"next-token KL vs reference (mean {cmp.mean_kl:.3g}, top-1 agreement {cmp.agreement:.0%}); x = top-1 differs",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_layers(report: LayerReport):
    """SQNR (dB, higher = closer to the reference) per layer for each captured tensor kind."""
    fig, ax = _figure()
    for kind in KINDS:
        s = report.series(kind, "sqnr_db")
        ax.plot(report.layers, np.where(np.isfinite(s), s, np.nan), "o-", label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("SQNR (dB)")
    ax.set_xticks(report.layers)
    ax.set_title(f"where the error grows: {report.label[:40]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_weights(report: WeightReport):
    """Relative error |W - dequant(Wq)| / |W| of every quantized matrix, in graph order."""
    fig, ax = _figure((max(7.0, 0.25 * len(report.rows) + 2), 3.8))
    x = np.arange(len(report.rows))
    ax.bar(x, report.rel_error, color="#4c72b0")
    ax.set_xticks(x)
    ax.set_xticklabels(report.names, rotation=80, fontsize=6)
    ax.set_ylabel("relative error")
    ax.set_title("weight error per matrix (dequantized MatMulNBits vs fp32)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_sweep(result):
    """Mean KL vs fp32 per recipe (best at the top), with top-1 agreement written next to each bar."""
    fig, ax = _figure((8.0, 0.4 * len(result.rows) + 1.4))
    y = np.arange(len(result.rows))[::-1]
    ax.barh(y, result.mean_kl, color="#4c72b0")
    for yi, r in zip(y, result.rows):
        ax.text(r.mean_kl, yi, f"  top-1 {r.agreement:.0%}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(result.names, fontsize=7)
    ax.set_xlabel("mean KL(fp32 || variant), nats")
    ax.set_title("INT4 recipe sweep (lower is closer to fp32)", fontsize=9)
    fig.tight_layout()
    return fig


def _viz_steps(cmp: Comparison):
    f = cmp.forced[0]
    return plot_step_divergence(f.kl, top1_agree=f.top1_agree, title=f"KL per step: {f.label[:40]}")


def _viz_layers(report: LayerReport):
    rows = [r for r in report.rows if np.isfinite(r.sqnr_db)]
    return plot_layer_divergence(np.array([r.sqnr_db for r in rows]), names=[r.name for r in rows])


def write_figures(report=None, out_dir: str | Path = "report", sweep=None) -> list[Path]:
    """PNG files for a DoctorReport (and/or a SweepResult) in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    if report is not None:
        figs["kl_per_step"] = plot_comparison(report.comparison)
        try:
            figs["kl_first_prompt"] = _viz_steps(report.comparison)
            if report.layers is not None and any(np.isfinite(r.sqnr_db) for r in report.layers.rows):
                figs["sqnr_per_tensor"] = _viz_layers(report.layers)
        except ImportError:
            pass
        if report.layers is not None:
            figs["sqnr_per_layer"] = plot_layers(report.layers)
        if report.weights is not None and report.weights.rows:
            figs["weight_error"] = plot_weights(report.weights)
    if sweep is not None:
        figs["sweep"] = plot_sweep(sweep)
    paths = []
    for name, fig in figs.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


__all__ = ["plot_comparison", "plot_layers", "plot_sweep", "plot_weights", "write_figures"]
