"""Answers, not logits: how much does a quantization recipe cost on the shapes task?

KL divergence and top-1 agreement (compare.py, sweep.py) say how far a variant drifts from fp32;
on the trained shapes model (`qwen3vl-lab make-tiny --trained`) we can also ask the question that
matters: does it still answer correctly? Every recipe is built from the fp32 export into its own
folder (debug/variants.py), and `shapes.evaluate.evaluate_shapes` runs the same held-out scenes through each.

    result = recipe_accuracy("models/shapes-onnx", ["fp32", Int4Recipe(), Int4Recipe(bits=2, block_size=128),
                                                    SimRecipe(bits=3)], n=20, out_dir="variants")
    print(result.table())                      # accuracy per question type, and how many answers are well formed
    print(result.examples_table())             # the same questions, answered by every recipe
    result.row("sim-int3-per-tensor").accuracy("all")

Recipes: "fp32" (the reference), an `Int4Recipe` (onnxruntime's MatMulNBitsQuantizer: 4-bit, or
2-bit / 8-bit MatMulNBits; by name, e.g. "default-2bit-b16-asym-acc4-head_int4") or a `SimRecipe`
(a SIMULATION for what MatMulNBits cannot run: 3 bits, per-tensor scales, clipping search; names
start with "sim-"; see simulate.py). Variants are cached in `out_dir/<recipe name>/` with a stamp
naming the fp32 decoder they came from (a content hash), so a second run reuses them and a new
checkpoint rebuilds them.

"Well formed" counts answers that are some answer of the task (`shapes.all_answers()`: "Red.",
"A blue square on the left.", ...), right or wrong: a model that still talks the task's language but
mixes up a colour is wrong and well formed; word salad is neither.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..debug.cluster import Backend, connect_ray, error_record, run_jobs
from ..debug.inputs import open_model
from ..debug.record import release
from ..debug.results import ResultCache, result_key
from ..debug.simulate import SimRecipe
from ..debug.variants import (
    ASSETS_FOLDER,
    FP32,
    Recipe,
    build_variant,
    builder_version,
    cached_fingerprint,
    check_export,
    contrast_recipes,
    export_sizes,
    fp32_source,
    parse_recipe,
    recipe_name,
    remove_variant,
    shared_assets,
    source_fingerprint,
    variant_memory,
)
from ..errors import UserError
from ..export.files import folder_or_temporary
from ..export.quantize import Int4Recipe
from ..model import RuntimeOptions, load_model
from . import task as shapes
from .evaluate import evaluate_shapes

MIN_FP32_ACCURACY = 0.5  # below this the model is not the trained shapes model: accuracies would mean nothing


# -- results -------------------------------------------------------------------------------------
@dataclass
class AccuracyRow:
    """One recipe's answers to every held-out question."""

    recipe: Int4Recipe | SimRecipe | str
    folder: str
    table: dict  # shapes.accuracy_table: per question type, per object count, "all" -> correct / total / accuracy
    predictions: list[str] = field(repr=False)
    well_formed: float  # share of answers that are some answer of the task, right or wrong
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    reused: bool = False  # the variant folder came from the cache
    cached: bool = False  # the whole row came from the result cache (nothing was built or run for it)
    error: str | None = None  # the variant failed (build, load or run): no answers
    host: str = ""

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_record(self) -> dict:
        """Plain JSON, what the result cache keeps and a worker sends back."""
        return {"recipe": self.name, "folder": self.folder, "table": self.table, "predictions": self.predictions,
                "well_formed": self.well_formed, "build_seconds": self.build_seconds,
                "eval_seconds": self.eval_seconds, "variant_reused": self.reused, "host": self.host, "pid": os.getpid()}

    @classmethod
    def from_record(cls, recipe, record: dict, *, cached: bool) -> "AccuracyRow":
        if "error" in record:
            return cls(recipe, record.get("folder", ""), {}, [], 0.0, cached=cached, error=record["error"],
                       host=record.get("host", ""))
        return cls(recipe, record["folder"], record["table"], list(record["predictions"]), record["well_formed"],
                   record["build_seconds"], record["eval_seconds"], bool(record.get("variant_reused")), cached,
                   None, record.get("host", ""))

    @property
    def name(self) -> str:
        return recipe_name(self.recipe)

    @property
    def simulated(self) -> bool:
        return isinstance(self.recipe, SimRecipe)

    @property
    def kind(self) -> str:
        """"fp32", "onnxruntime" (real MatMulNBits) or "SIMULATED"."""
        return FP32 if self.recipe == FP32 else ("SIMULATED" if self.simulated else "onnxruntime")

    @property
    def bits(self) -> int:
        return 32 if self.recipe == FP32 else self.recipe.bits

    @property
    def block(self) -> str:
        if self.recipe == FP32:
            return "-"
        return "tensor" if self.recipe.block_size is None else str(self.recipe.block_size)

    @property
    def symmetric(self) -> bool | None:
        return None if self.recipe == FP32 else self.recipe.symmetric

    @property
    def algorithm(self) -> str:
        return "-" if self.recipe == FP32 else self.recipe.algorithm

    @property
    def label(self) -> str:
        """A short label for plots: 'int4 b32 sym MatMulNBits' (real), 'int3 per-tensor sym SIMULATED'."""
        if self.recipe == FP32:
            return FP32
        r = self.recipe
        block = "per-tensor" if r.block_size is None else f"b{r.block_size}"
        algorithm = {"default": "", "sim-rtn": "", "sim-mse": " mse"}.get(r.algorithm, f" {r.algorithm}")
        head = "" if r.lm_head in ("int4", "sim") else f" head {r.lm_head}"
        return (f"int{r.bits} {block} {'sym' if r.symmetric else 'asym'}{algorithm}{head} "
                f"{'SIMULATED' if self.simulated else 'MatMulNBits'}")

    def accuracy(self, key: str = "all") -> float:
        """Exact-match accuracy of one question type ("colour", ...), object count ("2_object") or "all";
        NaN for a failed row."""
        if self.failed:
            return float("nan")
        if key not in self.table:
            raise UserError(f"no accuracy for {key!r}; choose from {', '.join(self.table)}")
        return float(self.table[key]["accuracy"])


@dataclass
class AccuracyResult:
    """Every recipe on the same held-out questions, rows in the order the recipes were given."""

    rows: list[AccuracyRow]
    questions: list  # shapes.QA, in evaluation order
    n_objects: list[int]
    n: int
    seed: int

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def row(self, recipe: Recipe) -> AccuracyRow:
        name = recipe_name(parse_recipe(recipe))
        for r in self.rows:
            if r.name == name:
                return r
        raise UserError(f"recipe {name!r} was not evaluated; evaluated: {', '.join(self.names)}")

    def accuracy(self, key: str = "all") -> np.ndarray:
        """(R,) one accuracy per row."""
        return np.array([r.accuracy(key) for r in self.rows])

    @property
    def well_formed(self) -> np.ndarray:
        return np.array([r.well_formed for r in self.rows])

    def same_as(self, recipe: Recipe, reference: Recipe = FP32) -> float:
        """Share of questions where `recipe` gives exactly the reference's answer (right or wrong)."""
        a, b = self.row(recipe).predictions, self.row(reference).predictions
        if self.row(recipe).failed:
            return float("nan")
        return float(np.mean([x == y for x, y in zip(a, b)])) if a else 1.0

    def select(self, recipes: Sequence[Recipe]) -> "AccuracyResult":
        """The same result with only these rows, in this order (e.g. fp32 and INT4 for a first look)."""
        return AccuracyResult([self.row(r) for r in recipes], self.questions, self.n_objects, self.n, self.seed)

    def table(self) -> str:
        """One line per recipe; SIMULATED rows say so in their own column."""
        kinds = [k for k in shapes.QUESTION_TYPES if k in self.rows[0].table]  # row 0 is fp32: it never fails
        head = (f"{'recipe':38s} {'kind':11s} {'bits':>4s} {'block':>6s} {'sym':>4s} {'algorithm':9s} "
                + " ".join(f"{k[:8]:>8s}" for k in kinds) + f" {'all':>6s} {'formed':>6s} {'=fp32':>6s}")
        title = (f"shapes accuracy: {self.n} held-out scenes (seed {self.seed}), {len(self.questions)} questions, "
                 "exact match, greedy")
        lines = [title, head, "-" * len(head)]
        for r in self.rows:
            if r.failed:
                lines.append(f"{r.name[:38]:38s} FAILED: {r.error[:110]}")
                continue
            sym = "-" if r.symmetric is None else ("yes" if r.symmetric else "no")
            lines.append(f"{r.name[:38]:38s} {r.kind:11s} {r.bits:4d} {r.block:>6s} {sym:>4s} {r.algorithm:9s} "
                         + " ".join(f"{r.accuracy(k):8.0%}" for k in kinds)
                         + f" {r.accuracy('all'):6.0%} {r.well_formed:6.0%} {self._same(r):>6s}")
        if any(r.simulated for r in self.rows):
            lines.append("SIMULATED: fp32 MatMuls holding rounded weights (MatMulNBits runs 2/4/8 bits only), "
                         "not onnxruntime quantized models")
        n_cached = sum(r.cached for r in self.rows)
        if n_cached:
            lines.append(f"{n_cached} of {len(self.rows)} row(s) read from the result cache (OUT_DIR/.results)")
        return "\n".join(lines)

    def _same(self, row: AccuracyRow) -> str:
        has_fp32 = any(r.recipe == FP32 for r in self.rows)
        return f"{self.same_as(row.recipe):.0%}" if has_fp32 and row.recipe != FP32 else "-"

    def example_indices(self, k: int = 4) -> list[int]:
        """k questions worth showing side by side: per question type, the one fp32 answers right that the
        most recipes get wrong (the first such question when they all agree)."""
        expected = [qa.answer for qa in self.questions]
        fp32 = next((r for r in self.rows if r.recipe == FP32), None)

        def score(i: int) -> tuple:
            fp32_right = fp32 is None or shapes.exact_match(fp32.predictions[i], expected[i])
            wrong = sum(not shapes.exact_match(r.predictions[i], expected[i]) for r in self.rows if not r.failed)
            return (fp32_right, wrong, -i)

        picked = []
        for kind in shapes.QUESTION_TYPES:
            candidates = [i for i, qa in enumerate(self.questions) if qa.kind == kind]
            if candidates:
                picked.append(max(candidates, key=score))
        return sorted(picked[:k])

    def examples(self, indices: Sequence[int] | None = None, k: int = 4) -> list[dict]:
        """[{"question", "expected", "answers": {recipe name: answer}}] for the chosen questions."""
        indices = self.example_indices(k) if indices is None else list(indices)
        return [{"question": self.questions[i].question, "expected": self.questions[i].answer,
                 "answers": {r.name: r.predictions[i] for r in self.rows if not r.failed}} for i in indices]

    def examples_table(self, indices: Sequence[int] | None = None, k: int = 4, width: int = 72) -> str:
        """The same questions answered by every recipe; '=' marks a correct answer, 'x' a wrong one."""
        lines = []
        for ex in self.examples(indices, k):
            lines.append(f"Q: {ex['question']}   expected: {ex['expected']!r}")
            for name, ans in ex["answers"].items():
                mark = "=" if shapes.exact_match(ans, ex["expected"]) else "x"
                shown = ans if len(ans) <= width else ans[:width - 3] + "..."
                lines.append(f"  {mark} {name[:38]:38s} {shown!r}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"n": self.n, "seed": self.seed, "questions": len(self.questions),
                "rows": [{"recipe": r.name, "kind": r.kind, "simulated": r.simulated, "bits": r.bits, "block": r.block,
                          "symmetric": r.symmetric, "algorithm": r.algorithm, "accuracy": r.table,
                          "well_formed": r.well_formed, "folder": r.folder, "cached": r.cached,
                          "variant_reused": r.reused, "error": r.error} for r in self.rows]}


# -- the evaluation ------------------------------------------------------------------------------
def _well_formed(predictions: Sequence[str]) -> float:
    valid = set(shapes.all_answers())
    return float(np.mean([p.strip() in valid for p in predictions])) if predictions else 0.0


def _evaluate(folder: Path, recipe, n: int, seed: int, options: RuntimeOptions | None, *, build_seconds: float = 0.0,
              reused: bool = False):
    model = open_model(folder, "fp32", options)  # an fp32 graph's weights stay memory-mapped (debug/inputs.py)
    try:
        t0 = time.perf_counter()
        ev = evaluate_shapes(model, n=n, seed=seed, progress=False)
    finally:
        release(model)
    row = AccuracyRow(recipe, str(folder), ev.table, ev.predictions, _well_formed(ev.predictions),
                      build_seconds, time.perf_counter() - t0, reused, host=socket.gethostname())
    return row, ev


def heldout_questions(n: int, seed: int) -> tuple[list, list[int]]:
    """The held-out questions `evaluate_shapes` asks (and each one's object count), without a model."""
    qas, counts = [], []
    for _, objects in shapes.heldout_set(n, seed):
        for qa in shapes.question_answer_pairs(objects):
            qas.append(qa)
            counts.append(len(objects))
    return qas, counts


# -- the jobs (run here, in a local process or as Ray tasks; debug/cluster.py) ---------------------
@dataclass(frozen=True)
class AccuracyJob:
    """Build one recipe's variant (nothing for fp32), answer the held-out questions, clean it up (unless kept)."""

    fp32: str
    root: str
    recipe: Int4Recipe | SimRecipe | str
    fingerprint: str
    sizes: dict  # export file -> bytes, as the driver sees them
    n: int
    seed: int
    options: RuntimeOptions | None = None
    keep_variant: bool = True


def run_accuracy_job(job: AccuracyJob) -> dict:
    """-> the row's record (answers and accuracy table: small JSON), or {"error": ...} ("fatal" when this worker
    cannot read the export: no recipe could be scored there)."""
    base = {"recipe": recipe_name(job.recipe), "host": socket.gethostname(), "pid": os.getpid()}
    try:
        check_export(Path(job.fp32), job.sizes)
    except UserError as e:
        return {**base, "error": str(e), "fatal": True}
    if job.recipe == FP32:
        try:
            return _evaluate(Path(job.fp32), FP32, job.n, job.seed, job.options)[0].to_record()
        except Exception as e:
            return {**base, "error": str(e) if isinstance(e, UserError) else error_record(e)["error"]}
    root = Path(job.root)
    folder = root / recipe_name(job.recipe)
    try:
        folder, seconds, reused = build_variant(Path(job.fp32), root, job.recipe, fingerprint=job.fingerprint,
                                                assets=root / ASSETS_FOLDER)
        return _evaluate(folder, job.recipe, job.n, job.seed, job.options, build_seconds=seconds,
                         reused=reused)[0].to_record()
    except UserError as e:
        return {**base, "error": str(e)}
    except Exception as e:  # a recipe onnxruntime refuses: this row fails, not the evaluation
        return {**base, **error_record(e)}
    finally:
        if not job.keep_variant:
            remove_variant(folder)  # only a stamped variant folder: never one the user made


def load_variant(model_dir: str | Path, recipe: Recipe, out_dir: str | Path,
                 options: RuntimeOptions | None = None):
    """The variant `recipe` of the export's fp32 decoder as a loaded Model, built into out_dir/<name>/ once
    (`recipe_accuracy` with the same out_dir reuses it); "fp32" loads the export's own fp32 folder."""
    recipe = parse_recipe(recipe)
    fp32 = fp32_source(model_dir)
    if recipe == FP32:
        return load_model(fp32, "fp32", options)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder, _, _ = build_variant(fp32, root, recipe, fingerprint=source_fingerprint(fp32),
                                 assets=shared_assets(fp32, root))
    return load_model(folder, "fp32", options)


def recipe_accuracy(model_dir: str | Path, recipes: Sequence[Recipe] | None = None, *, n: int = 20, seed: int = 0,
                    out_dir: str | Path | None = None, options: RuntimeOptions | None = None,
                    progress: bool = True, backend: Backend | None = None,
                    keep_variants: bool | None = None) -> AccuracyResult:
    """Build every recipe from the export's fp32 decoder and score each on the same n held-out shapes scenes.

    recipes: "fp32", Int4Recipe, SimRecipe or names (default `contrast_recipes()`); fp32 is always
    evaluated (first, when not listed) because it is the yardstick, and a model whose fp32 answers
    score below 50 % is not the trained shapes model: that is refused with a one-line error.
    out_dir: where the variants and every finished row are kept: a second call with the same export,
    recipe, n and seed reads the row from OUT_DIR/.results (row.cached) instead of building and running
    anything, so an interrupted evaluation continues where it stopped. None = a temporary folder.
    backend: where each recipe's job (build, answer, clean up) runs (debug/cluster.py): here (default),
    in local processes or as Ray tasks. keep_variants: keep built variants (default: here yes, else no).
    """
    shapes.check_heldout_count(n)
    backend = (backend or Backend()).validate()
    parsed = [parse_recipe(r) for r in (recipes if recipes is not None else contrast_recipes())]
    names = [recipe_name(r) for r in parsed]
    if len(set(names)) != len(names):
        raise UserError("the recipe list has duplicates (after normalisation); pass each recipe once")
    if FP32 not in parsed:
        parsed.insert(0, FP32)
    fp32 = fp32_source(model_dir).resolve()
    if backend.ray:
        connect_ray(backend.address)  # an unreachable cluster or a missing ray: one line now, before any work
    keep = backend.local if keep_variants is None else keep_variants
    if backend.threads is not None:
        options = replace(options or RuntimeOptions(), threads=backend.threads)
    rows: dict[str, AccuracyRow] = {}
    with (folder_or_temporary(out_dir, "qwen3vl-accuracy-") as root,
          tqdm(total=len(parsed), desc="recipe accuracy", unit="recipe", disable=not progress) as bar):
        root.mkdir(parents=True, exist_ok=True)
        fingerprint, sizes = cached_fingerprint(fp32, root), export_sizes(fp32)
        cache = ResultCache(root)
        keys = {recipe_name(r): result_key(kind="shapes-accuracy", source=fingerprint, n=n, seed=seed,
                                           recipe=r if r == FP32 else r.to_dict(),
                                           builder="-" if r == FP32 else builder_version(r)) for r in parsed}

        def job(recipe) -> AccuracyJob:
            return AccuracyJob(str(fp32), str(root), recipe, fingerprint, sizes, n, seed, options, keep)

        def finished(todo):
            def on_result(i: int, record: dict) -> None:
                recipe = todo[i]
                if record.get("fatal"):
                    raise UserError(record["error"])
                if "error" not in record:
                    cache.put(keys[recipe_name(recipe)], record)  # kept at once: a later call resumes after it
                rows[recipe_name(recipe)] = AccuracyRow.from_record(recipe, record, cached=False)
                bar.update(1)
            return on_result

        for r in parsed:
            record = cache.get(keys[recipe_name(r)])
            if record is not None:
                rows[recipe_name(r)] = AccuracyRow.from_record(r, record, cached=True)
                bar.update(1)
        if FP32 not in rows:  # the yardstick first: a wrong model stops here, before any variant is built
            run_jobs(run_accuracy_job, [job(FP32)], backend, finished([FP32]),
                     memory=[variant_memory(fp32, FP32, vision=True)], names=["fp32"])
        reference = rows[FP32]
        if reference.failed:
            raise UserError(f"the fp32 export could not be evaluated ({reference.error}); re-export it")
        if reference.accuracy("all") < MIN_FP32_ACCURACY:
            raise UserError(f"fp32 answers only {reference.accuracy('all'):.0%} of the shapes questions, so {fp32} is "
                            "not the trained shapes model; make it with `qwen3vl-lab make-tiny --trained` and export it")
        todo = [r for r in parsed if recipe_name(r) not in rows]
        if todo:
            shared_assets(fp32, root)  # one copy of embedding/vision + pytorch/, linked into each variant
            run_jobs(run_accuracy_job, [job(r) for r in todo], backend, finished(todo),
                     memory=[variant_memory(fp32, r, vision=True) for r in todo], names=[recipe_name(r) for r in todo])
    questions, counts = heldout_questions(n, seed)
    return AccuracyResult([rows[recipe_name(r)] for r in parsed], questions, counts, n, seed)


__all__ = ["FP32", "AccuracyJob", "AccuracyResult", "AccuracyRow", "build_variant", "heldout_questions", "run_accuracy_job", "contrast_recipes", "load_variant",
           "parse_recipe", "recipe_accuracy", "shared_assets", "source_fingerprint"]
