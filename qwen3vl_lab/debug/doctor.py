"""The INT4 doctor: everything at once for one folder against its fp32 reference.

    report = diagnose("OUT", "int4", prompts=["Write a haiku."], image="photo.jpg", image_size=256)
    print(report.render())
    report.checklist, report.comparison, report.layers, report.weights     # the result objects, for plots
    write_figures(report, "report/")                                        # PNGs (qwen3vl_lab.viz.doctor)

Order follows the debug recipe of ONNX_ANCHORS.md §3: the checklist (config, graph and runtime
suspects, with the accuracy_level oracle), then the fp32-vs-test comparison per step, then where
inside the decoder the error grows (per layer), then which weight matrices carry it (per block).

Memory: one decoder at a time. The fp32 reference runs first and alone, and leaves only what the
comparison needs (its greedy tokens and logits per step, the tapped residual stream per layer: tens
of MB); it is released before the test model loads; the weights are compared one matrix at a time,
memory-mapped from the two folders' external-data files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

from ..errors import UserError
from ..generate import prepare_prompt
from ..layout import DECODER_FILE, GENAI_CONFIG
from ..model import Model, resolve_folder
from .checklist import Checklist, needs_oracle, oracle_logits, run_checklist
from .compare import Comparison, compare_recorded
from .inputs import PromptLike, as_model, as_specs
from .layers import Capture, LayerReport, capture_prompt, compare_layers
from .record import RecordedPrompt, record_prompt, release
from .weights import WeightReport, compare_weights

CHECKLIST_PROMPT = "Write a haiku about the sea."  # the accuracy_level oracle's prompt (run_checklist's default)


@dataclass
class DoctorReport:
    folder: str
    reference: str
    recipe: dict | None
    checklist: Checklist
    comparison: Comparison
    layers: LayerReport | None = None
    weights: WeightReport | None = None
    notes: list[str] = field(default_factory=list)

    def verdict(self) -> list[str]:
        """Short findings, most actionable first."""
        out = [f"checklist: {i.title} FAILED - {i.fix or i.evidence}" for i in self.checklist.failed]
        c = self.comparison
        out.append(f"teacher-forced vs fp32: mean KL {c.mean_kl:.4g} nats, top-1 agreement {c.agreement:.0%}, "
                   f"reference token rank {c.mean_ref_rank:.1f} on average")
        if self.layers is not None:
            layer, inc = self.layers.growth()
            if layer is not None and inc > 0:
                out.append(f"the residual-stream error grows most at layer {layer} (+{inc:.3f} relative error)")
        if self.weights is not None and self.weights.rows:
            w = self.weights.worst(1)[0]
            out.append(f"worst weight matrix: {w.name} (relative error {w.rel_error:.3f}, {w.bits} bits, block {w.block_size})")
        return out

    def render(self) -> str:
        recipe = self.recipe["name"] if self.recipe else "none (not quantized by qwen3vl-lab)"
        parts = [f"INT4 doctor: {self.folder}", f"reference: {self.reference}", f"recipe: {recipe}", "",
                 self.checklist.table(), "", "next-token distributions, teacher forced on the reference's greedy tokens",
                 self.comparison.table()]
        if self.comparison.free:
            parts.append("")
            parts.append("free greedy generation (first step where the two token streams differ):")
            for r in self.comparison.free:
                where = "identical" if r.first_divergence is None else f"step {r.first_divergence}"
                parts.append(f"  {r.label[:40]:40s} {where}")
                parts.append(f"    fp32: {r.ref_text[:70]!r}")
                parts.append(f"    test: {r.test_text[:70]!r}")
        if self.layers is not None:
            parts += ["", self.layers.table()]
        if self.weights is not None:
            parts += ["", f"weights: the {min(8, len(self.weights.rows))} matrices with the largest error "
                          f"(of {len(self.weights.rows)})", self.weights.table(8)]
        parts += ["", "findings:"] + [f"  - {v}" for v in self.verdict()]
        parts += [f"  note: {n}" for n in self.notes]
        return "\n".join(parts)


def _sources(model_dir, precision: str, reference) -> tuple[Model | Path, Model | Path]:
    """(test, reference), each a Model the caller passed or a resolved folder (nothing is loaded here)."""
    test = model_dir if isinstance(model_dir, Model) else resolve_folder(model_dir, precision)
    if isinstance(reference, Model):
        return test, reference
    if reference in (None, "fp32"):
        if isinstance(model_dir, Model) or (Path(model_dir) / GENAI_CONFIG).is_file():
            folder = test.folder if isinstance(test, Model) else test
            root = folder.parent if folder.name.startswith("cpu-") else folder
            if not (root / "cpu-fp32").is_dir():
                raise UserError(f"no fp32 reference next to {folder}; pass --reference with an fp32 folder")
            return test, resolve_folder(root, "fp32")
        return test, resolve_folder(model_dir, "fp32")
    return test, resolve_folder(reference, "fp32")


def _folder(x: Model | Path) -> Path:
    return x.folder if isinstance(x, Model) else Path(x)


def _done_with(model: Model, source: Model | Path) -> None:
    """Release a model the doctor loaded itself (a Model the caller passed is left as it is)."""
    if model is not source:
        release(model)


@dataclass
class ReferenceSide:
    """Everything the doctor needs from the reference, kept after it is released (small next to a decoder)."""

    records: list[RecordedPrompt]  # greedy tokens + logits per step, per prompt
    capture: Capture | None  # the tapped tensors per layer, on the last prompt
    oracle: np.ndarray | None  # (S, V) logits on the checklist's probe prompt (accuracy_level oracle)
    folder: Path


def run_reference(source: Model | Path, specs, n_steps: int, *, layers: bool, probe=None,
                  progress: bool = False) -> ReferenceSide:
    """The reference alone: every prompt's greedy run (record.py), the oracle logits on the test's probe
    embeddings, then (its plain decoder closed first) the tapped capture. A folder is released afterwards."""
    ref = as_model(source, "fp32")
    try:
        records = [record_prompt(ref, s, n_steps) for s in tqdm(specs, desc="reference", unit="prompt",
                                                                   disable=not progress)]
        oracle = None if probe is None else oracle_logits(ref, probe)
        if ref is not source:
            release(ref)  # the tapped copy below is then the only decoder in memory
        capture = capture_prompt(ref, specs[-1]) if layers else None  # the image prompt when there is one
        return ReferenceSide(records, capture, oracle, ref.folder)
    finally:
        _done_with(ref, source)


def diagnose(model_dir: Model | str | Path, precision: str = "int4", reference: Model | str | Path | None = "fp32",
             prompts: Sequence[PromptLike] | PromptLike | None = None, *, image=None, image_size: int | None = None,
             n_steps: int = 16, layers: bool = True, weights: bool = True, progress: bool = False) -> DoctorReport:
    """Checklist + comparison + per-layer + per-weight diagnosis of `model_dir` (test) against fp32 (reference).

    One decoder at a time: the reference runs first and leaves only its records (tokens and logits per
    step, the tapped tensors per layer); then the test model runs against them; then the weights are
    compared one matrix at a time from the files. Models passed as folders are released after their turn."""
    test_src, ref_src = _sources(model_dir, precision, reference)
    specs = as_specs(prompts, image, image_size)
    notes = []
    test_graph = onnx.load(str(_folder(test_src) / DECODER_FILE), load_external_data=False)
    probe = None
    if needs_oracle(test_graph):  # the checklist's probe prompt, embedded by the test model's own embedding
        t = as_model(test_src, precision, open_decoder=False)
        probe = prepare_prompt(t, CHECKLIST_PROMPT)
        _done_with(t, test_src)
    ref = run_reference(ref_src, specs, n_steps, layers=layers, probe=probe, progress=progress)
    test = as_model(test_src, precision)
    try:
        checklist = run_checklist(test, reference=ref.oracle, prompt=CHECKLIST_PROMPT)
        comparison = compare_recorded(ref.records, test, specs, n_steps, progress=progress, reference=str(ref.folder))
        _done_with(test, test_src)  # before the tapped copy
        layer_report = compare_layers(ref.capture, test, specs[-1]) if layers else None
    finally:
        _done_with(test, test_src)
    has_q = any(n.op_type == "MatMulNBits" for n in test_graph.graph.node)
    weight_report = compare_weights(ref.folder, test.folder) if (weights and has_q) else None
    if weights and not has_q:
        notes.append("the test decoder has no MatMulNBits, so there are no quantized weights to compare")
    if image is None:
        notes.append("text prompts only: pass --image to exercise the vision path, DeepStack and 3-D positions")
    recipe = test.genai.get("qwen3vl_lab", {}).get("recipe")
    return DoctorReport(str(test.folder), str(ref.folder), recipe, checklist, comparison, layer_report,
                        weight_report, notes)


__all__ = ["DoctorReport", "diagnose"]
