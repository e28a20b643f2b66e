"""A SIMULATION of low-bit weight quantization: fp32 weights rounded to b-bit blocks, stored back as fp32.

onnxruntime's MatMulNBits runs 2-, 4- and 8-bit weights only: its CPU kernel refuses anything else
("nbits_ == 2 || nbits_ == 4 || nbits_ == 8 ... Only 2b, 4b and 8b quantization is supported for
MatMulNBits op", onnxruntime 1.32, contrib_ops/cpu/quantization/matmul_nbits.cc), and it has no
per-tensor layout (one scale per block of at most 256 weights). To see what 3 bits, or one scale
for a whole matrix, would do to the answers, this module *simulates* them: every MatMul weight W
(K, N) of the fp32 decoder is replaced by dequant(quant(W)) — the values a b-bit kernel would
multiply by — kept as an ordinary fp32 MatMul. Same numbers, no speed-up, no memory saved: a
simulation, and every name it makes starts with `sim-` so no table or figure can pass it off as a
real onnxruntime model.

    spec = SimRecipe(bits=3, block_size=None)            # "sim-int3-per-tensor"
    w_hat = fake_quantize(w, bits=3, block_size=32)      # (K, N) float32 on the 3-bit grid
    simulate_folder("OUT/cpu-fp32", "OUT/sim-int3-per-tensor", spec)   # a runnable fp32 folder

The rounding is onnxruntime's own block quantizer's (MLAS `BlockwiseQuantizer`, what
MatMulNBitsQuantizer's "default" algorithm calls), written out in numpy for any bit width, so at
2 and 4 bits it reproduces the real MatMulNBits weights (tests/test_accuracy.py checks it):
- blocks run along K (the input dimension) within one output column n, like MatMulNBits;
  block_size=None makes the whole matrix one block (per tensor: one scale);
- symmetric: the value of largest magnitude m (sign kept) maps to the most negative code,
  scale = -m / 2^(b-1), zero point 2^(b-1), codes 0 .. 2^b - 1;
- asymmetric: the range [min(w, 0), max(w, 0)] spans the 2^b codes, scale = range / (2^b - 1),
  zero point = round(-min / scale);
- q = clamp(round_half_away(w / scale + zero_point), 0, 2^b - 1); w_hat = (q - zero_point) * scale.
`clip=True` adds a search that MatMulNBits' default quantizer does not do: per block, shrink the
range by a factor in CLIP_RATIOS and keep the factor with the smallest squared error (outliers get
clipped, everything else gets a finer grid); AWQ and llama.cpp's k-quants search clipping ranges
too, this is the simplest form of it.

What is not simulated, as in the real INT4 export: the embedding table (an fp32 Gather, even when
tied to the lm_head), the vision tower, and the activations (no accuracy_level 4 int8 activations:
the MatMuls run in fp32, like MatMulNBits at accuracy_level 0).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import UserError
from ..export.files import legacy_precision_patterns, replace_folder, staging_folder
from ..export.genai_config import write_genai_config
from ..export.quantize import (
    COPIED_FILES,
    LM_HEAD_OUTPUT,
    ExternalData,
    carry_initializer,
    link_or_copy,
    matmul_weights,
    read_array,
)
from ..layout import DECODER_FILE, GENAI_CONFIG
from ..layouts import read_export_config
from ..signals import interruption_point

SIM_BITS = (2, 3, 4, 5, 6, 8)
SIM_BLOCK_SIZES = (16, 32, 64, 128, 256)
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.3, 15), 3))  # range shrink factors tried by clip=True
SIMULATION_FILE = "simulation.json"


# -- the rounding (pure numpy) -------------------------------------------------------------------
def _round_code(x: np.ndarray, top: int) -> np.ndarray:
    """clamp(roundf(x), 0, top), in place. C's roundf sends halves away from zero; on the clamped range
    [0, top] that is floor(x + 0.5) (a negative x clamps to 0 either way)."""
    x += np.float32(0.5)
    np.floor(x, out=x)
    return np.clip(x, 0, top, out=x)


def _scales(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-block range -> (scale, zero point), both float32 (B,) — MLAS's range2scale / range2scalezp."""
    if symmetric:
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)  # the value of largest magnitude, sign kept
        return (-m / np.float32(2 ** (bits - 1))).astype(np.float32), np.full_like(m, 2 ** (bits - 1))
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # zero is always exactly representable
    scale = ((hi - lo) / np.float32(2 ** bits - 1)).astype(np.float32)
    zp = np.where(scale != 0, -lo / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    return scale, _round_code(zp, 2 ** bits - 1)


def _round_blocks(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """blocks (B, L) with ranges (B,) -> the dequantized blocks (B, L), float32."""
    scale, zp = _scales(lo, hi, bits, symmetric)
    inv = np.where(scale != 0, np.float32(1) / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    q = blocks * inv[:, None]  # (B, L), float32 as in MLAS: v * (1 / scale) + zero_point
    q += zp[:, None]
    _round_code(q, 2 ** bits - 1)  # the codes 0 .. 2^b - 1
    q -= zp[:, None]
    q *= scale[:, None]
    return q


def _as_blocks(w: np.ndarray, block_size: int | None) -> tuple[np.ndarray, int]:
    """W (K, N) -> (B, L) rows of one block each: column n's K weights cut into blocks (zero-padded), or one row."""
    k, n = w.shape
    if block_size is None:
        return w.reshape(1, -1), 0
    pad = (-k) % block_size
    cols = np.pad(w, ((0, pad), (0, 0))).T  # (N, K + pad): one output column per row
    return cols.reshape(n * (k + pad) // block_size, block_size), pad


def _from_blocks(blocks: np.ndarray, shape: tuple[int, int], block_size: int | None, pad: int) -> np.ndarray:
    k, n = shape
    if block_size is None:
        return blocks.reshape(k, n)
    return np.ascontiguousarray(blocks.reshape(n, k + pad)[:, :k].T)


def _squared_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, L), (B, L) -> (B,) sum of squared differences per block."""
    d = a - b
    return np.einsum("bl,bl->b", d, d)


def fake_quantize(w: np.ndarray, bits: int, block_size: int | None = 32, symmetric: bool = True,
                  clip: bool = False) -> np.ndarray:
    """W (K, N) -> dequant(quant(W)) (K, N) float32: what a `bits`-bit blockwise kernel would multiply by.

    block_size: weights per scale along K (each output column separately), None = one scale per tensor.
    clip: per block, search CLIP_RATIOS for the range that minimises the squared error.
    Zero padding (K not a multiple of block_size) never changes a block's range and rounds to 0 exactly.
    """
    if bits not in SIM_BITS:
        raise UserError(f"simulated bits {bits} is not supported; choose from {', '.join(map(str, SIM_BITS))}")
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise UserError(f"fake_quantize takes a (K, N) matrix, got shape {w.shape}")
    blocks, pad = _as_blocks(w, block_size)  # (B, L)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)  # (B,)
    best = _round_blocks(blocks, lo, hi, bits, symmetric)
    if clip:
        best_err = _squared_error(best, blocks)  # (B,)
        for r in CLIP_RATIOS[1:]:
            cand = _round_blocks(blocks, lo * np.float32(r), hi * np.float32(r), bits, symmetric)
            err = _squared_error(cand, blocks)
            better = err < best_err
            best[better], best_err[better] = cand[better], err[better]
    return _from_blocks(best, w.shape, block_size, pad)


# -- the recipe ----------------------------------------------------------------------------------
_NAME = re.compile(r"sim-int(\d)-(?:b(\d+)|per-tensor)(-asym)?(-mse)?(-head_fp32)?")


@dataclass(frozen=True)
class SimRecipe:
    """A simulated recipe: which rounding `fake_quantize` applies to every decoder MatMul weight.

    Named `sim-int{bits}-{bBLOCK|per-tensor}[-asym][-mse][-head_fp32]`, e.g. "sim-int3-per-tensor"
    (3 bits, one symmetric scale per matrix, lm_head rounded too) or "sim-int2-b16-asym-mse".
    """

    bits: int = 3
    block_size: int | None = None  # None: per tensor
    symmetric: bool = True
    clip: bool = False  # MSE-minimising clipping search per block
    lm_head: str = "sim"  # "sim": rounded like the body; "fp32": left exact

    simulated = True  # not a dataclass field: every table shows it

    def validate(self) -> "SimRecipe":
        if self.bits not in SIM_BITS:
            raise UserError(f"simulated bits {self.bits} is not supported; choose from {', '.join(map(str, SIM_BITS))}")
        if self.block_size is not None and self.block_size not in SIM_BLOCK_SIZES:
            raise UserError(f"simulated block size {self.block_size} is not supported; choose from "
                            f"{', '.join(map(str, SIM_BLOCK_SIZES))} or per-tensor")
        if self.lm_head not in ("sim", "fp32"):
            raise UserError(f"simulated lm_head {self.lm_head!r} is invalid; choose sim or fp32")
        return self

    @property
    def name(self) -> str:
        block = "per-tensor" if self.block_size is None else f"b{self.block_size}"
        return (f"sim-int{self.bits}-{block}{'' if self.symmetric else '-asym'}{'-mse' if self.clip else ''}"
                f"{'-head_fp32' if self.lm_head == 'fp32' else ''}")

    @property
    def algorithm(self) -> str:
        return "sim-mse" if self.clip else "sim-rtn"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "simulated": True}

    @classmethod
    def from_name(cls, name: str) -> "SimRecipe":
        """Parse e.g. "sim-int3-per-tensor" or "sim-int2-b16-asym-mse" back."""
        m = _NAME.fullmatch(name)
        if m is None:
            raise UserError(f"simulated recipe name {name!r} is not of the form sim-intBITS-bBLOCK|per-tensor"
                            "[-asym][-mse][-head_fp32] (e.g. sim-int3-per-tensor, sim-int2-b16-asym-mse)")
        bits, block, asym, mse, head = m.groups()
        return cls(bits=int(bits), block_size=int(block) if block else None, symmetric=not asym, clip=bool(mse),
                   lm_head="fp32" if head else "sim").validate()


# -- a simulated folder --------------------------------------------------------------------------
def _simulate_decoder(src: Path, dst: Path, recipe: SimRecipe) -> list[dict]:
    """src/model.onnx (fp32) -> dst/model.onnx: the same graph, every MatMul weight rounded; one matrix at a time."""
    model = onnx.load(str(src / DECODER_FILE), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = matmul_weights(graph, inits)  # node name -> weight name
    head = {targets[n.name] for n in graph.node if n.name in targets and LM_HEAD_OUTPUT in n.output}
    rounded = {w for w in targets.values() if not (w in head and recipe.lm_head == "fp32")}
    data = ExternalData(dst / (DECODER_FILE + ".data"))
    new_inits, records = [], []
    try:
        for t in graph.initializer:
            interruption_point()  # a cancelled sweep job stops between matrices (signals.py)
            if t.name in rounded:
                if t.data_type != TensorProto.FLOAT:
                    raise UserError(f"{t.name} is not float32; simulate from the fp32 export")
                w = read_array(t, src)  # (K, N)
                w_hat = fake_quantize(w, recipe.bits, recipe.block_size, recipe.symmetric, recipe.clip)
                err = float(np.sum((w_hat - w) ** 2) / max(np.sum(w.astype(np.float64) ** 2), 1e-30))
                records.append({"weight": t.name, "K": int(w.shape[0]), "N": int(w.shape[1]), "rel_mse": err})
                new_inits.append(data.tensor(t.name, w_hat))
            else:
                new_inits.append(carry_initializer(t, src, data))
    finally:
        data.close()
    graph.ClearField("initializer")
    graph.initializer.extend(new_inits)
    model.doc_string = f"qwen3vl-lab SIMULATED {recipe.name}: fp32 MatMuls holding {recipe.bits}-bit-rounded weights"
    onnx.save_model(model, str(dst / DECODER_FILE))
    return records


def simulate_folder(fp32_folder: str | Path, out_folder: str | Path, recipe: SimRecipe, *, link: bool = False,
                    assets: str | Path | None = None) -> Path:
    """An fp32 precision folder -> a runnable folder whose decoder holds `recipe`-rounded fp32 weights.

    qwen3vl_lab.json keeps precision "fp32" (the graph is fp32) and gains `simulation`;
    simulation.json records the recipe and each matrix's relative squared error. Written into a
    staging folder and moved into place when complete; embedding/vision come from `assets` (default:
    the fp32 folder), hard-linked with link=True, as `quantize_folder` does.
    """
    recipe = recipe.validate()
    src, out = Path(fp32_folder), Path(out_folder)
    if not (src / DECODER_FILE).is_file() or not (src / GENAI_CONFIG).is_file():
        raise UserError(f"{src} is not an exported fp32 folder (no {DECODER_FILE} / {GENAI_CONFIG}); "
                        "run `qwen3vl-lab export --precision fp32` first")
    genai = read_export_config(src)  # genai_config.json + qwen3vl_lab.json
    if genai.get("qwen3vl_lab", {}).get("precision") != "fp32" or "simulation" in genai.get("qwen3vl_lab", {}):
        raise UserError(f"{src} is not a plain fp32 folder; simulate from the export's cpu-fp32 folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, f".{out.name}-", name="the simulated folder", shown=out) as staging:
        records = _simulate_decoder(src, staging, recipe)
        shared = Path(assets) if assets is not None else src
        for name in COPIED_FILES:
            if (shared / name).is_file():
                link_or_copy(shared / name, staging / name, link)
        genai["qwen3vl_lab"]["simulation"] = recipe.to_dict()
        write_genai_config(staging, genai)
        (staging / SIMULATION_FILE).write_text(json.dumps({
            "recipe": recipe.to_dict(),
            "what": "SIMULATION: fp32 MatMul weights replaced by dequant(quant(W)); not an onnxruntime quantized model",
            "source": f"cpu-fp32/{DECODER_FILE}", "matrices": records}, indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, out, what="simulated folder", legacy=legacy_precision_patterns(out))
    return out


__all__ = ["CLIP_RATIOS", "SIMULATION_FILE", "SimRecipe", "fake_quantize", "simulate_folder"]
