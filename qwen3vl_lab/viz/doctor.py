"""Simple matplotlib figures of the doctor's results, and `write_figures` for `qwen3vl-lab doctor --report_dir`.

    fig = plot_comparison(report.comparison)     # KL per step, one line per prompt
    fig = plot_layers(report.layers)             # SQNR per layer: attn_out, mlp_out, hidden
    fig = plot_weights(report.weights)           # relative error per weight matrix
    fig = plot_sweep(result)                     # mean KL per recipe, best first

    trace = record_doctor_trace(fp32, int4, "Write a haiku about the sea.", candidates=[...])
    doctor_figure(trace, step=3, matmul="layers.1.mlp.down_proj", candidate="repaired")   # DoctorExplorer's view

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..debug.compare import Comparison, kl_divergence
from ..debug.export_checks import answer_probe
from ..debug.layers import KINDS, LayerReport, capture, matmul_inputs, relative_error
from ..debug.weights import WeightReport, short_name
from ..errors import UserError
from ..model import Model
from ..stats import wilson_interval
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


def plot_repair(report):
    """`repair`'s candidates as a Pareto picture: held-out accuracy (with its 95% interval) against the decoder's
    size on disk, each point labelled with its decode tok/s; fp32 as a line, the winner ringed. A candidate
    without a held-out score (no scorer) is drawn at its top-1 agreement with fp32 instead, and the axis says so."""
    rows = [r for r in report.rows if r.error is None]
    scored = all(r.total for r in rows)
    fig, ax = _figure((7.0, 3.8))
    for i, r in enumerate(sorted(rows, key=lambda r: r.decoder_bytes)):
        mb = r.decoder_bytes / 1e6
        if scored:
            low, high = wilson_interval(r.correct, r.total)
            y, err = r.accuracy, [[max(0.0, r.accuracy - low)], [max(0.0, high - r.accuracy)]]  # rounding at 0 / 100%
        else:
            y, err = r.top1, None
        winner = r.name == report.winner
        ax.errorbar(mb, y, yerr=err, fmt="o", ms=9 if winner else 6, capsize=3,
                    color="#c44e52" if winner else "#4c72b0", mfc="none" if winner else None)
        ax.annotate(f"{r.name}\n{r.decode_tok_s:.0f} tok/s", (mb, y), textcoords="offset points",
                    xytext=(8, -22 if i % 2 else 4), fontsize=7)  # alternate: candidates of one size stand close
    if scored and report.fp32_accuracy is not None:
        ax.axhline(report.fp32_accuracy, color="0.4", ls="--", lw=1)
        ax.text(ax.get_xlim()[1], report.fp32_accuracy, "fp32 ", ha="right", va="bottom", fontsize=7, color="0.3")
    ax.set_xlabel("decoder on disk, MB")
    ax.set_ylabel("held-out accuracy (95% CI)" if scored else "top-1 agreement with fp32")
    ax.set_ylim(-0.12, 1.08)
    ax.margins(x=0.2)
    ax.set_title(f"repair candidates (ringed: the winner, {report.winner})", fontsize=9)
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


# -- the DoctorExplorer's record ------------------------------------------------------------------------
OUTLIER_RATIO = 16.0  # a channel whose largest |x| over the answer is >= 16x the median channel's is drawn as an outlier


@dataclass
class CandidateAnswers:
    """One model's answers to the explorer's questions (a repair candidate, a recipe, fp32 itself)."""

    name: str
    answers: list[str]  # one per question, in the order of DoctorTrace.questions
    accuracy: float | None = None  # share of right answers where there is a key (the shapes model), else None
    nbytes: int | None = None  # decoder weights on disk
    tok_s: float | None = None  # decode tokens per second


@dataclass
class DoctorTrace:
    """fp32 vs a tested model on one answer, recorded once (teacher forced on fp32's greedy answer): the widget
    only indexes these arrays.

    step s is the s-th answer token: fp32 chose tokens[s]; the tested model's top-1 there is test_tokens[s]."""

    prompt: str
    labels: list[str]  # (n,) fp32's answer tokens as text
    tokens: np.ndarray  # (n,) fp32's greedy answer
    test_tokens: np.ndarray  # (n,) the tested model's top-1 at each answer position
    test_labels: list[str]
    kl: np.ndarray  # (n,) KL(fp32 || test) of the next-token distributions
    layer_error: np.ndarray  # (n, L) |h_fp32 - h_test| / |h_fp32| of the residual stream after each layer, per step
    matmuls: list[str]  # the weight MatMuls whose inputs are recorded, e.g. "layers.1.mlp.down_proj"
    channels: dict[str, np.ndarray]  # matmul -> (n, K) |x| of its fp32 input per channel at each step
    outliers: dict[str, tuple[int, ...]]  # matmul -> channels >= OUTLIER_RATIO x the median (largest |x| over the answer)
    questions: list[str] = field(default_factory=list)
    reference: list[str] = field(default_factory=list)  # fp32's answers to the questions
    candidates: dict[str, CandidateAnswers] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(self.tokens)

    def ratio(self, matmul: str) -> float:
        m = self.channels[matmul].max(axis=0)  # (K,)
        med = float(np.median(m))
        return float(m.max() / med) if med > 0 else float("inf")


def _outliers(x: np.ndarray) -> tuple[int, ...]:
    """Channels whose largest |x| is >= OUTLIER_RATIO x the median channel's, largest first. x: (n, K)."""
    m = x.max(axis=0)
    med = float(np.median(m))
    return tuple(int(k) for k in np.argsort(-m) if med > 0 and m[k] >= OUTLIER_RATIO * med)


def record_doctor_trace(reference: Model, test: Model, prompt: str = "Write a haiku about the sea.", n_steps: int = 8,
                        *, questions: Sequence[str] = (), reference_answers: Sequence[str] = (),
                        candidates: Sequence[CandidateAnswers] = ()) -> DoctorTrace:
    """Run fp32's greedy answer to `prompt` through both models, teacher forced, with the residual stream after
    every layer and every weight MatMul's input tapped (inputs of the reference only: the tested model's are the
    same up to its own drift). MatMuls reading one tensor (q/k/v, gate/up) are recorded once, under the first."""
    probe = answer_probe(reference, prompt, n_steps)
    forced = [int(t) for t in probe.tokens[:-1]]
    layers = reference.config.text.num_hidden_layers
    hidden = [f"layers.{i}.hidden" for i in range(layers)]
    inputs: dict[str, str] = {}
    for _, tensor, weight, _, _ in matmul_inputs(reference.graph()):
        name = short_name(weight)
        if ".layers." in f".{name}" and tensor not in inputs.values():
            inputs[name] = tensor
    ref = capture(reference, prompt, [*hidden, *inputs.values()], tokens=forced)
    got = capture(test, prompt, [*hidden, "logits"], tokens=forced)
    rows = slice(-probe.n, None)  # the answer positions
    test_logits = got["logits"][0, rows] if got["logits"].ndim == 3 else got["logits"][rows]  # (n, V)
    errors = np.array([[relative_error(ref[h][0, r], got[h][0, r]) for h in hidden]
                       for r in range(ref[hidden[0]].shape[1] - probe.n, ref[hidden[0]].shape[1])])  # (n, L)
    channels = {m: np.abs(ref[t][0, rows]).astype(np.float32) for m, t in inputs.items()}  # (n, K)
    tok = reference.tokenizer
    test_tokens = test_logits.argmax(-1)
    return DoctorTrace(prompt, [tok.decode([int(t)]) for t in probe.tokens], probe.tokens, test_tokens,
                       [tok.decode([int(t)]) for t in test_tokens], kl_divergence(probe.logits, test_logits), errors,
                       list(inputs), channels, {m: _outliers(x) for m, x in channels.items()}, list(questions),
                       list(reference_answers), {c.name: c for c in candidates})


def doctor_figure(trace: DoctorTrace, step: int, matmul: str | None = None, candidate: str | None = None):
    """One answer step of fp32 vs the tested model: KL per step (this one marked), the residual stream's error per
    layer at this step, |x| per input channel of one MatMul at this step (outlier channels in red), and a repair
    candidate's answers beside fp32's."""
    from .figure import new_figure  # noqa: PLC0415 (pyplot only when drawing)

    if not 0 <= step < trace.n_steps:
        raise UserError(f"step {step} is out of range; the answer has steps 0..{trace.n_steps - 1}")
    matmul = matmul or max(trace.matmuls, key=trace.ratio)
    if matmul not in trace.channels:
        raise UserError(f"no MatMul {matmul!r} recorded; choose one of {', '.join(trace.matmuls[:6])} ...")
    fig, axes = new_figure(nrows=2, ncols=2, figsize=(13.0, 7.6))
    ax = axes[0, 0]
    x = np.arange(trace.n_steps)
    differ = trace.tokens != trace.test_tokens
    ax.bar(x, trace.kl, color=np.where(differ, "#c44e52", "#4c72b0"))
    ax.bar([step], [trace.kl[step]], fill=False, edgecolor="black", linewidth=2)
    ax.set_xticks(x)
    ax.set_xticklabels([repr(t)[1:-1][:8] for t in trace.labels], rotation=60, fontsize=7)
    ax.set_ylabel("KL(fp32 || test), nats")
    ax.set_title(f"step {step}: fp32 says {trace.labels[step]!r}, the tested model {trace.test_labels[step]!r} "
                 "(red: top-1 differs)", fontsize=9)
    ax = axes[0, 1]
    err = trace.layer_error[step]
    ax.bar(np.arange(err.size), err, color="#55a868")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the residual stream")
    ax.set_xticks(np.arange(err.size))
    ax.set_title(f"step {step}: where the error grows (layer {int(np.argmax(np.diff(err, prepend=0.0)))} adds most)",
                 fontsize=9)
    ax = axes[1, 0]
    xs = trace.channels[matmul][step]
    out = list(trace.outliers[matmul])
    ax.bar(np.arange(xs.size), xs, color="#8c8c8c", width=1.0)
    if out:
        ax.bar(out, xs[out], color="#c44e52", width=max(1.0, xs.size / 200))
    ax.set_yscale("symlog", linthresh=max(float(np.median(xs)), 1e-6))
    ax.set_xlabel("input channel")
    ax.set_ylabel("|x| (fp32)")
    ax.set_title(f"{matmul} input at step {step}: {len(out)} outlier channel(s) {out[:4]} (red), "
                 f"max {trace.ratio(matmul):.0f}x the median", fontsize=9)
    ax = axes[1, 1]
    ax.axis("off")
    if trace.candidates:
        c = trace.candidates.get(candidate) or next(iter(trace.candidates.values()))
        head = c.name + (f": accuracy {c.accuracy:.0%}" if c.accuracy is not None else "") + \
            (f", {c.nbytes / 2 ** 20:.1f} MiB" if c.nbytes else "") + (f", {c.tok_s:.0f} tok/s" if c.tok_s else "")
        lines = [head, ""]
        for i, (q, a) in enumerate(zip(trace.questions, c.answers)):
            ref = trace.reference[i] if i < len(trace.reference) else ""
            lines += [f"Q: {q[:60]}", f"   fp32: {ref[:60]}", f"   {'same' if a == ref else 'this'}: {a[:60]}"]
            if len(lines) > 22:
                break
        ax.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8)
    else:
        ax.text(0.0, 0.5, "no repair candidates recorded (record_doctor_trace(..., candidates=[...]))", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["CandidateAnswers", "DoctorTrace", "doctor_figure", "plot_comparison", "plot_layers", "plot_repair", "plot_sweep", "plot_weights",
           "record_doctor_trace", "write_figures"]
