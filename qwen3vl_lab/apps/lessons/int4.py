"""Notebook 05's exercise: dequantize one 32-weight MatMulNBits block, checked against onnxruntime's own kernel.

    from qwen3vl_lab.apps.lessons import int4 as lesson
    lesson.check_dequantize_block(my_dequantize_block)   # where it differs from onnxruntime, with a hint
    lesson.dequantize_block                              # the reference solution (read it after trying)

A block as MatMulNBits stores it (onnxruntime ContribOperators.md, com.microsoft.MatMulNBits, 4 bits):
16 bytes holding 32 codes q in 0..15 -- element 2j in the low nibble of byte j, 2j+1 in the high nibble --,
one float scale and one zero point (8 when the export is symmetric). The weight the kernel multiplies by is
(q - zero_point) * scale. The check's oracle is onnxruntime itself: a one-node MatMulNBits graph applied to
the 32 x 32 identity (`debug.weights.dequantize_with_onnxruntime`), never this module's solution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...debug.weights import QuantizedMatrix, dequantize_with_onnxruntime, fp32_weights_by_output, map_array, read_quantized
from .grading import first_difference, graded, mismatch

BLOCK = 32  # weights per block: what `export --precision int4` writes
BITS = 4


# -- the reference solution ------------------------------------------------------------------------
def dequantize_block(packed: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """packed (16,) uint8, scale, zero point -> the 32 weights (32,) float32 the kernel multiplies by."""
    packed = np.asarray(packed, np.uint8)
    low, high = packed & 0x0F, packed >> 4  # (16,), (16,): elements 2j and 2j + 1
    q = np.stack([low, high], axis=1).reshape(-1)  # (32,) codes 0..15 in weight order
    return (q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


# -- the oracle: onnxruntime's MatMulNBits kernel --------------------------------------------------
def onnxruntime_block(packed: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """What onnxruntime's MatMulNBits multiplies by for this one block: (32,) float32."""
    packed = np.asarray(packed, np.uint8).reshape(1, 1, BLOCK * BITS // 8)  # (N=1, n_blocks=1, 16 bytes)
    qm = QuantizedMatrix("block", "Y", "block", BLOCK, 1, BITS, BLOCK, 0, packed,
                         np.array([[scale]], np.float32), np.array([[zero_point]], np.uint8))
    return dequantize_with_onnxruntime(qm)[:, 0]  # (K=32, N=1) -> (32,)


def _cases() -> list[tuple[str, np.ndarray, float, int]]:
    rng = np.random.default_rng(23)
    counting = np.array([(2 * j) | ((2 * j + 1) << 4) for j in range(8)] * 2, np.uint8)  # codes 0, 1, ..., 15, 0, ...
    return [
        ("codes 0..15 twice, scale 1, zero point 8 (symmetric)", counting, 1.0, 8),
        ("random codes, scale 0.0123, zero point 8 (symmetric)", rng.integers(0, 256, 16, dtype=np.uint8), 0.0123, 8),
        ("random codes, scale -0.05, zero point 8 (a negative scale: the largest weight was negative)",
         rng.integers(0, 256, 16, dtype=np.uint8), -0.05, 8),
        ("random codes, scale 0.02, zero point 3 (asymmetric)", rng.integers(0, 256, 16, dtype=np.uint8), 0.02, 3),
    ]


def _hint(got: np.ndarray, packed: np.ndarray, scale: float, zero_point: int) -> str:
    """Name the usual mistake when the student's values equal one of its outcomes."""
    packed = np.asarray(packed, np.uint8)
    low, high = (packed & 0x0F).astype(np.float32), (packed >> 4).astype(np.float32)
    swapped = np.stack([high, low], axis=1).reshape(-1)
    q = np.stack([low, high], axis=1).reshape(-1)
    halves = np.concatenate([low, high])
    s, z = np.float32(scale), np.float32(zero_point)
    wraps = ((q.astype(np.uint8) - np.uint8(zero_point)).astype(np.float32)) * s  # uint8 arithmetic wraps
    known = [
        ((swapped - z) * s, "the nibbles are swapped: element 2j is the LOW nibble of byte j (packed & 0x0F), "
                            "element 2j + 1 the high one (packed >> 4)"),
        ((halves - z) * s, "all low nibbles first, then all high ones: they interleave (low of byte 0, high of byte 0, "
                           "low of byte 1, ...): stack them on a new last axis, then reshape"),
        (q * s, "subtract the zero point before multiplying by the scale: (q - zero_point) * scale"),
        ((z - q) * s, "the sign is flipped: it is (q - zero_point) * scale, not (zero_point - q) * scale"),
        (q - z, "multiply by the scale"),
        (wraps, "q - zero_point in uint8 wraps around (3 - 8 = 251): convert the codes to float (or int) first"),
    ]
    for values, hint in known:
        if got.shape == values.shape and np.allclose(got, values, rtol=0, atol=1e-6):
            return hint
    if np.abs(got).max() > 16 * abs(s):  # no 4-bit code lands there
        return known[-1][1]
    return "unpack each byte into two 4-bit codes (low nibble first), subtract the zero point, multiply by the scale"


def _run_cases(student_fn) -> None:
    for where, packed, scale, zp in _cases():
        want = onnxruntime_block(packed, scale, zp)
        got = np.asarray(student_fn(packed.copy(), scale, zp), np.float64)
        if got.shape != (BLOCK,):
            raise mismatch(f"{where}: shape", got.shape, want.shape, "return the block's 32 weights as a 1-D array "
                           "(16 bytes x 2 codes a byte)")
        i = first_difference(got, want, atol=1e-6)
        if i is not None:
            raise mismatch(f"{where}: weight {i}", got, want, _hint(got, packed, scale, zp))


def check_dequantize_block(student_fn) -> bool:
    """student_fn(packed (16,) uint8, scale, zero_point) -> (32,) weights; checked against onnxruntime's kernel."""
    return graded("dequantize_block", student_fn, _run_cases)


# -- a real block of an export, for the figure -----------------------------------------------------
@dataclass(frozen=True)
class RealBlock:
    """One block of one MatMulNBits weight, next to the fp32 weights it was made from."""

    matrix: str  # short name, e.g. "layers.0.mlp.down_proj"
    column: int  # output column n
    block: int  # block b: rows b*32 .. b*32+31 of column n
    weights: np.ndarray  # (32,) fp32 weights W[b*32 : (b+1)*32, n]
    packed: np.ndarray  # (16,) uint8 as stored
    scale: float
    zero_point: int


def real_block(fp32_folder: str | Path, int4_folder: str | Path, matrix: str, column: int = 0,
               block: int = 0) -> RealBlock:
    """Read one block of `matrix` (a short name, e.g. "layers.0.mlp.down_proj") from an INT4 export, and the fp32
    weights it quantized from the fp32 export of the same model."""
    (qm,) = read_quantized(Path(int4_folder), names=[matrix])
    fp32_file = Path(fp32_folder) / "model.onnx"
    w = map_array(fp32_weights_by_output(fp32_file)[qm.output], fp32_file.parent)  # (K, N)
    rows = slice(block * qm.block_size, (block + 1) * qm.block_size)
    zp = 2 ** (qm.bits - 1) if qm.zero_points is None else int(qm.columns([column]).zero_points.reshape(-1)[0])
    return RealBlock(matrix, column, block, np.array(w[rows, column], np.float32),
                     np.array(qm.packed[column, block], np.uint8), float(qm.scales[column, block]), zp)


__all__ = ["BLOCK", "RealBlock", "check_dequantize_block", "dequantize_block", "onnxruntime_block", "real_block"]
