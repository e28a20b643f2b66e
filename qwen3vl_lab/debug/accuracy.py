"""Answers, not logits: how much does a quantization recipe cost on the shapes task?

KL divergence and top-1 agreement (compare.py, sweep.py) say how far a variant drifts from fp32;
on the trained shapes model (`qwen3vl-lab make-tiny --trained`) we can also ask the question that
matters: does it still answer correctly? Every recipe is built from the fp32 export into its own
folder, and `shapes_eval.evaluate_shapes` runs the same held-out scenes through each.

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

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .. import shapes
from ..errors import UserError
from ..export.quantize import COPIED_FILES, Int4Recipe, link_or_copy, quantize_folder
from ..layout import DECODER_FILE, GENAI_CONFIG
from ..model import RuntimeOptions, load_model, resolve_folder
from .simulate import SimRecipe, simulate_folder

FP32 = "fp32"
VARIANT_STAMP = "variant.json"  # written last into a variant folder: its source, recipe and builder
PROCESSOR_FOLDER = "pytorch"  # the export's tokenizer / chat template / preprocessor files (beside cpu-*/)
MIN_FP32_ACCURACY = 0.5  # below this the model is not the trained shapes model: accuracies would mean nothing

Recipe = Union[Int4Recipe, SimRecipe, str]  # str: "fp32" or a recipe name


# -- recipes -------------------------------------------------------------------------------------
def parse_recipe(spec: Recipe) -> Int4Recipe | SimRecipe | str:
    """"fp32", a recipe object, or a name: "default-2bit-b16-asym-acc4-head_int4", "sim-int3-per-tensor"."""
    if isinstance(spec, (Int4Recipe, SimRecipe)):
        return spec.validate()
    if not isinstance(spec, str):
        raise UserError(f"a recipe is fp32, an Int4Recipe, a SimRecipe or a name, got {type(spec).__name__}")
    if spec == FP32:
        return FP32
    if spec.startswith("sim-"):
        return SimRecipe.from_name(spec)
    try:
        return Int4Recipe.from_name(spec)
    except UserError:
        raise UserError(f"recipe name {spec!r} is not fp32, an onnxruntime recipe (e.g. "
                        "default-b32-sym-acc4-head_int4, default-2bit-b16-asym-acc4-head_int4) or a simulated one (e.g. sim-int3-per-tensor, "
                        "sim-int2-b16-asym-mse)") from None


def recipe_name(recipe: Int4Recipe | SimRecipe | str) -> str:
    return recipe if isinstance(recipe, str) else recipe.name


def contrast_recipes() -> list:
    """fp32; INT4 as `export` writes it and coarser; 3 and 2 bits in blocks and per tensor (`--recipes contrast`).

    Real onnxruntime MatMulNBits for every 4- and 2-bit recipe in blocks; SIMULATED (`sim-`) for
    3 bits, one scale per matrix, and the clipping search.
    """
    return [
        FP32,
        Int4Recipe(),  # the builder's default: block 32, symmetric, accuracy_level 4, int4 lm_head
        Int4Recipe(block_size=128, symmetric=False, accuracy_level=0),  # MatMulNBitsQuantizer's own defaults
        SimRecipe(bits=4, block_size=None),  # one scale per matrix
        SimRecipe(bits=3, block_size=32),
        SimRecipe(bits=3, block_size=None),
        Int4Recipe(bits=2, block_size=128),  # 2 bits, one scale per 128 weights, plain rounding
        Int4Recipe(bits=2, block_size=16, symmetric=False),  # 2 bits, small asymmetric blocks
        SimRecipe(bits=2, block_size=16, symmetric=False, clip=True),  # ... and an error-minimising clip
        SimRecipe(bits=2, block_size=None),  # 2 bits, one scale per matrix
        SimRecipe(bits=2, block_size=None, clip=True),
        SimRecipe(bits=2, block_size=None, symmetric=False),
    ]


# -- variants, built once ------------------------------------------------------------------------
def export_root(folder: Path) -> Path:
    """The export folder around a precision folder (OUT for OUT/cpu-fp32), as `Model.root` finds it."""
    folder = Path(folder)
    return folder.parent if folder.name.startswith("cpu-") else folder


def _export_files(fp32_folder: Path) -> list[Path]:
    """Everything a variant takes from the export: the fp32 decoder, embedding and vision graphs, pytorch/."""
    fp32_folder = Path(fp32_folder)
    names = [DECODER_FILE, DECODER_FILE + ".data", *COPIED_FILES]
    processor = export_root(fp32_folder) / PROCESSOR_FOLDER
    extra = sorted(f for f in processor.iterdir() if f.is_file()) if processor.is_dir() else []
    return [fp32_folder / n for n in names if (fp32_folder / n).is_file()] + extra


def source_fingerprint(fp32_folder: Path) -> str:
    """A content hash of what the variants are made from (graphs, weights, tokenizer and preprocessor
    files): a variant made from another checkpoint is stale."""
    h = hashlib.sha256()
    for path in _export_files(fp32_folder):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def _builder_version(recipe: Int4Recipe | SimRecipe) -> str:
    """The code that builds a variant: simulate.py, or onnxruntime's quantizer driven by export/quantize.py."""
    import onnxruntime  # noqa: PLC0415

    from ..export import quantize  # noqa: PLC0415
    from . import simulate  # noqa: PLC0415

    module = simulate if isinstance(recipe, SimRecipe) else quantize
    code = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:12]
    return f"{module.__name__.rsplit('.', 1)[-1]}.py {code}, onnxruntime {onnxruntime.__version__}"


def _stamp(recipe: Int4Recipe | SimRecipe, fingerprint: str) -> dict:
    """What a variant is made of; a folder whose stamp differs (other weights, recipe or code) is rebuilt."""
    return {"source_sha256": fingerprint, "recipe": recipe.to_dict(), "builder": _builder_version(recipe)}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / VARIANT_STAMP).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _sync_file(src: Path, dst: Path) -> None:
    """Make dst a copy of src unless it is one already (same size and modification time: copy2 keeps both).

    A changed file gets a new inode (copy, then rename): variants still linked to the old one keep it
    until their stamps, which name the old source, get them rebuilt."""
    s = src.stat()
    if dst.is_file() and (dst.stat().st_size, dst.stat().st_mtime_ns) == (s.st_size, s.st_mtime_ns):
        return
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def shared_assets(fp32_folder: Path, root: Path) -> Path:
    """root/.fp32-assets: one private copy of the fp32 embedding/vision graphs and of the export's pytorch/
    folder (tokenizer, chat template, image preprocessor), hard-linked into every variant; refreshed when
    the export changed.

    Private, so the variants add no links to the export's own files (onnx's loader refuses external data
    with several links; an fp32 + INT4 export's embedding/vision files already have two, one per folder).
    """
    fp32_folder, assets = Path(fp32_folder), Path(root) / ".fp32-assets"
    (assets / PROCESSOR_FOLDER).mkdir(parents=True, exist_ok=True)
    for path in _export_files(fp32_folder):
        if path.parent == fp32_folder and path.name in COPIED_FILES:
            _sync_file(path, assets / path.name)
        elif path.parent != fp32_folder:  # pytorch/
            _sync_file(path, assets / PROCESSOR_FOLDER / path.name)
    return assets


def _link_processor_files(assets: Path, folder: Path) -> None:
    """A variant folder is its own export root (`Model.root`): it needs pytorch/ beside its graphs, or images
    would be preprocessed with default settings instead of the checkpoint's."""
    src = Path(assets) / PROCESSOR_FOLDER
    if not src.is_dir():
        return
    (folder / PROCESSOR_FOLDER).mkdir(exist_ok=True)
    for f in src.iterdir():
        dst = folder / PROCESSOR_FOLDER / f.name
        if not dst.exists():
            link_or_copy(f, dst, link=True)


def build_variant(fp32_folder: Path, root: Path, recipe: Int4Recipe | SimRecipe, *, fingerprint: str,
                  assets: Path) -> tuple[Path, float, bool]:
    """root/<recipe name>/ made from the fp32 folder, unless its stamp says it already is
    -> (folder, seconds it took to build, reused).

    Int4Recipe: onnxruntime's quantizer (`quantize_folder`); SimRecipe: the simulation (`simulate_folder`).
    Embedding/vision and pytorch/ files are hard-linked from `assets` (`shared_assets`).
    """
    folder = Path(root) / recipe.name
    stamp = _stamp(recipe, fingerprint)
    found = _read_stamp(folder) or {}
    if {k: found.get(k) for k in stamp} == stamp:
        return folder, float(found.get("build_seconds", 0.0)), True
    t0 = time.perf_counter()
    if isinstance(recipe, SimRecipe):
        simulate_folder(fp32_folder, folder, recipe, link=True, assets=assets)
    else:
        quantize_folder(fp32_folder, folder, recipe, progress=False, link=True, assets=assets)
    _link_processor_files(assets, folder)
    seconds = time.perf_counter() - t0
    stamp["build_seconds"] = round(seconds, 3)
    (folder / VARIANT_STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")  # last: marks it complete
    return folder, seconds, False


def fp32_source(model_dir: str | Path) -> Path:
    """The export's cpu-fp32 folder (or model_dir itself when it is one); refuses quantized and simulated folders."""
    folder = resolve_folder(model_dir, "fp32")
    genai = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8")).get("qwen3vl_lab", {})
    if genai.get("precision") != "fp32" or "simulation" in genai:
        raise UserError(f"{folder} is not the fp32 export (precision {genai.get('precision')!r}"
                        f"{', simulated' if 'simulation' in genai else ''}); pass the export folder with cpu-fp32/")
    return folder


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
        """Exact-match accuracy of one question type ("colour", ...), object count ("2_object") or "all"."""
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
        return float(np.mean([x == y for x, y in zip(a, b)])) if a else 1.0

    def select(self, recipes: Sequence[Recipe]) -> "AccuracyResult":
        """The same result with only these rows, in this order (e.g. fp32 and INT4 for a first look)."""
        return AccuracyResult([self.row(r) for r in recipes], self.questions, self.n_objects, self.n, self.seed)

    def table(self) -> str:
        """One line per recipe; SIMULATED rows say so in their own column."""
        kinds = [k for k in shapes.QUESTION_TYPES if k in self.rows[0].table]
        head = (f"{'recipe':38s} {'kind':11s} {'bits':>4s} {'block':>6s} {'sym':>4s} {'algorithm':9s} "
                + " ".join(f"{k[:8]:>8s}" for k in kinds) + f" {'all':>6s} {'formed':>6s} {'=fp32':>6s}")
        title = (f"shapes accuracy: {self.n} held-out scenes (seed {self.seed}), {len(self.questions)} questions, "
                 "exact match, greedy")
        lines = [title, head, "-" * len(head)]
        for r in self.rows:
            sym = "-" if r.symmetric is None else ("yes" if r.symmetric else "no")
            lines.append(f"{r.name[:38]:38s} {r.kind:11s} {r.bits:4d} {r.block:>6s} {sym:>4s} {r.algorithm:9s} "
                         + " ".join(f"{r.accuracy(k):8.0%}" for k in kinds)
                         + f" {r.accuracy('all'):6.0%} {r.well_formed:6.0%} {self._same(r):>6s}")
        if any(r.simulated for r in self.rows):
            lines.append("SIMULATED: fp32 MatMuls holding rounded weights (MatMulNBits runs 2/4/8 bits only), "
                         "not onnxruntime quantized models")
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
            wrong = sum(not shapes.exact_match(r.predictions[i], expected[i]) for r in self.rows)
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
                 "answers": {r.name: r.predictions[i] for r in self.rows}} for i in indices]

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
                          "well_formed": r.well_formed, "folder": r.folder} for r in self.rows]}


# -- the evaluation ------------------------------------------------------------------------------
def _well_formed(predictions: Sequence[str]) -> float:
    valid = set(shapes.all_answers())
    return float(np.mean([p.strip() in valid for p in predictions])) if predictions else 0.0


def _evaluate(folder: Path, recipe, n: int, seed: int, options: RuntimeOptions | None, *, build_seconds: float = 0.0,
              reused: bool = False):
    from ..shapes_eval import evaluate_shapes  # noqa: PLC0415

    model = load_model(folder, "fp32", options)
    t0 = time.perf_counter()
    ev = evaluate_shapes(model, n=n, seed=seed, progress=False)
    row = AccuracyRow(recipe, str(folder), ev.table, ev.predictions, _well_formed(ev.predictions),
                      build_seconds, time.perf_counter() - t0, reused)
    return row, ev


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
                    progress: bool = True) -> AccuracyResult:
    """Build every recipe from the export's fp32 decoder and score each on the same n held-out shapes scenes.

    recipes: "fp32", Int4Recipe, SimRecipe or names (default `contrast_recipes()`); fp32 is always
    evaluated (first, when not listed) because it is the yardstick, and a model whose fp32 answers
    score below 50 % is not the trained shapes model: that is refused with a one-line error.
    out_dir: where the variants are kept (reused by later calls); None = a temporary folder.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    if n < 1:
        raise UserError(f"n = {n} held-out scenes; pass n >= 1")
    parsed = [parse_recipe(r) for r in (recipes if recipes is not None else contrast_recipes())]
    names = [recipe_name(r) for r in parsed]
    if len(set(names)) != len(names):
        raise UserError("the recipe list has duplicates (after normalisation); pass each recipe once")
    if FP32 not in parsed:
        parsed.insert(0, FP32)
    fp32 = fp32_source(model_dir)
    others = [r for r in parsed if r != FP32]
    bar = tqdm(total=len(others) + 1, desc="recipe accuracy", unit="recipe", disable=not progress)
    reference, ev = _evaluate(fp32, FP32, n, seed, options)  # the yardstick first: a wrong model stops here
    bar.update(1)
    if reference.accuracy("all") < MIN_FP32_ACCURACY:
        bar.close()
        raise UserError(f"fp32 answers only {reference.accuracy('all'):.0%} of the shapes questions, so {fp32} is not "
                        "the trained shapes model; make it with `qwen3vl-lab make-tiny --trained` and export it")
    rows = [reference]
    temp = out_dir is None
    root = Path(tempfile.mkdtemp(prefix="qwen3vl-accuracy-")) if temp else Path(out_dir)
    try:
        if others:
            root.mkdir(parents=True, exist_ok=True)
            assets, fingerprint = shared_assets(fp32, root), source_fingerprint(fp32)
        for recipe in others:
            folder, seconds, reused = build_variant(fp32, root, recipe, fingerprint=fingerprint, assets=assets)
            rows.append(_evaluate(folder, recipe, n, seed, options, build_seconds=seconds, reused=reused)[0])
            bar.update(1)
    finally:
        bar.close()
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    order = {name: i for i, name in enumerate(recipe_name(r) for r in parsed)}
    rows.sort(key=lambda r: order[r.name])
    return AccuracyResult(rows, ev.questions, ev.n_objects, n, seed)


__all__ = ["FP32", "AccuracyResult", "AccuracyRow", "build_variant", "contrast_recipes", "load_variant",
           "parse_recipe", "recipe_accuracy", "shared_assets", "source_fingerprint"]
