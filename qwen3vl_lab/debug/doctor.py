"""The INT4 doctor: everything at once for one folder against its fp32 reference.

    report = diagnose("OUT", "int4", prompts=["Write a haiku."], image="photo.jpg", image_size=256)
    print(report.render())
    report.checklist, report.comparison, report.layers, report.weights     # the result objects, for plots
    write_figures(report, "report/")                                        # PNGs (qwen3vl_lab.viz.doctor)

Order follows the usual debug recipe for INT4 gibberish: the checklist (config, graph and runtime
suspects, with the accuracy_level oracle), then the fp32-vs-test comparison per step, then where
inside the decoder the error grows (per layer), then which weight matrices carry it (per block).

Memory: one decoder at a time, in turns. Our fp32 export of the checkpoint (when there is one: --hf_dir,
or the guide's pytorch/) runs first, then the fp32 reference, then the tested model; each leaves only
what the comparisons need (greedy tokens and logits per step, the image probe's logits, the tapped
residual stream per layer: tens of MB, `Recorded`) and is released before the next one loads. The
weights are then compared one matrix at a time, memory-mapped from the files, and the INT4 recipes
ranked by `sweep`, which itself holds one variant at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..config import VisionConfig
from ..errors import UserError
from ..export.cache import reference_export
from ..export.quantize import Int4Recipe
from ..generate import Prompt
from ..layouts import Layout, find_layout
from ..model import Model, load_graph, load_model
from ..paths import existing_dir, export_path
from .activations import ChannelStats, WeightedError, collect_channel_stats, format_weighted, weighted_errors
from .checklist import OUTLIER_RATIO, Checklist, ReferenceRecord, activation_peaks, run_checklist
from .compare import Comparison, compare_recorded
from .export_checks import ImageProbe, answer_probe, probe_prompt, probe_reference
from .identity import check_same_dims, checkpoint_table, embedding_table, not_the_same_model
from .inputs import PromptLike, as_model, as_specs, prepare
from .layers import Capture, LayerReport, capture_prompt, compare_layers
from .record import RecordedPrompt, RecordedVision, record_prompt, release
from .sweep import sweep
from .weights import WeightReport, compare_weights

CHECKLIST_PROMPT = "Write a haiku about the sea."  # the checklist's answer probe (run_checklist's default)
OUTLIER_AGREEMENT = 0.9  # outliers are named the cause when the tested model agrees with fp32 on fewer top-1 tokens


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
    channels: list[ChannelStats] | None = None  # per MatMul input of the fp32 reference: outlier channels
    weighted: list[WeightedError] | None = None  # per MatMulNBits: plain vs activation-weighted error

    def outlier_inputs(self) -> list[ChannelStats]:
        """The MatMul inputs carrying outlier channels, the largest ratio first (one per input tensor)."""
        seen, out = set(), []
        for c in sorted(self.channels or [], key=lambda c: -c.ratio):
            if c.outliers and c.tensor not in seen:
                seen.add(c.tensor)
                out.append(c)
        return out

    @property
    def largest_ratio(self) -> float:
        return max((c.ratio for c in self.channels or []), default=0.0)

    @property
    def export_root(self) -> str:
        """The export folder the tested precision folder sits in (what `repair --model_dir` takes)."""
        folder = Path(self.folder)
        return str(folder.parent if folder.name.startswith("cpu-") else folder)

    def verdict(self) -> list[str]:
        """Short findings, most actionable first."""
        out = [f"checklist: {i.title} FAILED - {i.fix or i.evidence}" for i in self.checklist.failed]
        if self.checklist.warned:
            out.append(f"checklist: {len(self.checklist.warned)} WARN ({', '.join(i.key for i in self.checklist.warned)}): "
                       "known risks measured within their budget here, not failures (evidence above)")
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
        heavy = self.outlier_inputs()
        if heavy:
            layers = sorted({int(c.matmul.split(".")[1]) for c in heavy if c.matmul.startswith("layers.")})
            out.append(f"activation outliers: {len(heavy)} MatMul inputs in layers {layers} carry channels >= "
                       f"{heavy[0].outlier_ratio:g}x the median, up to {heavy[0].ratio:.0f}x ({heavy[0].matmul} "
                       f"channels {list(heavy[0].outliers[:4])})")
        if self.weighted:
            e = max(self.weighted, key=lambda e: e.weighted)
            out.append(f"worst activation-weighted error: {e.matmul} |X(W-Q(W))|/|XW| {e.weighted:.3f} where the plain "
                       f"weight error is {e.plain:.3f}")
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
        heavy = self.outlier_inputs()
        if self.channels is not None:
            parts += ["", f"activation outliers per MatMul input (fp32 reference, the compared prompts): {len(heavy)} of "
                          f"{len({c.tensor for c in self.channels})} inputs carry channels >= "
                          f"{self.channels[0].outlier_ratio if self.channels else 0:g}x the median channel"]
            parts += [f"  {c.matmul:30s} channels {', '.join(f'{k} ({r:.0f}x)' for k, r in _ratios(c))}"
                      f"{' ...' if len(c.outliers) > 4 else ''}" for c in heavy[:12]]
        if self.weighted:
            rows = sorted(self.weighted, key=lambda e: -e.weighted)
            parts += ["", f"activation-weighted error |X(W-Q(W))|/|XW| beside the plain |W-Q(W)|/|W| (the {min(12, len(rows))} "
                          f"largest of {len(rows)}; kernel: with accuracy_level 4's int8 inputs)",
                      format_weighted(rows[:12])]
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


def _ratios(c: ChannelStats, top: int = 4) -> list[tuple[int, float]]:
    r = c.channel_ratios()
    return [(k, float(r[k])) for k in c.outliers[:top]]


@dataclass
class Source:
    """A model the doctor runs in its turn: one the caller passed (left as it is), or a folder it loads and,
    after its turn, releases (record.release) so that the next model loads into the memory it held."""

    given: Model | None
    path: Path | None = None
    precision: str = "fp32"

    def load(self, *, open_decoder: bool = True) -> Model:
        model = self.given if self.given is not None else as_model(self.path, self.precision, open_decoder=open_decoder)
        model.accept_missing = True  # the doctor runs what a decoder lacks and names it (checklist, notices)
        if "teaching_decoder" in model.__dict__:
            model.teaching_decoder.accept_missing = True
        return model

    def done(self, model: Model, *, keep_vision: bool = False) -> None:
        if model is not self.given:
            release(model, keep_vision=keep_vision)

    @property
    def folder(self) -> Path:
        return self.given.folder if self.given is not None else self.path

    @cached_property
    def layout(self) -> Layout | None:
        """Which export this is and where its files are, read once without loading anything."""
        return self.given.layout if self.given is not None else find_layout(self.path, self.precision)

    def graph(self):
        """The decoder graph without its weights."""
        return self.given.graph() if self.given is not None else load_graph(self.layout.decoder.parent,
                                                                              self.layout.decoder.name)


def _checkpoint(hf_dir: str | Path | None, layout: Layout | None) -> str | Path | None:
    """The checkpoint to build our reference export from: the one given, else the one a foreign export ships
    in pytorch/ (the guide's layout), else None."""
    return hf_dir or (layout.hf_dir if layout else None)


def _sources(model_dir, precision: str, reference) -> tuple[Source, Source]:
    """(test, reference), resolved without loading either: the reference is a given Model or folder, else the
    fp32 of the same export."""
    test = Source(model_dir) if isinstance(model_dir, Model) else \
        Source(None, export_path(model_dir, "--model_dir", fix="pass an export folder or a decoder .onnx file"), precision)
    if isinstance(reference, Model):
        return test, Source(reference)
    if reference in (None, "fp32"):
        layout = test.layout
        if layout is None or "fp32" not in layout.precisions or layout.precision == "fp32":
            raise UserError(f"no fp32 reference next to {layout.folder if layout else test.folder}; pass --reference "
                            "with an fp32 folder, or --hf_dir with the checkpoint to build one")
        return test, Source(None, layout.root, "fp32")
    folder = existing_dir(reference, "--reference", fix="pass an fp32 export folder, or leave out --reference to "
                          "compare with the cpu-fp32 folder of the same export")
    return test, Source(None, folder, "fp32")


def checkpoint_reference(test: Model, hf_dir: str | Path | None, ref: Model,
                         log: Callable[[str], None]) -> Model | None:
    """Our fp32 export of the checkpoint (`hf_dir`, or the one a foreign export ships in pytorch/), built once
    into the cache; else the reference itself when it is one of ours with a vision graph; else None."""
    checkpoint = _checkpoint(hf_dir, test.layout)
    if checkpoint is not None:
        return load_model(reference_export(checkpoint, log=log))
    return ref if ref.kind == "qwen3vl-lab" and ref.has_vision else None


RECIPE_GAIN = 0.8  # a recipe "helps" when its mean KL vs fp32 is at most 80% of the default's, or it agrees more


def recipe_advice(root: Path, specs, n_steps: int, progress: bool) -> tuple[str | None, list[str]]:
    """Rank a few INT4 recipes on our export of the checkpoint (`root`). The best is named only when it helps:
    more top-1 agreement with fp32 than the default recipe, or at most RECIPE_GAIN of its KL (else None)."""
    recipes = [Int4Recipe(), Int4Recipe(lm_head="int8"), Int4Recipe(accuracy_level=0, lm_head="int8")]
    result = sweep(root, recipes, specs[:1], n_steps=n_steps, progress=progress)
    lines = [f"{r.name}: top-1 agreement {r.agreement:.0%}, mean KL {r.mean_kl:.4g}" for r in result.rows]
    ok = [r for r in result.rows if not r.failed]
    default = next((r for r in ok if r.name == Int4Recipe().name), None)
    if not ok or default is None:
        return None, lines
    best = ok[0]
    helps = best is not default and (best.agreement > default.agreement or best.mean_kl <= RECIPE_GAIN * default.mean_kl)
    return (best.name if helps else None), lines


def _records(model: Model, specs, n_steps: int, progress: bool, desc: str) -> list[RecordedPrompt]:
    return [record_prompt(model, s, n_steps) for s in tqdm(specs, desc=desc, unit="prompt", disable=not progress)]


@dataclass
class Recorded:
    """What the doctor keeps of the models it has released: small next to a decoder (tens of MB)."""

    ckpt: list[RecordedPrompt] | None = None  # our export of the checkpoint, per prompt: tokens + logits per step
    ref: list[RecordedPrompt] | None = None  # the reference, per prompt
    probe: ImageProbe | None = None  # the image probe through our export of the checkpoint
    checklist: ReferenceRecord | None = None  # the reference's answer probe and activation peaks, for the checklist
    capture: Capture | None = None  # the reference's residual stream per layer, on the last prompt
    export_comparison: Comparison | None = None  # the reference against our export of the checkpoint
    channels: list[ChannelStats] | None = None  # the reference's MatMul inputs per channel (activations.py)


def diagnose(model_dir: Model | str | Path, precision: str = "int4", reference: Model | str | Path | None = "fp32",
             prompts: Sequence[PromptLike] | PromptLike | None = None, *, image=None, image_size: int | None = None,
             n_steps: int = 16, layers: bool = True, weights: bool = True, progress: bool = False,
             hf_dir: str | Path | None = None, recipes: bool | None = None,
             log: Callable[[str], None] = lambda _: None) -> DoctorReport:
    """Checklist + comparison + per-layer + per-weight diagnosis of `model_dir` (test) against fp32 (reference).

    Any export `load_model` opens (ours, the guide's, onnxruntime-genai's, ...). hf_dir: the checkpoint, to build
    our fp32 export of it (cached) for the image probe, the export-vs-checkpoint comparison and the advice; a
    foreign export that ships its checkpoint (the guide's pytorch/) gets it without asking. recipes: also rank a
    few INT4 recipes on that export (default: when there is a checkpoint reference).

    One decoder at a time, in turns: the vision tower alone (every image encoded once, `RecordedVision`), our
    export of the checkpoint (when there is one), the reference, the test model. Each leaves only records
    (`Recorded`) and is released before the next loads; the weights are then compared one matrix at a time from
    the files, and the recipes ranked by `sweep` (one variant at a time).
    Models the caller passed are used as they are and not released."""
    test_src, ref_src = _sources(model_dir, precision, reference)
    specs = as_specs(prompts, image, image_size)
    checkpoint = _checkpoint(hf_dir, test_src.layout)
    ckpt_src = Source(None, reference_export(checkpoint, log=log), "fp32") if checkpoint is not None else None
    test_graph = test_src.graph()
    rec = Recorded()

    # turn 0: the vision tower alone (ours: the checkpoint's export, else the reference when it is ours)
    vision_src = ckpt_src or (ref_src if ref_src.layout is not None and ref_src.layout.kind == "qwen3vl-lab" else None)
    vision, image_probe_prompt = _encode_images(vision_src, specs, image, image_size) if vision_src else (None, None)

    if ckpt_src is not None:  # turn 1: our fp32 export of the checkpoint
        ckpt = _load(ckpt_src, vision)
        ckpt_config = ckpt.config
        rec.ckpt = _records(ckpt, specs, n_steps, progress, "checkpoint's export")
        rec.probe = probe_reference(ckpt, prompt=image_probe_prompt)
        ckpt_src.done(ckpt)
        del ckpt

    ref = _load(ref_src, vision)  # turn 2: the reference
    if ckpt_src is not None:
        check_same_dims(ckpt_config, ref.config, f"--hf_dir {checkpoint}", f"the reference {ref_src.folder}")
    ckpt_is_ref = ckpt_src is None and image_probe_prompt is not None  # ours with a vision graph: it probes images
    if ckpt_is_ref:
        rec.probe = probe_reference(ref, prompt=image_probe_prompt)
    rec.ref = _records(ref, specs, n_steps, progress, "reference")
    if rec.ckpt is not None:
        rec.export_comparison = compare_recorded(rec.ckpt, ref, specs, n_steps, progress=progress,
                                                 reference=str(ckpt_src.folder))
    answers = answer_probe(ref, CHECKLIST_PROMPT)  # the checklist's answer probe: fp32's greedy answer and logits
    ref_src.done(ref, keep_vision=True)  # its plain decoder closed before the tapped copy opens
    rec.capture = capture_prompt(ref, specs[-1]) if layers else None  # the image prompt when there is one
    rec.checklist = ReferenceRecord(answers, activation_peaks(ref, CHECKLIST_PROMPT, "the fp32 reference"))
    rec.channels = collect_channel_stats(ref, specs) if weights else None  # per MatMul input, with row samples
    ref_src.done(ref)

    test = _load(test_src, vision)  # turn 3: the tested model
    check_same_dims(ref.config, test.config, f"the reference {ref_src.folder}", f"the tested {test_src.folder}")
    notes = [*test.notices]
    checklist = run_checklist(test, reference=rec.checklist, prompt=CHECKLIST_PROMPT, vision_reference=rec.probe,
                              image=image, image_size=image_size)
    comparison = compare_recorded(rec.ref, test, specs, n_steps, progress=progress, reference=str(ref_src.folder))
    lacks = test.teaching_decoder.io.missing if test.kind != "qwen3vl-lab" else []
    test_src.done(test, keep_vision=True)  # its plain decoder closed before the tapped copy opens
    layer_report = compare_layers(rec.capture, test, specs[-1]) if layers else None
    test_src.done(test)

    has_q = any(n.op_type == "MatMulNBits" for n in test_graph.graph.node)  # then: the files, one matrix at a time
    weight_report = compare_weights(ref, test, hf_dir=hf_dir) if (weights and has_q) else None
    weighted = weighted_errors(ref, test, stats=rec.channels) if (weights and has_q and rec.channels) else None
    if weights and not has_q:
        notes.append("the test decoder has no MatMulNBits, so there are no quantized weights to compare")
    if image is None:
        notes.append("text prompts only: pass --image to exercise the vision path, DeepStack and 3-D positions")
    recipe = test.genai.get("qwen3vl_lab", {}).get("recipe")
    report = DoctorReport(str(test.folder), str(ref.folder), recipe, checklist, comparison, layer_report,
                          weight_report, notes, export_comparison=rec.export_comparison, channels=rec.channels,
                          weighted=weighted)
    rank_on = ckpt_src.folder if ckpt_src is not None else ref.root if ckpt_is_ref else None
    if rank_on is not None and (recipes if recipes is not None else ckpt_src is not None):
        report.best_recipe, report.recipe_lines = recipe_advice(rank_on, specs, min(n_steps, 8), progress)
    report.advice = advice(report, lacks, checkpoint)
    other = not_the_same_model(embedding_table(test_src.layout),
                               checkpoint_table(hf_dir) if hf_dir else embedding_table(ref_src.layout),
                               f"--hf_dir {hf_dir}" if hf_dir else f"the reference {ref_src.folder}")
    if other:  # the figures compare two models: nothing is blamed on quantization
        report.notes.insert(0, other)
        report.advice = [other]
    return report


@dataclass
class LentVision:
    """Every image the doctor shows a model, encoded once by our vision graph (`RecordedVision`), and that
    graph's config: what each model's image prompts are prepared with, the vision weights long released."""

    session: RecordedVision
    config: VisionConfig
    source: Path


def _encode_images(source: Source, specs, image, image_size) -> tuple[LentVision | None, Prompt | None]:
    """Turn 0: load `source` without its decoder, encode the image probe's picture and every image prompt
    through its vision graph (recorded), then release it. (None, None) when it has no vision graph."""
    model = source.load(open_decoder=False)
    if not model.has_vision:
        source.done(model)
        return None, None
    own = model.vision
    session = RecordedVision(own)
    try:
        model.use_vision(session, model.config.vision, model.folder)
        probe = probe_prompt(model, image, image_size)  # its embeddings are this model's: exact for it
        for spec in specs:
            prepare(model, spec)  # the features are recorded; each model merges them into its own embeddings
    finally:
        session.close()
        if source.given is not None:
            model.__dict__["vision"] = own  # a caller's Model is left as it was
        del own  # before the release: the vision session's memory goes with it
        source.done(model)
    return LentVision(session, model.config.vision, model.folder), probe


def _load(source: Source, vision: LentVision | None) -> Model:
    """A model's turn begins: loaded; its image prompts encoded from the record (a caller's Model with a vision
    graph of its own keeps it)."""
    model = source.load()
    if vision is not None and (source.given is None or not model.has_vision):
        model.use_vision(vision.session, vision.config, vision.source)
    return model


STRUCTURAL = {"positions", "mrope", "deepstack", "genai_config", "kv_cache", "image_probe", "tied_embeddings", "qk_norm"}


def advice(report: DoctorReport, lacks: Sequence[str], hf_dir) -> list[str]:
    """What to do, in order, each only when the report measured that it is needed and that it helps: the export to
    make (only when this one lacks a piece or a structural line FAILED); `repair` when activation outliers are the
    cause (no recipe of the ranking helps on them); the INT4 recipe that measurably beats the default."""
    out = []
    failed = {i.key for i in report.checklist.failed}
    if lacks or failed & STRUCTURAL:
        src = hf_dir or "CKPT"
        out.append(f"make a correct export: qwen3vl-lab export --hf_dir {src} --output_dir OUT --precision fp32 int4"
                   + (f" (this one lacks {'; '.join(lacks)})" if lacks else ""))
    acc = next((i for i in report.checklist.items if i.key == "accuracy_level"), None)
    heavy = report.outlier_inputs()
    ratio, where = (heavy[0].ratio, heavy[0].matmul) if heavy else \
        (acc.measured.get("channel_ratio", 0.0), acc.measured.get("node", "?")) if acc is not None else (0.0, "?")
    drifts = report.comparison.agreement < OUTLIER_AGREEMENT
    if ratio >= OUTLIER_RATIO and drifts and not lacks:
        out.append(f"activation outliers are the cause (an input channel {ratio:.0f}x the median at "
                   f"{where}; top-1 agreement with fp32 {report.comparison.agreement:.0%}): "
                   f"qwen3vl-lab repair --model_dir {report.export_root} --output_dir FIXED "
                   "(builds candidates — the outlier channels equalised into the op before, the sensitive MatMuls at 8 bits, ... — scores them against fp32 and writes the best)")
    if report.best_recipe:
        out.append(f"the INT4 recipe that keeps the reference's answers best here: {report.best_recipe} "
                   "(`qwen3vl-lab sweep --model_dir OUT` ranks more)")
    elif report.recipe_lines:
        out.append("no INT4 recipe of the ranking above beats the default recipe here: a global recipe is not the fix")
    return out


__all__ = ["DoctorReport", "Recorded", "Source", "advice", "checkpoint_reference", "diagnose"]
