"""Weight by weight: unpack the MatMulNBits blocks and compare them with the fp32 weights.

    mats = read_quantized("OUT/cpu-int4")                 # one QuantizedMatrix per MatMulNBits node
    w = mats[0].dequantize()                              # (K, N) float32, what the kernel multiplies by
    np.abs(w - dequantize_with_onnxruntime(mats[0])).max()  # our unpacking vs onnxruntime's own kernel
    report = compare_weights("OUT/cpu-fp32", "OUT/cpu-int4"); print(report.table())

MatMulNBits layout (onnxruntime ContribOperators.md, com.microsoft.MatMulNBits), for weight W (K, N):
- B (N, n_blocks, blob) uint8, n_blocks = ceil(K / block_size), blob = block_size * bits / 8: column n,
  block b holds W[b*bs : (b+1)*bs, n]; values are packed little-end first (4 bits: element 2j in the
  low nibble of byte j, 2j+1 in the high nibble; 2 bits: four per byte, lowest bits first).
- scales (N * n_blocks) or (N, n_blocks), float.
- zero_points (optional): uint8 packed the same way along the blocks of each column,
  (N, ceil(n_blocks * bits / 8)); or float like the scales (not packed, hqq). Absent: 2^(bits-1).
- W[k, n] = (q - zero_point) * scale, for k < K (the padding past K is dropped).

Memory: `compare_weights` holds one matrix at a time: the fp32 weight is memory-mapped from the
external-data file (`map_array`) and read a few thousand columns at a time, the packed one is read
alone (an INT4 lm_head is an eighth of the fp32 one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..errors import UserError
from ..export.quantize import read_array
from ..layouts import find_layout
from ..model import Model
from ..paths import external_data
from .checkpoint_weights import CheckpointWeights, find_checkpoint

PREFIX = "model.language_model."
CHUNK_VALUES = 2**22  # matrix_error's working set: about this many fp32 weights at a time


# -- unpacking (pure numpy) ----------------------------------------------------------------------
def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """(..., nbytes) uint8 -> (..., nbytes * 8 / bits) uint8 values, lowest bits first."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed.copy()
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = (np.arange(per, dtype=np.uint8) * bits)  # (per,)
    vals = (packed[..., None] >> shifts) & mask  # (..., nbytes, per)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.uint8)


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int,
               bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits inputs -> W (K, N) float32, per the contrib-op spec (see the module docstring)."""
    n_blocks = (K + block_size - 1) // block_size
    q = unpack_bits(np.asarray(packed).reshape(N, n_blocks, -1), bits)[..., :block_size]  # (N, nb, bs)
    s = np.asarray(scales, np.float32).reshape(N, n_blocks)  # (N, nb)
    if zero_points is None:
        zp = np.full((N, n_blocks), 2 ** (bits - 1), np.float32)
    elif np.asarray(zero_points).dtype == np.uint8:
        zp = unpack_bits(np.asarray(zero_points).reshape(N, -1), bits)[:, :n_blocks].astype(np.float32)  # (N, nb)
    else:
        zp = np.asarray(zero_points, np.float32).reshape(N, n_blocks)
    w = (q.astype(np.float32) - zp[..., None]) * s[..., None]  # (N, nb, bs)
    return np.ascontiguousarray(w.reshape(N, n_blocks * block_size)[:, :K].T)  # (K, N)


@dataclass
class QuantizedMatrix:
    """One MatMulNBits node's weight, as stored (packed), with what is needed to unpack it."""

    node: str
    output: str  # the node's output tensor: same name as the fp32 MatMul's output
    weight: str  # the packed initializer's name
    K: int
    N: int
    bits: int
    block_size: int
    accuracy_level: int
    packed: np.ndarray  # (N, n_blocks, blob) uint8
    scales: np.ndarray  # (N, n_blocks) float32
    zero_points: np.ndarray | None  # uint8 packed (N, ceil(nb*bits/8)), float (N, nb), or None (symmetric)

    @property
    def n_blocks(self) -> int:
        return (self.K + self.block_size - 1) // self.block_size

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def name(self) -> str:
        """The fp32 weight's short name, e.g. `layers.0.self_attn.q_proj` or `lm_head`."""
        return short_name(self.weight)

    def columns(self, cols) -> "QuantizedMatrix":
        """The same matrix restricted to output columns `cols` (each column is quantized on its own)."""
        cols = np.asarray(cols, np.int64)
        zp = None if self.zero_points is None else self.zero_points.reshape(self.N, -1)[cols]
        return QuantizedMatrix(self.node, self.output, self.weight, self.K, len(cols), self.bits, self.block_size,
                               self.accuracy_level, self.packed.reshape(self.N, self.n_blocks, -1)[cols],
                               self.scales.reshape(self.N, self.n_blocks)[cols], zp)

    def dequantize(self) -> np.ndarray:
        """(K, N) float32."""
        return dequantize(self.packed, self.scales, self.zero_points, self.K, self.N, self.bits, self.block_size)


def short_name(weight: str) -> str:
    name = weight[len(PREFIX):] if weight.startswith(PREFIX) else weight
    for suffix in ("_Q2", "_Q4", "_Q8"):
        i = name.find(suffix)
        if i >= 0:
            name = name[:i]
    return name[:-len(".weight")] if name.endswith(".weight") else name


def decoder_file(model: Model | str | Path, precision: str = "int4") -> Path:
    """The decoder graph of a Model, or of an export (any layout `layouts.find_layout` knows: our
    cpu-<precision>/model.onnx, onnx-community's onnx/decoder_model_merged_q4.onnx, ...)."""
    return model.decoder_file if isinstance(model, Model) else find_layout(model, precision).decoder


def iter_quantized(model: Model | str | Path, names=None):
    """Every MatMulNBits of a decoder, read one at a time (only those whose short name is in `names`)."""
    path = decoder_file(model, "int4")
    folder = path.parent
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type != "MatMulNBits":
            continue
        if names is not None and short_name(n.input[1]) not in names:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        K, N, bits, bs = int(a["K"]), int(a["N"]), int(a.get("bits", 4)), int(a["block_size"])
        nb = (K + bs - 1) // bs
        zp = read_array(inits[n.input[3]], folder) if len(n.input) > 3 and n.input[3] else None
        yield QuantizedMatrix(n.name, n.output[0], n.input[1], K, N, bits, bs, int(a.get("accuracy_level", 0)),
                              read_array(inits[n.input[1]], folder).reshape(N, nb, -1),
                              read_array(inits[n.input[2]], folder).astype(np.float32).reshape(N, nb), zp)


def read_quantized(model: Model | str | Path, names=None) -> list[QuantizedMatrix]:
    """Every MatMulNBits of a folder's decoder, as a list (see `iter_quantized` to hold one at a time)."""
    return list(iter_quantized(model, names))


def dequantize_with_onnxruntime(qm: QuantizedMatrix) -> np.ndarray:
    """onnxruntime's own answer: a one-node MatMulNBits graph (accuracy_level 0) applied to the identity (K, K)."""
    inputs = ["A", "B", "scales"]
    inits = [numpy_helper.from_array(np.ascontiguousarray(qm.packed, np.uint8), "B"),
             numpy_helper.from_array(np.ascontiguousarray(qm.scales, np.float32).reshape(-1), "scales")]
    if qm.zero_points is not None:
        zp = qm.zero_points
        zp = zp.reshape(qm.N, -1) if zp.dtype == np.uint8 else zp.astype(np.float32).reshape(-1)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(zp), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=qm.K, N=qm.N, bits=qm.bits,
                            block_size=qm.block_size)
    graph = helper.make_graph([node], "dequantize", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", qm.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", qm.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["Y"], {"A": np.eye(qm.K, dtype=np.float32)})[0]  # (K, N) = I @ W


# -- fp32 vs quantized ---------------------------------------------------------------------------
@dataclass
class MatrixError:
    """One weight matrix: fp32 W (K, N) against its dequantized MatMulNBits blocks."""

    name: str
    shape: tuple[int, int]
    bits: int
    block_size: int
    symmetric: bool
    rel_error: float  # |W - Wq| / |W|
    sqnr_db: float
    max_abs: float
    block_rel_error: np.ndarray  # (N, n_blocks) float32: error of each block relative to that block's norm
    worst_blocks: list[tuple[int, int, float]] = field(default_factory=list)  # (column n, block b, rel error)
    outlier_channels: list[tuple[int, float]] = field(default_factory=list)  # (input row k, max|W[k]| / median)


@dataclass
class WeightReport:
    rows: list[MatrixError]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    @property
    def rel_error(self) -> np.ndarray:
        return np.array([r.rel_error for r in self.rows])

    @property
    def sqnr_db(self) -> np.ndarray:
        return np.array([r.sqnr_db for r in self.rows])

    def worst(self, n: int = 5) -> list[MatrixError]:
        return sorted(self.rows, key=lambda r: -r.rel_error)[:n]

    def table(self, n: int | None = None) -> str:
        head = f"{'matrix':32s} {'K x N':>13s} {'bits':>4s} {'block':>5s} {'sym':>4s} {'rel err':>8s} {'SQNR dB':>8s} " \
               f"{'worst block (n, b, err)':>26s} {'outlier rows (k, ratio)':>24s}"
        lines = [head, "-" * len(head)]
        for r in (self.rows if n is None else self.worst(n)):
            wb = r.worst_blocks[0] if r.worst_blocks else None
            wb_s = f"({wb[0]}, {wb[1]}, {wb[2]:.3f})" if wb else "-"
            oc_s = ", ".join(f"({k}, {v:.1f})" for k, v in r.outlier_channels[:2]) or "-"
            lines.append(f"{r.name[:32]:32s} {r.shape[0]:>6d}x{r.shape[1]:<6d} {r.bits:4d} {r.block_size:5d} "
                         f"{'yes' if r.symmetric else 'no':>4s} {r.rel_error:8.4f} {r.sqnr_db:8.1f} {wb_s:>26s} {oc_s:>24s}")
        return "\n".join(lines)


def outlier_rows(w: np.ndarray, ratio: float = 4.0, top: int = 5) -> list[tuple[int, float]]:
    """Input channels k whose largest |W[k, :]| is >= `ratio` x the median over channels (largest first)."""
    return _outliers(np.abs(w).max(axis=1), ratio, top)  # (K,)


def _outliers(m: np.ndarray, ratio: float, top: int) -> list[tuple[int, float]]:
    """`outlier_rows` from the per-row maxima m (K,)."""
    med = float(np.median(m))
    if med <= 0:
        return []
    r = m / med
    idx = np.argsort(-r)[:top]
    return [(int(k), float(r[k])) for k in idx if r[k] >= ratio]


def matrix_error(w: np.ndarray, qm: QuantizedMatrix, top: int = 5, chunk: int | None = None) -> MatrixError:
    """Compare fp32 W (K, N) with `qm`, `chunk` columns at a time (the lm_head is vocab wide).

    `w` may be a read-only memory map (`map_array`): only one chunk of columns is copied at a time.
    chunk=None: as many columns as keep a chunk near 2**22 values (32 MB in float64)."""
    K, N = w.shape
    chunk = chunk or max(1, CHUNK_VALUES // max(K, 1))
    row_max = np.zeros(K)  # (K,) max |W[k, :]|, built chunk by chunk
    if (K, N) != (qm.K, qm.N):
        raise UserError(f"{qm.name}: fp32 weight is {K}x{N} but MatMulNBits says {qm.K}x{qm.N}; compare folders "
                        "exported from the same checkpoint")
    bs, nb = qm.block_size, qm.n_blocks
    block_err = np.zeros((N, nb))
    sig = noise = 0.0
    max_abs = 0.0
    for c0 in range(0, N, chunk):
        cols = np.arange(c0, min(N, c0 + chunk))
        ref = np.asarray(w[:, c0:c0 + len(cols)], np.float64)  # (K, c): only these columns are read
        row_max = np.maximum(row_max, np.abs(ref).max(axis=1))
        diff = ref - qm.columns(cols).dequantize()  # (K, c)
        sig += float((ref ** 2).sum())
        noise += float((diff ** 2).sum())
        max_abs = max(max_abs, float(np.abs(diff).max()))
        pad = nb * bs - K
        ref_b = np.pad(ref, ((0, pad), (0, 0))).T.reshape(len(cols), nb, bs)
        diff_b = np.pad(diff, ((0, pad), (0, 0))).T.reshape(len(cols), nb, bs)
        norms = np.linalg.norm(ref_b, axis=-1)
        block_err[cols] = np.linalg.norm(diff_b, axis=-1) / np.where(norms > 0, norms, 1.0)
    flat = np.argsort(-block_err, axis=None)[:top]
    worst = [(int(i // nb), int(i % nb), float(block_err.flat[i])) for i in flat]
    rel = float(np.sqrt(noise / sig)) if sig > 0 else 0.0
    sq = float("inf") if noise == 0 else float(10 * np.log10(sig / noise))
    return MatrixError(qm.name, (K, N), qm.bits, bs, qm.symmetric, rel, sq, max_abs, block_err.astype(np.float32),
                       worst, _outliers(row_max, 4.0, top))


def map_array(t: onnx.TensorProto, folder: Path) -> np.ndarray:
    """One initializer as a read-only memory map of its external-data file (in memory only as it is read);
    an inline initializer as an array."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return read_array(t, folder)
    path, offset, _ = external_data(t, folder)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    if path.stat().st_size < offset + dtype.itemsize * int(np.prod(shape)):
        raise UserError(f"{path} is truncated (tensor {t.name}); re-export the folder")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def fp32_weights_by_output(path: Path) -> dict[str, onnx.TensorProto]:
    """fp32 decoder graph file: MatMul output tensor name -> its weight initializer."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    return {n.output[0]: inits[n.input[1]] for n in graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits}


def compare_weights(ref: Model | str | Path | None, test: Model | str | Path, names=None, top: int = 5,
                    hf_dir: str | Path | None = None) -> WeightReport:
    """Every MatMulNBits of `test` against the fp32 MatMul of `ref` that writes the same output tensor; where
    there is none (ref None, or an export made by another tool), or with `hf_dir`, against the checkpoint's
    tensors (checkpoint_weights.py: hf_dir, else the checkpoint shipped with test or ref)."""
    ref_file = None if ref is None or hf_dir is not None else decoder_file(ref, "fp32")
    ref_folder = ref_file.parent if ref_file else None
    weights = fp32_weights_by_output(ref_file) if ref_file else {}
    ckpt = None
    rows = []
    for qm in iter_quantized(test, names):
        if qm.output in weights:
            w = map_array(weights[qm.output], ref_folder)  # (K, N) memory-mapped: one fp32 matrix at a time
        else:
            ckpt = ckpt or _checkpoint(ref_folder, qm.output, test, ref, hf_dir=hf_dir)
            w = ckpt.weight_of(qm)  # (K, N) from the checkpoint's tensors, one at a time
        rows.append(matrix_error(w, qm, top))
        del w, qm  # unmapped before the next matrix
    return WeightReport(rows)


def _checkpoint(ref_folder, output: str, *exports, hf_dir=None) -> CheckpointWeights:
    root = find_checkpoint(*exports, hf_dir=hf_dir)
    if root is None:
        why = f"{ref_folder} has no fp32 MatMul writing {output}" if ref_folder else "no fp32 reference was given"
        raise UserError(f"{why} and no Hugging Face checkpoint was found with the exports; pass the fp32 folder of the "
                        "same export, or hf_dir=CHECKPOINT (the safetensors it was made from)")
    return CheckpointWeights(root)


__all__ = ["MatrixError", "QuantizedMatrix", "WeightReport", "compare_weights", "dequantize", "map_array",
           "dequantize_with_onnxruntime", "iter_quantized", "matrix_error", "outlier_rows", "read_quantized", "short_name", "unpack_bits"]
