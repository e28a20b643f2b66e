"""A recipe sweep: build several INT4 variants of one fp32 export and rank them by agreement with fp32.

    result = sweep("OUT", recipes=default_recipes(), prompts=["Hi", PromptSpec("What is it?", image="a.jpg")],
                   out_dir="OUT/sweep")
    print(result.table())
    result.names, result.mean_kl, result.agreement          # arrays in rank order, ready to plot
    sweep("OUT", recipes, out_dir="OUT/sweep", backend=Backend(ray=True))   # each variant a Ray task

Every variant is quantized from OUT/cpu-fp32 by onnxruntime's MatMulNBitsQuantizer (export/quantize.py)
into OUT_DIR/<recipe name>/ (fp32 embedding/vision and the export's pytorch/ files: one private copy in
OUT_DIR/.fp32-assets, hard-linked into every variant), then compared with fp32 by teacher forcing
(debug/compare.py). A `SimRecipe` (simulate.py: 3 bits, per-tensor scales, ...) is built as a SIMULATED
variant instead, and its rows say so. Ranking: lowest mean KL(fp32 || variant) over every step of every
prompt first; top-1 agreement and the free-greedy divergence step are reported alongside.

One decoder at a time: the fp32 reference runs first, alone, and its greedy tokens and per-step logits
are saved in OUT_DIR/.reference/ (record.py); then each variant is one job (`run_variant_job`: build,
score against the saved record, clean up) that loads only the variant. Jobs run here one after
another, in local processes or as Ray tasks (cluster.py); they send back small records, never weights.

Resumable: each finished row is written at once to OUT_DIR/.results/<hash>.json (results.py), keyed by
the fp32 export's content hash, the recipe, the builder's code and the prompt set. A rerun reads those
rows instead of computing them (row.cached), so an interrupted sweep continues where it stopped and a
finished one prints its table at once. A variant already in OUT_DIR, stamped with the same fp32 decoder
and recipe, is not rebuilt (variants.build_variant); `shapes.accuracy.recipe_accuracy` scores the same
variants on the shapes task.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..export.files import folder_or_temporary
from ..export.quantize import QUANTIZATION_FILE, Int4Recipe
from ..jsonfile import read_json
from ..layout import DECODER_FILE
from ..model import Model, RuntimeOptions
from .cluster import Backend, connect_ray, error_record, run_jobs
from .compare import Comparison, compare_recorded
from .inputs import PromptLike, as_specs, open_model
from .record import RecordedPrompt, RecordFolder, prompt_digest, record_reference, release, save_records
from .results import ResultCache, folder_verifies, result_key, seal_folder, write_json_atomic
from .simulate import SimRecipe
from .variants import (
    ASSETS_FOLDER,
    FP32,
    build_variant,
    builder_version,
    cached_fingerprint,
    check_export,
    export_sizes,
    fp32_source,
    remove_variant,
    shared_assets,
    variant_memory,
)

REFERENCE_FOLDER = ".reference"  # OUT_DIR/.reference/<export hash>-<prompt set hash>/: the fp32 record


def default_recipes(include_slow: bool = True) -> list[Int4Recipe]:
    """The GenAI builder default, its usual fixes, the quantizer's own defaults, other algorithms, a 2-bit control.

    include_slow adds k_quant (slow on CPU) and hqq (needs torch; skipped when torch is missing).
    """
    recipes = [
        Int4Recipe(),  # builder: block 32, symmetric, accuracy_level 4, int4 head
        Int4Recipe(lm_head="int8"),
        Int4Recipe(lm_head="fp32"),
        Int4Recipe(accuracy_level=0),
        Int4Recipe(block_size=128, symmetric=False, accuracy_level=0),  # MatMulNBitsQuantizer's own defaults
        Int4Recipe(block_size=256, symmetric=False),
        Int4Recipe(algorithm="rtn"),
        Int4Recipe(bits=2),  # a control that must rank last
    ]
    if include_slow:
        recipes.append(Int4Recipe(algorithm="k_quant"))
        if importlib.util.find_spec("torch") is not None:
            recipes.append(Int4Recipe(algorithm="hqq"))
    return recipes


@dataclass
class SweepRow:
    recipe: Int4Recipe | SimRecipe  # a SimRecipe row is a SIMULATION (fp32 MatMuls holding rounded weights)
    folder: str
    mean_kl: float
    max_kl: float
    agreement: float  # top-1 agreement, teacher forced
    mean_ref_rank: float
    first_divergence: float  # mean over prompts of the free-greedy divergence step (n_steps when never)
    decoder_mb: float
    quantize_seconds: float
    comparison: Comparison | None = field(default=None, repr=False)
    cached: bool = False  # read from the result cache (nothing was built or run for it)
    variant_reused: bool = False  # the variant folder was already built (its stamp matched)
    error: str | None = None  # the variant failed (build, load or run): the row holds no figures
    host: str = ""  # where it was computed
    score_seconds: float = 0.0
    pid: int | None = None  # the process that computed it

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def simulated(self) -> bool:
        return isinstance(self.recipe, SimRecipe)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_json(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "simulated": self.simulated, "folder": self.folder,
                "mean_kl": self.mean_kl, "max_kl": self.max_kl, "top1_agreement": self.agreement,
                "mean_ref_rank": self.mean_ref_rank, "first_divergence": self.first_divergence,
                "decoder_mb": self.decoder_mb, "quantize_seconds": self.quantize_seconds,
                "score_seconds": self.score_seconds, "host": self.host, "cached": self.cached,
                "variant_reused": self.variant_reused, "error": self.error}

    @classmethod
    def from_record(cls, recipe: Int4Recipe | SimRecipe, record: dict, *, cached: bool) -> "SweepRow":
        """A row from a job's record (what `run_variant_job` returns and the result cache keeps)."""
        if "error" in record:
            nan = float("nan")
            return cls(recipe, record.get("folder", ""), nan, nan, nan, nan, nan, nan, 0.0, None, cached, False,
                       record["error"], record.get("host", ""), pid=record.get("pid"))
        cmp = Comparison.from_dict(record["comparison"]) if record.get("comparison") else None
        return cls(recipe, record["folder"], record["mean_kl"], record["max_kl"], record["top1_agreement"],
                   record["mean_ref_rank"], record["first_divergence"], record["decoder_mb"],
                   record["quantize_seconds"], cmp, cached, bool(record.get("variant_reused")), None,
                   record.get("host", ""), record.get("score_seconds", 0.0), record.get("pid"))


@dataclass
class SweepResult:
    rows: list[SweepRow]  # best first; failed rows last
    prompts: list[str]
    n_steps: int
    ranked_by: str = "mean_kl"
    reference_cached: bool = False  # the fp32 reference's record came from the cache (it did not run)
    backend: str = "this process"

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    @property
    def mean_kl(self) -> np.ndarray:
        return np.array([r.mean_kl for r in self.rows])

    @property
    def agreement(self) -> np.ndarray:
        return np.array([r.agreement for r in self.rows])

    @property
    def first_divergence(self) -> np.ndarray:
        return np.array([r.first_divergence for r in self.rows])

    @property
    def cached(self) -> list[bool]:
        """Per row: read from the result cache (True) or computed by this call."""
        return [r.cached for r in self.rows]

    @property
    def failed(self) -> list[SweepRow]:
        return [r for r in self.rows if r.failed]

    def rank_of(self, recipe: Int4Recipe | SimRecipe | str) -> int:
        name = recipe if isinstance(recipe, str) else recipe.validate().name
        return self.names.index(name)

    def table(self) -> str:
        head = f"{'#':>2s} {'recipe':42s} {'mean KL':>9s} {'max KL':>8s} {'top-1':>6s} {'rank':>7s} " \
               f"{'diverge':>7s} {'MB':>7s} {'quant s':>7s}"
        lines = [f"recipe sweep: {len(self.prompts)} prompt(s) x {self.n_steps} steps, ranked by {self.ranked_by}",
                 head, "-" * len(head)]
        for i, r in enumerate(self.rows):
            if r.failed:
                lines.append(f"{i + 1:2d} {r.name[:42]:42s} FAILED: {r.error[:110]}")
                continue
            sim = "  SIMULATED" if r.simulated else ""
            lines.append(f"{i + 1:2d} {r.name[:42]:42s} {r.mean_kl:9.4f} {r.max_kl:8.4f} {r.agreement:6.0%} "
                         f"{r.mean_ref_rank:7.1f} {r.first_divergence:7.1f} {r.decoder_mb:7.1f} {r.quantize_seconds:7.2f}{sim}")
        if any(r.simulated for r in self.rows):
            lines.append("SIMULATED: fp32 MatMuls holding rounded weights (simulate.py), not onnxruntime quantized "
                         "models; their MB are fp32 sizes")
        n_cached = sum(self.cached)
        if n_cached:
            lines.append(f"{n_cached} of {len(self.rows)} row(s) read from the result cache (OUT_DIR/.results)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "n_steps": self.n_steps, "ranked_by": self.ranked_by,
                "backend": self.backend, "reference_cached": self.reference_cached,
                "rows": [r.to_json() for r in self.rows]}


def _decoder_mb(folder: Path) -> float:
    return sum((folder / f).stat().st_size for f in (DECODER_FILE, DECODER_FILE + ".data")
               if (folder / f).is_file()) / 2**20


def score_record(cmp: Comparison, n_steps: int) -> dict:
    """The sweep's figures of one comparison (plain JSON)."""
    kl = cmp.kl
    div = [n_steps if d is None else d for d in cmp.first_divergences]
    return {"mean_kl": cmp.mean_kl, "max_kl": float(kl.max()) if len(kl) else 0.0, "top1_agreement": cmp.agreement,
            "mean_ref_rank": cmp.mean_ref_rank, "first_divergence": float(np.mean(div)) if div else float(n_steps),
            "comparison": cmp.to_dict()}


def evaluate_variant(reference: Model | str | RecordFolder | Sequence[RecordedPrompt], folder: Path,
                     recipe: Int4Recipe | SimRecipe, prompts, n_steps: int, seconds: float) -> SweepRow:
    """One built variant scored against fp32: `reference` is a recorded reference (record.py) or the fp32
    model / folder (then recorded here first, and a folder released before the variant loads)."""
    specs = as_specs(prompts)
    records = reference if isinstance(reference, (RecordFolder, list, tuple)) else record_reference(reference, specs, n_steps)
    variant = open_model(folder)
    try:
        cmp = compare_recorded(records, variant, specs, n_steps)
    finally:
        release(variant)
    return SweepRow.from_record(recipe, {**score_record(cmp, n_steps), "folder": str(folder),
                                         "decoder_mb": _decoder_mb(folder), "quantize_seconds": seconds},
                                cached=False)


# -- the jobs (run here, in a local process or as Ray tasks) -------------------------------------
@dataclass(frozen=True)
class ReferenceJob:
    """Record the fp32 reference's greedy runs on the prompt set into `folder` (record.py)."""

    fp32: str
    folder: str
    prompts: list
    n_steps: int
    meta: dict
    sizes: dict  # export file -> bytes, as the driver sees them
    threads: int | None = None


def run_reference_job(job: ReferenceJob) -> dict:
    t0 = time.perf_counter()
    try:
        check_export(Path(job.fp32), job.sizes)
        model = open_model(job.fp32, "fp32", RuntimeOptions(threads=job.threads))
        try:
            records = record_reference(model, job.prompts, job.n_steps)
        finally:
            release(model)
        save_records(records, job.folder, job.meta)
    except Exception as e:  # nothing can be scored without the reference: the sweep stops with this line
        return {"error": str(e) if isinstance(e, UserError) else error_record(e)["error"], "fatal": True}
    return {"folder": job.folder, "seconds": time.perf_counter() - t0, "host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True)
class VariantJob:
    """Build one variant, score it against the saved reference record, clean it up (unless kept)."""

    fp32: str
    root: str
    recipe: Int4Recipe | SimRecipe
    fingerprint: str
    sizes: dict
    reference: str  # the saved record's folder
    prompts: list
    n_steps: int
    keep_variant: bool = True
    threads: int | None = None


def run_variant_job(job: VariantJob) -> dict:
    """-> the row's record (small JSON: figures and per-step arrays), or {"error": ...} ("fatal" when this
    worker cannot read the export or the record: no other variant could be scored there either)."""
    base = {"recipe": job.recipe.name, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        check_export(Path(job.fp32), job.sizes)
        records = RecordFolder(job.reference)
    except UserError as e:
        return {**base, "error": str(e), "fatal": True}
    root = Path(job.root)
    folder = root / job.recipe.name
    try:
        folder, build_seconds, reused = build_variant(Path(job.fp32), root, job.recipe, fingerprint=job.fingerprint,
                                                      assets=root / ASSETS_FOLDER)
        t0 = time.perf_counter()
        variant = open_model(folder, "fp32", RuntimeOptions(threads=job.threads))
        try:
            cmp = compare_recorded(records, variant, job.prompts, job.n_steps, reference=job.fp32)
        finally:
            release(variant)
            del variant
        return {**base, **score_record(cmp, job.n_steps), "folder": str(folder), "decoder_mb": _decoder_mb(folder),
                "quantize_seconds": build_seconds, "variant_reused": reused, "score_seconds": time.perf_counter() - t0}
    except UserError as e:
        return {**base, "error": str(e)}
    except Exception as e:  # a recipe onnxruntime refuses, a graph that does not load: this row fails, not the sweep
        return {**base, **error_record(e)}
    finally:
        if not job.keep_variant:
            remove_variant(folder)  # only a stamped variant folder: never one the user made


def _reference_folder(root: Path, fingerprint: str, digest: str) -> Path:
    return root / REFERENCE_FOLDER / f"{fingerprint}-{digest}"


def sweep(model_dir: str | Path, recipes: Sequence[Int4Recipe | SimRecipe] | None = None,
          prompts: Sequence[PromptLike] | PromptLike | None = None, *, out_dir: str | Path | None = None,
          n_steps: int = 12, image=None, image_size: int | None = None, progress: bool = True,
          keep_comparisons: bool = True, backend: Backend | None = None,
          keep_variants: bool | None = None) -> SweepResult:
    """Quantize every recipe from the fp32 export in `model_dir`, compare each with fp32, rank them.

    recipes: Int4Recipe (onnxruntime) and SimRecipe (simulated) objects; default `default_recipes()`.
    out_dir: where the variants, the fp32 reference's record and every finished result are kept: a
    second call with the same export, recipe and prompts reads its row from OUT_DIR/.results instead
    of building and running anything (row.cached), so an interrupted sweep continues where it stopped.
    None = a temporary folder removed afterwards.
    backend: where the jobs run (cluster.py): here one after another (default), `Backend(workers=N)`,
    or `Backend(ray=True, address=...)`. The fp32 reference is recorded by one job first, then each
    variant is one job (build, score, clean up); only small records come back.
    keep_variants: keep each built variant in out_dir (default: yes here, no with workers or Ray).
    """
    backend = (backend or Backend()).validate()
    fp32 = fp32_source(model_dir).resolve()
    recipes = [r.validate() for r in (recipes if recipes is not None else default_recipes())]
    if backend.ray:
        connect_ray(backend.address)  # an unreachable cluster or a missing ray: one line now, before any work
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UserError("the recipe list has duplicates (after normalisation); pass each recipe once")
    specs = as_specs(prompts, image, image_size)
    keep = backend.local if keep_variants is None else keep_variants
    temp = out_dir is None
    rows: dict[str, SweepRow] = {}
    reference_cached = True
    with folder_or_temporary(out_dir, "qwen3vl-sweep-") as root:
        root.mkdir(parents=True, exist_ok=True)
        fingerprint, digest = cached_fingerprint(fp32, root), prompt_digest(specs, n_steps)
        cache = ResultCache(root)
        keys = {r.name: result_key(kind="sweep", source=fingerprint, recipe=r.to_dict(),
                                   builder=builder_version(r), prompts=digest) for r in recipes}
        for r in recipes:
            record = cache.get(keys[r.name])
            if record is not None:
                rows[r.name] = SweepRow.from_record(r, record, cached=True)
        todo = [r for r in recipes if r.name not in rows]
        if todo:
            sizes = export_sizes(fp32)
            meta = {"source": fingerprint, "prompts": digest}
            ref_folder = _reference_folder(root, fingerprint, digest)
            if not folder_verifies(ref_folder, meta):  # an edited record would score every variant wrongly
                reference_cached = False
                job = ReferenceJob(str(fp32), str(ref_folder), specs, n_steps, meta, sizes, backend.threads)
                vision = any(getattr(s, "image", None) is not None for s in specs)
                run_jobs(run_reference_job, [job], backend, _stop_on_error,
                         memory=[variant_memory(fp32, FP32, vision=vision)], names=["fp32 reference"])
                seal_folder(ref_folder, meta)
            shared_assets(fp32, root)  # one copy of embedding/vision + pytorch/, linked into each variant
            jobs = [VariantJob(str(fp32), str(root), r, fingerprint, sizes, str(ref_folder), specs, n_steps, keep,
                               backend.threads) for r in todo]
            bar = tqdm(total=len(recipes), initial=len(rows), desc="sweep", unit="recipe", disable=not progress)

            def finished(i: int, record: dict) -> None:
                if record.get("fatal"):
                    raise UserError(record["error"])
                recipe = todo[i]
                if "error" not in record:
                    cache.put(keys[recipe.name], record)  # kept as soon as it is done: a later run resumes after it
                rows[recipe.name] = SweepRow.from_record(recipe, record, cached=False)
                bar.update(1)

            try:
                run_jobs(run_variant_job, jobs, backend, finished,
                         memory=[variant_memory(fp32, r, vision=any(getattr(s, "image", None) is not None
                                                                    for s in specs)) for r in todo],
                         names=[r.name for r in todo])
            finally:
                bar.close()
    ranked = sorted(rows.values(), key=lambda r: (r.failed, r.mean_kl if not r.failed else 0.0, -np.nan_to_num(r.agreement)))
    if not keep_comparisons:
        for r in ranked:
            r.comparison = None
    labels = [s.label if hasattr(s, "label") else "<prepared prompt>" for s in specs]
    result = SweepResult(ranked, labels, n_steps, reference_cached=reference_cached, backend=backend.describe())
    if not temp:
        write_json_atomic(root / "sweep.json", result.to_json())
    return result


def _stop_on_error(i: int, record: dict) -> None:
    if "error" in record:
        raise UserError(record["error"])


def read_quantization(folder: str | Path) -> dict | None:
    """A variant's quantization.json (recipe, per-node bits/blocks, timings), or None."""
    path = Path(folder) / QUANTIZATION_FILE
    return read_json(path, fix=f"delete the folder {path.parent} to build that variant again") if path.is_file() else None


__all__ = ["ReferenceJob", "SweepResult", "SweepRow", "VariantJob", "default_recipes", "evaluate_variant",
           "read_quantization", "run_reference_job", "run_variant_job", "score_record", "sweep"]
