"""Simple matplotlib figures of the doctor's results, and `write_figures` for `qwen3vl-lab doctor --report_dir`.

    fig = plot_comparison(report.comparison)     # KL per step, one line per prompt
    fig = plot_layers(report.layers)             # SQNR per layer: attn_out, mlp_out, hidden
    fig = plot_weights(report.weights)           # relative error per weight matrix
    fig = plot_sweep(result)                     # mean KL per recipe, best first

The step and layer figures are the notebooks' own (`viz/int4.py`); the weight and sweep figures are
drawn here. The doctor (`debug/`) computes, viz draws: debug never imports viz.
Figures are created detached from pyplot (`matplotlib.figure.Figure`), so nothing pops up or leaks.

The report folder may be the user's: a figure only replaces a file that qwen3vl-lab wrote there and that is
unchanged since (`.qwen3vl-lab-figures.json` records each one's SHA-256). A file or symlink of the user's
named like a figure is refused up front (`check_report_dir`), and each figure is written to a new file
(O_EXCL, random name) renamed into place, so no write ever goes through a symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from matplotlib.figure import Figure

from ..debug.compare import Comparison
from ..debug.layers import KINDS, LayerReport
from ..debug.weights import WeightReport
from ..errors import UserError
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


FIGURES = ("kl_per_step", "kl_first_prompt", "sqnr_per_tensor", "sqnr_per_layer", "weight_error", "sweep")
WRITTEN = ".qwen3vl-lab-figures.json"  # {file name: sha256} of the figures qwen3vl-lab wrote in a report folder
RECORD_LIMIT = 1 << 16  # bytes: a larger record is not ours


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _written(out: Path) -> dict:
    """The figures qwen3vl-lab wrote in `out` (name -> sha256); {} without a readable record of ours."""
    record = out / WRITTEN
    try:
        if record.is_symlink() or not record.is_file() or record.stat().st_size > RECORD_LIMIT:
            return {}
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _ours(path: Path, written: dict) -> bool:
    return not path.is_symlink() and path.is_file() and written.get(path.name) == _sha256(path)


def check_report_dir(out_dir: str | Path, name: str = "--report_dir") -> Path:
    """Refuse (one line) a report folder where a figure would replace a file or symlink qwen3vl-lab did not
    write there, or one changed since; call it before the work, so nothing is computed for nothing."""
    out = Path(out_dir)
    written = _written(out) if out.is_dir() else {}
    for figure in FIGURES:
        path = out / f"{figure}.png"
        if os.path.lexists(path) and not _ours(path, written):
            what = "a symlink" if path.is_symlink() else "a file qwen3vl-lab did not write (or one changed since)"
            raise UserError(f"{name} {out} already holds {path.name}, {what}; a report never replaces it: choose "
                            f"another {name} (a new or empty folder) or move {path.name} away")
    return out


def _write_new(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a new file (O_EXCL, O_NOFOLLOW, a random hidden name) and rename it to `path`: a rename replaces
    the name, never what a symlink there points at."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_figures(report=None, out_dir: str | Path = "report", sweep=None) -> list[Path]:
    """PNG files for a DoctorReport (and/or a SweepResult) in out_dir; returns their paths. Only files this
    toolkit wrote there are replaced (`check_report_dir`)."""
    out = check_report_dir(out_dir)
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
    paths, written = [], _written(out)
    for name, fig in figs.items():
        path = out / f"{name}.png"
        _write_new(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))
        written[path.name] = _sha256(path)
        paths.append(path)
    _write_new(out / WRITTEN, lambda f: f.write(json.dumps(written, indent=1).encode()))
    return paths


__all__ = ["plot_comparison", "plot_layers", "plot_sweep", "plot_weights", "write_figures"]
