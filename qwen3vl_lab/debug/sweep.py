"""A recipe sweep: build several INT4 variants of one fp32 export and rank them by agreement with fp32.

    result = sweep("OUT", recipes=default_recipes(), prompts=["Hi", PromptSpec("What is it?", image="a.jpg")],
                   out_dir="OUT/sweep")
    print(result.table())
    result.names, result.mean_kl, result.agreement          # arrays in rank order, ready to plot

Every variant is quantized from OUT/cpu-fp32 by onnxruntime's MatMulNBitsQuantizer (export/quantize.py)
into OUT_DIR/<recipe name>/ (fp32 embedding/vision and the export's pytorch/ files: one private copy in
OUT_DIR/.fp32-assets, hard-linked into every variant), then compared with fp32 by teacher forcing
(debug/compare.py). A `SimRecipe` (simulate.py: 3 bits, per-tensor scales, ...) is built as a SIMULATED
variant instead, and its rows say so. A variant already in OUT_DIR, stamped with the same fp32 decoder
and recipe, is reused (`accuracy.build_variant`); `accuracy.recipe_accuracy` scores the same variants
on the shapes task. Ranking: lowest mean KL(fp32 || variant) over every step
of every prompt first; top-1 agreement and the free-greedy divergence step are reported alongside.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..export.quantize import QUANTIZATION_FILE, Int4Recipe
from ..layout import DECODER_FILE
from ..model import Model, load_model
from .compare import Comparison, compare
from .inputs import PromptLike, as_specs
from .simulate import SimRecipe
from .variants import build_variant, fp32_source, shared_assets, source_fingerprint


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

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def simulated(self) -> bool:
        return isinstance(self.recipe, SimRecipe)


@dataclass
class SweepResult:
    rows: list[SweepRow]  # best first
    prompts: list[str]
    n_steps: int
    ranked_by: str = "mean_kl"

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

    def rank_of(self, recipe: Int4Recipe | SimRecipe | str) -> int:
        name = recipe if isinstance(recipe, str) else recipe.validate().name
        return self.names.index(name)

    def table(self) -> str:
        head = f"{'#':>2s} {'recipe':42s} {'mean KL':>9s} {'max KL':>8s} {'top-1':>6s} {'rank':>7s} " \
               f"{'diverge':>7s} {'MB':>7s} {'quant s':>7s}"
        lines = [f"recipe sweep: {len(self.prompts)} prompt(s) x {self.n_steps} steps, ranked by {self.ranked_by}",
                 head, "-" * len(head)]
        for i, r in enumerate(self.rows):
            sim = "  SIMULATED" if r.simulated else ""
            lines.append(f"{i + 1:2d} {r.name[:42]:42s} {r.mean_kl:9.4f} {r.max_kl:8.4f} {r.agreement:6.0%} "
                         f"{r.mean_ref_rank:7.1f} {r.first_divergence:7.1f} {r.decoder_mb:7.1f} {r.quantize_seconds:7.2f}{sim}")
        if any(r.simulated for r in self.rows):
            lines.append("SIMULATED: fp32 MatMuls holding rounded weights (simulate.py), not onnxruntime quantized "
                         "models; their MB are fp32 sizes")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "n_steps": self.n_steps, "ranked_by": self.ranked_by,
                "rows": [{"recipe": r.recipe.to_dict(), "simulated": r.simulated, "folder": r.folder,
                          "mean_kl": r.mean_kl, "max_kl": r.max_kl, "top1_agreement": r.agreement,
                          "mean_ref_rank": r.mean_ref_rank,
                          "first_divergence": r.first_divergence, "decoder_mb": r.decoder_mb,
                          "quantize_seconds": r.quantize_seconds} for r in self.rows]}


def _decoder_mb(folder: Path) -> float:
    return sum((folder / f).stat().st_size for f in (DECODER_FILE, DECODER_FILE + ".data")
               if (folder / f).is_file()) / 2**20


def evaluate_variant(reference: Model, folder: Path, recipe: Int4Recipe | SimRecipe, prompts, n_steps: int,
                     seconds: float) -> SweepRow:
    variant = load_model(folder)
    cmp = compare(reference, variant, prompts, n_steps)
    kl = cmp.kl
    div = [n_steps if d is None else d for d in cmp.first_divergences]
    return SweepRow(recipe, str(folder), cmp.mean_kl, float(kl.max()) if len(kl) else 0.0, cmp.agreement,
                    cmp.mean_ref_rank, float(np.mean(div)) if div else float(n_steps), _decoder_mb(folder), seconds, cmp)


def sweep(model_dir: str | Path, recipes: Sequence[Int4Recipe | SimRecipe] | None = None,
          prompts: Sequence[PromptLike] | PromptLike | None = None, *, out_dir: str | Path | None = None,
          n_steps: int = 12, image=None, image_size: int | None = None, progress: bool = True,
          keep_comparisons: bool = True) -> SweepResult:
    """Quantize every recipe from the fp32 export in `model_dir`, compare each with fp32, rank them.

    recipes: Int4Recipe (onnxruntime) and SimRecipe (simulated) objects; default `default_recipes()`.
    out_dir: where the variants are written (kept, and reused by later calls); None = a temporary
    folder removed afterwards.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    fp32 = fp32_source(model_dir)
    recipes = [r.validate() for r in (recipes if recipes is not None else default_recipes())]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UserError("the recipe list has duplicates (after normalisation); pass each recipe once")
    specs = as_specs(prompts, image, image_size)
    reference = load_model(fp32)
    temp = out_dir is None
    root = Path(tempfile.mkdtemp(prefix="qwen3vl-sweep-")) if temp else Path(out_dir)
    rows = []
    try:
        root.mkdir(parents=True, exist_ok=True)
        assets = shared_assets(fp32, root)  # one copy of embedding/vision + pytorch/, linked into each variant
        fingerprint = source_fingerprint(fp32)
        for recipe in tqdm(recipes, desc="sweep", unit="recipe", disable=not progress):
            folder, seconds, _ = build_variant(fp32, root, recipe, fingerprint=fingerprint, assets=assets)
            row = evaluate_variant(reference, folder, recipe, specs, n_steps, seconds)
            if not keep_comparisons:
                row.comparison = None
            rows.append(row)
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    rows.sort(key=lambda r: (r.mean_kl, -r.agreement))
    labels = [s.label if hasattr(s, "label") else "<prepared prompt>" for s in specs]
    result = SweepResult(rows, labels, n_steps)
    if not temp:
        (root / "sweep.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return result


def read_quantization(folder: str | Path) -> dict | None:
    """A variant's quantization.json (recipe, per-node bits/blocks, timings), or None."""
    path = Path(folder) / QUANTIZATION_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


__all__ = ["SweepResult", "SweepRow", "default_recipes", "evaluate_variant", "read_quantization", "sweep"]
