"""Quantization variants of an fp32 export, built once and cached by content.

    fp32 = fp32_source("models/tiny-onnx")                   # OUT/cpu-fp32, refusing quantized folders
    folder, seconds, reused = build_variant(fp32, Path("variants"), Int4Recipe(bits=2),
                                            fingerprint=source_fingerprint(fp32), assets=shared_assets(fp32, root))

Recipes: "fp32" (the reference), an `Int4Recipe` (onnxruntime's MatMulNBitsQuantizer: 4-bit, or 2-bit /
8-bit MatMulNBits; by name, e.g. "default-2bit-b16-asym-acc4-head_int4") or a `SimRecipe` (a SIMULATION for
what MatMulNBits cannot run: 3 bits, per-tensor scales; names start with "sim-"; see simulate.py).
Each variant lives in `root/<recipe name>/` with a stamp naming the fp32 decoder it came from (a content
hash) and the builder's version, so a second run reuses it and a new checkpoint rebuilds it. The sweep
(sweep.py) and the shapes accuracy (shapes/accuracy.py) both build their variants here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Union

import onnxruntime

from ..errors import UserError
from ..export import quantize
from ..export.files import replace_folder, staging_file, staging_folder, stamp_folder
from ..export.quantize import COPIED_FILES, Int4Recipe, link_or_copy, quantize_folder
from ..jsonfile import try_json
from ..layout import DECODER_FILE
from ..layouts import own_settings, read_export_config
from ..model import resolve_folder
from ..signals import interruption_point
from . import simulate
from .results import seal
from .simulate import SimRecipe, simulate_folder

FP32 = "fp32"
VARIANT_STAMP = "variant.json"  # written last into a variant folder: its source, recipe and builder
PROCESSOR_FOLDER = "pytorch"
ASSETS_FOLDER = ".fp32-assets"  # root/.fp32-assets: the private copy every variant links to (`shared_assets`)  # the export's tokenizer / chat template / preprocessor files (beside cpu-*/)

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


FINGERPRINT_FILE = ".fp32-fingerprint.json"  # root/: the last `source_fingerprint`, with the files' stat it was made from


def _stats(fp32_folder: Path) -> dict[str, list[int]]:
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino] for p in _export_files(fp32_folder)}


def cached_fingerprint(fp32_folder: Path, root: Path) -> str:
    """`source_fingerprint`, remembered in root/.fp32-fingerprint.json next to the files' size, mtime and inode:
    while none of them changed the hash is not computed again (hashing a 4B export reads 19 GB), so a
    finished sweep prints its table at once."""
    path = Path(root) / FINGERPRINT_FILE
    stats = _stats(fp32_folder)
    saved = try_json(path) or {}
    if saved.get("files") == stats and isinstance(saved.get("fingerprint"), str) and \
            hmac.compare_digest(str(saved.get("seal")), seal(saved["fingerprint"], stats)):  # results are keyed by it
        return saved["fingerprint"]
    fingerprint = source_fingerprint(fp32_folder)
    with staging_file(path) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "files": stats, "seal": seal(fingerprint, stats)}) + "\n",
                       encoding="utf-8")
    return fingerprint


def builder_version(recipe: Int4Recipe | SimRecipe) -> str:
    """The code that builds a variant: simulate.py, or onnxruntime's quantizer driven by export/quantize.py."""
    module = simulate if isinstance(recipe, SimRecipe) else quantize
    code = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:12]
    return f"{module.__name__.rsplit('.', 1)[-1]}.py {code}, onnxruntime {onnxruntime.__version__}"


def _stamp(recipe: Int4Recipe | SimRecipe, fingerprint: str) -> dict:
    """What a variant is made of; a folder whose stamp differs (other weights, recipe or code) is rebuilt."""
    return {"source_sha256": fingerprint, "recipe": recipe.to_dict(), "builder": builder_version(recipe)}


def _read_stamp(folder: Path) -> dict | None:
    return try_json(folder / VARIANT_STAMP)


def _sync_file(src: Path, dst: Path) -> None:
    """Make dst a copy of src unless it is one already (same size and modification time: copy2 keeps both).

    A changed file gets a new inode (copy, then rename): variants still linked to the old one keep it
    until their stamps, which name the old source, get them rebuilt."""
    s = src.stat()
    if dst.is_file() and (dst.stat().st_size, dst.stat().st_mtime_ns) == (s.st_size, s.st_mtime_ns):
        return
    with staging_file(dst) as tmp:
        shutil.copy2(src, tmp)


def shared_assets(fp32_folder: Path, root: Path) -> Path:
    """root/.fp32-assets: one private copy of the fp32 embedding/vision graphs and of the export's pytorch/
    folder (tokenizer, chat template, image preprocessor), hard-linked into every variant; refreshed when
    the export changed.

    Private, so the variants add no links to the export's own files (onnx's loader refuses external data
    with several links; an fp32 + INT4 export's embedding/vision files already have two, one per folder).
    """
    fp32_folder, assets = Path(fp32_folder), Path(root) / ASSETS_FOLDER
    (assets / PROCESSOR_FOLDER).mkdir(parents=True, exist_ok=True)
    for path in _export_files(fp32_folder):
        if path.parent == fp32_folder and path.name in COPIED_FILES:
            _sync_file(path, assets / path.name)
        elif path.parent != fp32_folder:  # pytorch/
            _sync_file(path, assets / PROCESSOR_FOLDER / path.name)
    return assets


def link_processor_files(assets: Path, folder: Path) -> None:
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
    Embedding/vision and pytorch/ files are hard-linked from `assets` (`shared_assets`). The folder is
    built complete (stamp included) in a temporary sibling and renamed into place: an interrupted build
    (Ctrl-C, a cancelled Ray task) leaves no half-written variant, and its temporary folder is removed.
    """
    folder = Path(root) / recipe.name
    stamp = _stamp(recipe, fingerprint)
    found = _read_stamp(folder) or {}
    if {k: found.get(k) for k in stamp} == stamp:
        return folder, float(found.get("build_seconds", 0.0)), True
    _check_replaceable(folder)
    t0 = time.perf_counter()
    with staging_folder(root, f".{recipe.name}.building-", name="the sweep's --out_dir") as staging:
        built = staging / recipe.name
        if isinstance(recipe, SimRecipe):
            simulate_folder(fp32_folder, built, recipe, link=True, assets=assets)
        else:
            quantize_folder(fp32_folder, built, recipe, progress=False, link=True, assets=assets)
        link_processor_files(assets, built)
        seconds = time.perf_counter() - t0
        stamp["build_seconds"] = round(seconds, 3)
        stamp_folder(built, "sweep variant", extra=[VARIANT_STAMP])  # pytorch/ is ours too: a rebuild may replace it
        (built / VARIANT_STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")  # last: marks it complete
        interruption_point()  # a cancelled job never puts its variant in place
        replace_folder(built, folder)
    return folder, seconds, False


def _ours(folder: Path) -> bool:
    """A folder `build_variant` (or an older qwen3vl-lab) wrote: its stamp, or a genai_config.json naming a recipe."""
    if (folder / VARIANT_STAMP).is_file():
        return True
    try:
        genai = read_export_config(folder).get("qwen3vl_lab", {})
    except (OSError, UserError, AttributeError):
        return False
    return "recipe" in genai or "simulation" in genai


def _check_replaceable(folder: Path) -> None:
    """A stale variant is rebuilt in place; anything else at that path is the user's and is never replaced."""
    if folder.is_dir() and any(folder.iterdir()) and not _ours(folder):
        raise UserError(f"{folder} exists and is not a variant qwen3vl-lab built (no {VARIANT_STAMP}); move it away "
                        "or pick another --out_dir")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file where the variant folder goes; move it away or pick another --out_dir")


def remove_variant(folder: Path) -> None:
    """Delete a variant folder built by `build_variant` (only one that carries its stamp)."""
    folder = Path(folder)
    if (folder / VARIANT_STAMP).is_file():
        shutil.rmtree(folder, ignore_errors=True)


# -- what a worker needs -------------------------------------------------------------------------
def export_sizes(fp32_folder: Path) -> dict[str, int]:
    """Every file a variant is made from (`_export_files`), path relative to the export root -> bytes."""
    root = export_root(fp32_folder)
    return {str(p.relative_to(root)): p.stat().st_size for p in _export_files(fp32_folder)}


def check_export(fp32_folder: Path, sizes: dict[str, int]) -> None:
    """On a worker: the export is at the same path, with the same files as the driver saw; else a UserError."""
    root = export_root(fp32_folder)
    for name, size in sizes.items():
        path = root / name
        try:
            ok = path.stat().st_size == size and os.access(path, os.R_OK)
        except OSError:
            ok = False
        if not ok:
            raise UserError(f"worker {socket.gethostname()} cannot read {path} as the driver sees it (missing, "
                            "unreadable or another size); put the export and --out_dir on a filesystem every node "
                            "mounts at the same path")


def _file_bytes(folder: Path, *names: str) -> int:
    return sum((Path(folder) / n).stat().st_size for n in names if (Path(folder) / n).is_file())


def variant_memory(fp32_folder: Path, recipe: Int4Recipe | SimRecipe | str, *, vision: bool = False) -> int:
    """Bytes one variant job may need at its peak (what a Ray task declares): 1.2 x the larger of building
    it (one fp32 matrix at a time: 3 x the lm_head, the largest) and running it (its decoder: the fp32 size
    for fp32 and SIMULATED recipes, about bits/32 of it plus scales for MatMulNBits), plus the fp32
    embedding (and vision tower with image prompts) and 512 MiB for onnxruntime and Python. At 4B dims:
    7.2 GiB for an INT4 variant, 19.9 GiB for the fp32 reference or a SIMULATED one."""
    fp32_folder = Path(fp32_folder)
    decoder = _file_bytes(fp32_folder, DECODER_FILE, DECODER_FILE + ".data")
    cfg = read_export_config(fp32_folder)["qwen3vl_lab"]["config"]["text"]
    head = 4 * int(cfg["vocab_size"]) * int(cfg["hidden_size"])  # fp32 lm_head (vocab x hidden)
    if isinstance(recipe, Int4Recipe):
        running = int(decoder * recipe.bits / 32 * 1.2) + (head if recipe.lm_head == "fp32" else 0)
    else:
        running = decoder
    building = 3 * head  # the quantizer's copies of the largest matrix (the 4B-dims export peaked at 3.0 x its lm_head)
    extra = _file_bytes(fp32_folder, *COPIED_FILES[:2]) + (_file_bytes(fp32_folder, *COPIED_FILES[2:]) if vision else 0)
    return int(1.2 * max(running, building)) + extra + 512 * 2**20


def fp32_source(model_dir: str | Path) -> Path:
    """The export's cpu-fp32 folder (or model_dir itself when it is one); refuses quantized and simulated folders."""
    folder = resolve_folder(model_dir, "fp32")
    genai = own_settings(folder)
    if genai is None:  # the original guide's, onnxruntime-genai's builder's, ...: fp32 perhaps, but not ours
        raise UserError(f"{folder} was not exported by qwen3vl-lab: recipe variants are built from a qwen3vl-lab fp32 export; "
                        "make one with `qwen3vl-lab export --hf_dir CKPT --output_dir DIR` (the original guide's "
                        f"CKPT is its pytorch/), or run `qwen3vl-lab doctor --model_dir {model_dir}`, which ranks "
                        "recipes on the checkpoint's export")
    if genai.get("precision") != "fp32" or "simulation" in genai:
        raise UserError(f"{folder} is not the fp32 export (precision {genai.get('precision')!r}"
                        f"{', simulated' if 'simulation' in genai else ''}); pass the export folder with cpu-fp32/")
    return folder


__all__ = ["ASSETS_FOLDER", "FP32", "Recipe", "build_variant", "builder_version", "cached_fingerprint", "check_export", "contrast_recipes", "export_sizes", "fp32_source",
           "parse_recipe", "recipe_name", "remove_variant", "shared_assets", "source_fingerprint", "variant_memory"]
