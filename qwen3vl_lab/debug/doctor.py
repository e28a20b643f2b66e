"""The INT4 doctor: everything at once for one folder against its fp32 reference.

    report = diagnose("OUT", "int4", prompts=["Write a haiku."], image="photo.jpg", image_size=256)
    print(report.render())
    report.checklist, report.comparison, report.layers, report.weights     # the result objects, for plots
    write_figures(report, "report/")                                        # PNGs (qwen3vl_lab.viz.doctor)

Order follows the debug recipe of ONNX_ANCHORS.md §3: the checklist (config, graph and runtime
suspects, with the accuracy_level oracle), then the fp32-vs-test comparison per step, then where
inside the decoder the error grows (per layer), then which weight matrices carry it (per block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..model import Model, load_model
from ..paths import existing_dir
from .checklist import Checklist, run_checklist
from .compare import Comparison, compare
from .inputs import PromptLike, as_specs
from .layers import LayerReport, compare_layers, load_graph
from .weights import WeightReport, compare_weights


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


def _load_pair(model_dir, precision: str, reference) -> tuple[Model, Model]:
    test = model_dir if isinstance(model_dir, Model) else load_model(model_dir, precision)
    if isinstance(reference, Model):
        return test, reference
    if reference in (None, "fp32"):
        if isinstance(model_dir, Model) or (Path(model_dir) / "genai_config.json").is_file():
            root = test.root
            if not (root / "cpu-fp32").is_dir():
                raise UserError(f"no fp32 reference next to {test.folder}; pass --reference with an fp32 folder")
            return test, load_model(root, "fp32")
        return test, load_model(model_dir, "fp32")
    folder = existing_dir(reference, "--reference", fix="pass an fp32 export folder, or leave out --reference to "
                          "compare with the cpu-fp32 folder of the same export")
    return test, load_model(folder, "fp32")


def diagnose(model_dir: Model | str | Path, precision: str = "int4", reference: Model | str | Path | None = "fp32",
             prompts: Sequence[PromptLike] | PromptLike | None = None, *, image=None, image_size: int | None = None,
             n_steps: int = 16, layers: bool = True, weights: bool = True, progress: bool = False) -> DoctorReport:
    """Checklist + comparison + per-layer + per-weight diagnosis of `model_dir` (test) against fp32 (reference)."""
    test, ref = _load_pair(model_dir, precision, reference)
    specs = as_specs(prompts, image, image_size)
    notes = []
    checklist = run_checklist(test, reference=ref)
    comparison = compare(ref, test, specs, n_steps, progress=progress)
    layer_report = compare_layers(ref, test, specs[-1]) if layers else None  # the image prompt when there is one
    has_q = any(n.op_type == "MatMulNBits" for n in load_graph(test).graph.node)
    weight_report = compare_weights(ref, test) if (weights and has_q) else None
    if weights and not has_q:
        notes.append("the test decoder has no MatMulNBits, so there are no quantized weights to compare")
    if image is None:
        notes.append("text prompts only: pass --image to exercise the vision path, DeepStack and 3-D positions")
    recipe = test.genai.get("qwen3vl_lab", {}).get("recipe")
    return DoctorReport(str(test.folder), str(ref.folder), recipe, checklist, comparison, layer_report,
                        weight_report, notes)


__all__ = ["DoctorReport", "diagnose"]
