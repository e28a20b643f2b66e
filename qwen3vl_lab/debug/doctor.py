"""The INT4 doctor: everything at once for one folder against its fp32 reference.

    report = diagnose("OUT", "int4", prompts=["Write a haiku."], image="photo.jpg", image_size=256)
    print(report.render())
    report.checklist, report.comparison, report.layers, report.weights     # the result objects, for plots
    write_figures(report, "report/")                                        # PNGs (qwen3vl_lab.viz.doctor)

Order follows the usual debug recipe for INT4 gibberish: the checklist (config, graph and runtime
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
from typing import Callable, Sequence

from ..errors import UserError
from ..export.cache import reference_export
from ..export.quantize import Int4Recipe
from ..model import Model, load_model
from ..paths import existing_dir
from .checklist import Checklist, run_checklist
from .compare import Comparison, compare
from .inputs import PromptLike, as_specs
from .layers import LayerReport, compare_layers
from .sweep import sweep
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
    export_comparison: Comparison | None = None  # the reference vs our export of the checkpoint: the export's own error
    best_recipe: str | None = None
    recipe_lines: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

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
        if self.export_comparison is not None:
            c = self.export_comparison
            parts += ["", "the reference vs our export of the checkpoint (the export's own error, before quantization):",
                      f"  mean KL {c.mean_kl:.4g} nats, top-1 agreement {c.agreement:.0%}", c.table()]
        if self.recipe_lines:
            parts += ["", "INT4 recipes on our export of the checkpoint (best first):"]
            parts += [f"  {line}" for line in self.recipe_lines]
        parts += ["", "findings:"] + [f"  - {v}" for v in self.verdict()]
        parts += [f"  note: {n}" for n in self.notes]
        if self.advice:
            parts += ["", "what to do:"] + [f"  {i + 1}. {a}" for i, a in enumerate(self.advice)]
        return "\n".join(parts)


def _load_pair(model_dir, precision: str, reference) -> tuple[Model, Model]:
    """The tested model and its reference: a given Model or folder, else the fp32 of the same export."""
    test = model_dir if isinstance(model_dir, Model) else load_model(model_dir, precision)
    if isinstance(reference, Model):
        return test, reference
    if reference in (None, "fp32"):
        layout = test.layout
        if layout is None or "fp32" not in layout.precisions or test.precision == "fp32":
            raise UserError(f"no fp32 reference next to {test.folder}; pass --reference with an fp32 folder, or "
                            "--hf_dir with the checkpoint to build one")
        return test, load_model(layout.root, "fp32")
    folder = existing_dir(reference, "--reference", fix="pass an fp32 export folder, or leave out --reference to "
                          "compare with the cpu-fp32 folder of the same export")
    return test, load_model(folder, "fp32")


def checkpoint_reference(test: Model, hf_dir: str | Path | None, ref: Model,
                         log: Callable[[str], None]) -> Model | None:
    """Our fp32 export of the checkpoint (`hf_dir`, or the one a foreign export ships in pytorch/), built once
    into the cache; else the reference itself when it is one of ours with a vision graph; else None."""
    hf_dir = hf_dir or (test.layout.hf_dir if test.layout else None)
    if hf_dir is not None:
        return load_model(reference_export(hf_dir, log=log))
    return ref if ref.kind == "qwen3vl-lab" and ref.has_vision else None


def _with_vision(models: Sequence[Model], source: Model | None) -> None:
    """Foreign models run image prompts on `source`'s vision graph, their missing pieces accepted (and named)."""
    for m in models:
        m.accept_missing = m.teaching_decoder.accept_missing = True  # every decoder opened from m (taps too)
        if not m.has_vision and source is not None and source.has_vision:
            m.borrow_vision(source)


def recipe_advice(ckpt_ref: Model, specs, n_steps: int, progress: bool) -> tuple[str | None, list[str]]:
    """Rank a few INT4 recipes on our export of the checkpoint: the one that keeps the reference's answers."""
    recipes = [Int4Recipe(), Int4Recipe(lm_head="int8"), Int4Recipe(accuracy_level=0, lm_head="int8")]
    result = sweep(ckpt_ref.root, recipes, specs[:1], n_steps=n_steps, progress=progress)
    best = result.rows[0]
    lines = [f"{r.name}: top-1 agreement {r.agreement:.0%}, mean KL {r.mean_kl:.4g}" for r in result.rows]
    return best.name, lines


def diagnose(model_dir: Model | str | Path, precision: str = "int4", reference: Model | str | Path | None = "fp32",
             prompts: Sequence[PromptLike] | PromptLike | None = None, *, image=None, image_size: int | None = None,
             n_steps: int = 16, layers: bool = True, weights: bool = True, progress: bool = False,
             hf_dir: str | Path | None = None, recipes: bool | None = None,
             log: Callable[[str], None] = lambda _: None) -> DoctorReport:
    """Checklist + comparison + per-layer + per-weight diagnosis of `model_dir` (test) against fp32 (reference).

    Any export `load_model` opens (ours, the guide's, onnxruntime-genai's, ...). hf_dir: the checkpoint, to build
    our fp32 export of it (cached) for the image probe, the export-vs-checkpoint comparison and the advice; a
    foreign export that ships its checkpoint (the guide's pytorch/) gets it without asking. recipes: also rank a
    few INT4 recipes on that export (default: when there is a checkpoint reference)."""
    test, ref = _load_pair(model_dir, precision, reference)
    ckpt_ref = checkpoint_reference(test, hf_dir, ref, log)
    _with_vision([test, ref], ckpt_ref)
    specs = as_specs(prompts, image, image_size)
    notes = [*test.notices]
    checklist = run_checklist(test, reference=ref, vision_reference=ckpt_ref, image=image, image_size=image_size)
    comparison = compare(ref, test, specs, n_steps, progress=progress)
    export_comparison = None
    if ckpt_ref is not None and ckpt_ref is not ref:
        export_comparison = compare(ckpt_ref, ref, specs, n_steps, progress=progress)
    layer_report = compare_layers(ref, test, specs[-1]) if layers else None  # the image prompt when there is one
    has_q = any(n.op_type == "MatMulNBits" for n in test.graph().graph.node)
    weight_report = compare_weights(ref, test, hf_dir=hf_dir) if (weights and has_q) else None
    if weights and not has_q:
        notes.append("the test decoder has no MatMulNBits, so there are no quantized weights to compare")
    if image is None:
        notes.append("text prompts only: pass --image to exercise the vision path, DeepStack and 3-D positions")
    recipe = test.genai.get("qwen3vl_lab", {}).get("recipe")
    report = DoctorReport(str(test.folder), str(ref.folder), recipe, checklist, comparison, layer_report,
                          weight_report, notes, export_comparison=export_comparison)
    if ckpt_ref is not None and (recipes if recipes is not None else ckpt_ref is not ref):
        report.best_recipe, report.recipe_lines = recipe_advice(ckpt_ref, specs, min(n_steps, 8), progress)
    report.advice = advice(report, test, ckpt_ref, hf_dir or (test.layout.hf_dir if test.layout else None))
    return report


def advice(report: DoctorReport, test: Model, ckpt_ref: Model | None, hf_dir) -> list[str]:
    """What to do, in order: the export to make (when this one lacks pieces), and the INT4 recipe to use."""
    out = []
    lacks = test.teaching_decoder.io.missing if test.kind != "qwen3vl-lab" else []
    failed = {i.key for i in report.checklist.failed}
    if lacks or failed & {"positions", "deepstack", "genai_config", "kv_cache", "image_probe", "tied_embeddings"}:
        src = hf_dir or "CKPT"
        out.append(f"make a correct export: qwen3vl-lab export --hf_dir {src} --output_dir OUT --precision fp32 int4"
                   + (f" (this one lacks {'; '.join(lacks)})" if lacks else ""))
    if report.best_recipe:
        out.append(f"the INT4 recipe that keeps the reference's answers best here: {report.best_recipe} "
                   "(`qwen3vl-lab sweep --model_dir OUT` ranks more)")
    elif "lm_head" in failed:
        out.append("quantize with --lm_head int8 and compare again (doctor --model_dir OUT)")
    return out


__all__ = ["DoctorReport", "advice", "checkpoint_reference", "diagnose"]
