"""INT4 export: the fp32 decoder's MatMul weights -> onnxruntime `MatMulNBits`, with `MatMulNBitsQuantizer`.

    recipe = Int4Recipe(block_size=32, symmetric=True, accuracy_level=4, lm_head="int4", algorithm="default")
    quantize_folder("OUT/cpu-fp32", "OUT/cpu-int4", recipe)

All quantization math is onnxruntime's (`onnxruntime.quantization.matmul_nbits_quantizer`); this
module only drives it so that memory stays bounded: the fp32 graph is read without its weights,
and each MatMul weight is loaded, handed to the quantizer as a one-node model, and written out
packed before the next one is read. Only one fp32 matrix is in memory at a time (the lm_head,
vocab x hidden, is the largest), never the whole decoder.

Defaults follow the onnxruntime-genai builder, not the quantizer: block 32,
symmetric, accuracy_level 4 on CPU, RTN ("default" = onnxruntime's own C++ block quantizer), and an
INT4 lm_head. The embedding and vision graphs stay fp32 (hard-linked or copied from the fp32
folder), so the INT4 folder runs on its own. The recipe is recorded in qwen3vl_lab.json
(`qwen3vl_lab.recipe`) and in `quantization.json` next to the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, Mapping

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from ..errors import UserError
from ..layout import (
    DECODER_FILE,
    EMBEDDING_FILE,
    GENAI_CONFIG,
    GENAI_EMBEDDING_FILE,
    GENAI_TOKENIZER_FILES,
    LOGITS,
    VISION_FILE,
)
from ..layouts import read_export_config
from ..paths import external_data
from ..signals import interruption_point
from . import genai_config as gc
from .decoder_fast import fusable, fusion_groups
from .files import legacy_precision_patterns, replace_folder, staging_folder
from .onnx_graph import ALIGN, INLINE_LIMIT, MS_DOMAIN

ALGORITHMS = ("default", "rtn", "hqq", "k_quant")
LM_HEAD_PRECISIONS = ("int4", "int8", "fp32")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
BITS = (2, 4, 8)
QUANTIZATION_FILE = "quantization.json"
LM_HEAD_OUTPUT = LOGITS  # the decoder's last MatMul writes the logits (export/decoder.py)
COPIED_FILES = (EMBEDDING_FILE, EMBEDDING_FILE + ".data", GENAI_EMBEDDING_FILE, VISION_FILE, VISION_FILE + ".data",
                *GENAI_TOKENIZER_FILES)


# -- the recipe --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Recipe:
    """How to quantize: what `qwen3vl-lab export --precision int4` options set (builder defaults)."""

    block_size: int = 32  # weights per scale along K (16..256, a power of two)
    symmetric: bool = True  # True: int4 with the implicit zero point 8; False: uint4 + zero points
    accuracy_level: int = 4  # MatMulNBits compute: 0 unset (fp32 dequant), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
    lm_head: str = "int4"  # "int4", "int8" (MatMulNBits bits=8) or "fp32" (left a plain MatMul)
    algorithm: str = "default"  # "default" (ORT C++ RTN), "rtn" / "k_quant" (neural-compressor port), "hqq"
    bits: int = 4  # body MatMuls: 4 (or 2 / 8 for experiments, e.g. in a recipe sweep)

    def validate(self) -> "Int4Recipe":
        """A checked copy; hqq and k_quant always write zero points, so they are recorded as asymmetric."""
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"block_size {self.block_size} is not supported by MatMulNBits; choose from "
                            f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UserError(f"accuracy_level {self.accuracy_level} is invalid; choose 0 (unset), 1 (fp32), 2 (fp16), "
                            "3 (bf16) or 4 (int8 activations)")
        if self.lm_head not in LM_HEAD_PRECISIONS:
            raise UserError(f"lm_head {self.lm_head!r} is invalid; choose from {', '.join(LM_HEAD_PRECISIONS)}")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"algorithm {self.algorithm!r} is invalid; choose from {', '.join(ALGORITHMS)}")
        if self.bits not in BITS:
            raise UserError(f"bits {self.bits} is invalid; MatMulNBits takes {', '.join(map(str, BITS))}")
        if self.bits == 2 and self.algorithm in ("rtn", "k_quant"):
            raise UserError(f"the {self.algorithm} quantizer cannot write 2-bit MatMulNBits; use algorithm default or hqq")
        if self.algorithm in ("hqq", "k_quant") and self.symmetric:
            return replace(self, symmetric=False)
        return self

    @property
    def head_bits(self) -> int | None:
        return {"int4": 4, "int8": 8, "fp32": None}[self.lm_head]

    @property
    def name(self) -> str:
        """A short folder-safe label, e.g. `default-b32-sym-acc4-head_int4`."""
        bits = "" if self.bits == 4 else f"-{self.bits}bit"
        sym = "sym" if self.symmetric else "asym"
        return f"{self.algorithm}{bits}-b{self.block_size}-{sym}-acc{self.accuracy_level}-head_{self.lm_head}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}

    @classmethod
    def from_name(cls, name: str) -> "Int4Recipe":
        """Parse `name` back, e.g. "rtn-b64-asym-acc0-head_int8" or "default-2bit-b32-sym-acc4-head_int4"."""
        m = re.fullmatch(r"(default|rtn|hqq|k_quant)(?:-(\d)bit)?-b(\d+)-(sym|asym)-acc(\d)-head_(int4|int8|fp32)", name)
        if m is None:
            raise UserError(f"recipe name {name!r} is not of the form ALGORITHM[-2bit]-bBLOCK-sym|asym-accLEVEL-"
                            "head_int4|int8|fp32 (e.g. default-b32-sym-acc4-head_int4)")
        algorithm, bits, block, sym, acc, head = m.groups()
        return cls(block_size=int(block), symmetric=sym == "sym", accuracy_level=int(acc), lm_head=head,
                   algorithm=algorithm, bits=int(bits or 4)).validate()

    @classmethod
    def from_dict(cls, d: dict) -> "Int4Recipe":
        return cls(**{k: d[k] for k in ("block_size", "symmetric", "accuracy_level", "lm_head", "algorithm", "bits")
                      if k in d})


# -- onnxruntime's quantizer ---------------------------------------------------------------------
def _import_quantizer():
    """Import onnxruntime's quantizer module without letting its `logging.basicConfig(INFO)` flood the root logger."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import matmul_nbits_quantizer as mq  # noqa: PLC0415 (its calibration stack loads on use)

    root.setLevel(level)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for name in (mq.__name__, "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mq


def _check_hqq_available() -> None:
    try:
        ok = importlib.util.find_spec("torch") is not None
    except ValueError:
        ok = False
    if not ok:
        raise UserError("onnxruntime's hqq quantizer needs torch, which is not installed; "
                        "pip install torch (CPU build) or choose --algorithm default, rtn or k_quant")


def make_quantizer(model: onnx.ModelProto, recipe: Int4Recipe, bits: int, node_name: str):
    """A `MatMulNBitsQuantizer` for `model` with the recipe's options, everything set explicitly."""
    mq = _import_quantizer()
    common = dict(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                  accuracy_level=recipe.accuracy_level or None)
    if recipe.algorithm == "default":
        return mq.MatMulNBitsQuantizer(model, bits=bits, **common)
    if recipe.algorithm in ("rtn", "k_quant"):
        cls = mq.RTNWeightOnlyQuantConfig if recipe.algorithm == "rtn" else mq.KQuantWeightOnlyQuantConfig
        algo = cls(customized_weight_config={node_name: {"bits": bits}})
        return mq.MatMulNBitsQuantizer(model, algo_config=algo, **common)
    _check_hqq_available()
    algo = mq.HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=bits)
    return mq.MatMulNBitsQuantizer(model, algo_config=algo, **common)


def one_matmul_model(node: onnx.NodeProto, weight: np.ndarray | None = None, *, raw: bytes | None = None,
                     dims: tuple[int, int] | None = None) -> onnx.ModelProto:
    """The MatMul `node` alone, with its weight (K, N) as the only initializer (same names as in the decoder).

    Pass the weight as an array, or as float32 `raw` bytes with `dims` (what `read_raw` returns: the
    bytes go into the model's one tensor without any numpy copy)."""
    if weight is not None:
        weight = np.ascontiguousarray(weight, np.float32)
        raw, dims = weight.tobytes(), weight.shape
    k, n = (int(d) for d in dims)
    graph = helper.make_graph(
        [helper.make_node("MatMul", list(node.input), list(node.output), name=node.name)], "one_matmul",
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, ["M", n])], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    t = model.graph.initializer.add()  # filled in place: make_model / append would copy the weight again
    t.name, t.data_type = node.input[1], TensorProto.FLOAT
    t.dims.extend([k, n])
    t.raw_data = raw
    return model


def set_accuracy_level(node: onnx.NodeProto, level: int) -> None:
    """Make a MatMulNBits node's accuracy_level `level` (0 = attribute absent, as the quantizer writes it)."""
    for a in list(node.attribute):
        if a.name == "accuracy_level":
            node.attribute.remove(a)
    if level:
        node.attribute.append(helper.make_attribute("accuracy_level", level))


def quantize_matmul(node: onnx.NodeProto, weight: np.ndarray, recipe: Int4Recipe, bits: int
                    ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """One MatMul + its fp32 weight (K, N) -> the quantizer's replacement nodes and initializers."""
    return quantize_one_matmul(node, one_matmul_model(node, weight), recipe, bits)


def quantize_one_matmul(node: onnx.NodeProto, model: onnx.ModelProto, recipe: Int4Recipe, bits: int
                        ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Run MatMulNBitsQuantizer on a one-node model (see `one_matmul_model`); returns its nodes and initializers.

    onnxruntime's hqq path does not write accuracy_level, so it is set on the result (a graph-only
    attribute) to honour the recipe for every algorithm.
    """
    k, n = (int(d) for d in model.graph.initializer[0].dims)
    n_blocks = (k + recipe.block_size - 1) // recipe.block_size
    if recipe.algorithm in ("rtn", "k_quant") and not recipe.symmetric and n_blocks % 2:
        # onnxruntime's neural-compressor port packs 4-bit zero points across columns when a column
        # has an odd number of blocks, then fails to reshape them (onnxruntime 1.32)
        raise UserError(f"onnxruntime's {recipe.algorithm} quantizer cannot write zero points for {node.name} "
                        f"(K={k}, block {recipe.block_size}: {n_blocks} block(s) per column, an odd number); "
                        "choose a block size giving an even number of blocks, --algorithm default, or symmetric rtn")
    q = make_quantizer(model, recipe, bits, node.name)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # hqq: torch warns about read-only numpy input
            q.process()  # (the rtn/k_quant path prints a progress line per node: swallowed)
    except (ValueError, AssertionError, NotImplementedError) as e:
        raise UserError(f"onnxruntime's quantizer failed on {node.name} (K={k}, N={n}, {recipe.name}): "
                        f"{str(e).splitlines()[0][:160]}; try another --block_size or --algorithm") from None
    result = q.model.model if hasattr(q.model, "model") else q.model
    # copies: a protobuf sub-message keeps its whole parent alive (upb arenas), and the parent here
    # still holds the fp32 weight; keeping the original node objects would pin every weight in memory
    nodes = [_detached(x) for x in result.graph.node]
    kinds = [x.op_type for x in nodes]
    if "MatMulNBits" not in kinds:
        raise RuntimeError(f"onnxruntime's quantizer left {node.name} unquantized (nodes {kinds})")
    for x in nodes:
        if x.op_type == "MatMulNBits":
            set_accuracy_level(x, recipe.accuracy_level)
    used = {i for x in nodes for i in x.input}
    return nodes, [_detached(t) for t in result.graph.initializer if t.name in used]


def _detached(message):
    """A copy of a protobuf message that owns its memory (does not pin the message it came from)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


# -- streaming the graph -------------------------------------------------------------------------
class ExternalData:
    """Appends tensors to one external-data file (page-aligned), returning TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: BinaryIO | None = None

    def tensor(self, name: str, array: np.ndarray | None = None, raw: bytes | None = None,
               data_type: int | None = None, dims=None, *, align: bool = True, inline: bool = True) -> TensorProto:
        """One tensor: inline when small (unless inline=False), else appended to the file, on a page boundary
        unless align=False (then right after the previous tensor: tensors written so form one byte span)."""
        if array is not None:
            array = np.ascontiguousarray(array)
            raw, data_type, dims = array.tobytes(), helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
        if inline and len(raw) < INLINE_LIMIT:
            t = TensorProto(name=name, data_type=data_type, dims=list(dims))
            t.raw_data = raw
            return t
        if self._file is None:
            self._file = open(self.path, "wb")
        offset = self._file.tell()
        pad = (-offset) % ALIGN if align else 0
        if pad:
            self._file.write(b"\0" * pad)
            offset += pad
        self._file.write(raw)
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return t

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_raw(t: TensorProto, folder: Path) -> bytes:
    """The bytes of one initializer, from its external-data file when it has one."""
    if t.data_location != TensorProto.EXTERNAL:
        return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
    path, offset, length = external_data(t, folder)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length) if length is not None else f.read()


def read_array(t: TensorProto, folder: Path) -> np.ndarray:
    """One initializer as a numpy array (only this tensor is read from disk).

    External data is read directly (offset/length), not through onnx's loader, which refuses
    data files with several hard links (the sweep's variants share their fp32 files that way).
    """
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    path, offset, _ = external_data(t, folder)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    with open(path, "rb") as f:
        arr = np.fromfile(f, dtype=dtype, count=count, offset=offset)
    if arr.size != count:
        raise UserError(f"{path} is truncated (tensor {t.name}); re-export the folder")
    return arr.reshape(tuple(t.dims))


def matmul_weights(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> dict[str, str]:
    """node name -> weight name for every MatMul whose second input is a 2-D initializer."""
    out = {}
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            out[n.name] = n.input[1]
    return out


def _node_bits(node: onnx.NodeProto, recipe: Int4Recipe, weight: str, bits_for: Mapping[str, int | None]) -> int | None:
    """The bits of one MatMul: `bits_for[weight]` when given (None = left fp32), else the recipe's."""
    if weight in bits_for:
        return bits_for[weight]
    if LM_HEAD_OUTPUT in node.output:
        return recipe.head_bits
    return recipe.bits


def check_bits_for(bits_for: Mapping[str, int | None], weights) -> dict[str, int | None]:
    """A per-weight precision map (mixed precision: weight name -> 2, 4, 8 or None for fp32), checked."""
    bits_for = dict(bits_for or {})
    unknown = sorted(set(bits_for) - set(weights))
    if unknown:
        raise UserError(f"bits_for names {unknown[0]!r}, which is not a MatMul weight of the decoder "
                        f"({len(unknown)} unknown); use the weight names of the fp32 graph")
    bad = {w: b for w, b in bits_for.items() if b is not None and b not in BITS}
    if bad:
        raise UserError(f"bits_for gives {next(iter(bad.values()))} bits; MatMulNBits takes {', '.join(map(str, BITS))} "
                        "(or None: leave the MatMul fp32)")
    return bits_for


def _node_record(nodes: list[onnx.NodeProto], weight: str, inits: list[TensorProto]) -> dict:
    q = next(n for n in nodes if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
    return {"node": q.name, "weight": weight, "output": q.output[0], "K": attrs["K"], "N": attrs["N"],
            "bits": attrs["bits"], "block_size": attrs["block_size"], "accuracy_level": attrs.get("accuracy_level", 0),
            "zero_points": len(q.input) > 3 and bool(q.input[3]),
            "bytes": int(sum(len(t.raw_data) for t in inits))}


def quantize_decoder(src_folder: Path, dst_folder: Path, recipe: Int4Recipe, progress: bool = True,
                     bits_for: Mapping[str, int | None] | None = None) -> dict:
    """src/model.onnx (fp32, external data) -> dst/model.onnx with MatMulNBits; returns the per-node record.

    bits_for: weight name -> bits (or None: stays fp32) for the MatMuls that differ from the recipe (mixed
    precision); a q/k/v or gate/up group with mixed bits is left unfused by the fast decoder."""
    src_folder, dst_folder = Path(src_folder), Path(dst_folder)
    model = onnx.load(str(src_folder / DECODER_FILE), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = matmul_weights(graph, inits)
    bits_for = check_bits_for(bits_for or {}, targets.values())
    groups = {w: group for group in fusion_groups(targets.values()) for w in group}  # weight -> its q/k/v or gate/up
    pending: dict[tuple[str, ...], dict[str, tuple]] = {}  # quantized group members waiting for the rest
    data = ExternalData(dst_folder / (DECODER_FILE + ".data"))
    new_nodes, new_inits, records, excluded, replaced = [], [], [], [], set()
    try:
        with tqdm(total=len(targets), desc=f"quantize {recipe.name}", unit="matmul", disable=not progress) as bar:
            for node in graph.node:
                interruption_point()  # a cancelled sweep job stops between matrices (signals.py)
                bits = _node_bits(node, recipe, targets[node.name], bits_for) if node.name in targets else None
                if bits is None:
                    if node.name in targets:
                        excluded.append(node.name)
                        bar.update(1)
                    new_nodes.append(node)
                    continue
                # the fp32 weight (K, N) lives only inside the one-node model: one matrix in memory at a time
                if inits[targets[node.name]].data_type != TensorProto.FLOAT:
                    raise UserError(f"{targets[node.name]} is not float32; quantize the fp32 export")
                w = inits[targets[node.name]]
                one = one_matmul_model(node, raw=read_raw(w, src_folder), dims=tuple(w.dims))
                q_nodes, q_inits = quantize_one_matmul(node, one, recipe, bits)
                del one
                records.append(_node_record(q_nodes, targets[node.name], q_inits))
                new_nodes.extend(q_nodes)
                group = groups.get(targets[node.name])
                if group is None:
                    for t in q_inits:  # packed weights, scales, zero points: straight to disk
                        new_inits.append(data.tensor(t.name, numpy_helper.to_array(t)))
                else:  # written once the whole group is quantized (a few MB), side by side
                    done = pending.setdefault(group, {})
                    done[targets[node.name]] = (q_nodes, q_inits)
                    if len(done) == len(group):
                        new_inits.extend(write_side_by_side([done.pop(w) for w in group], data))
                replaced.add(targets[node.name])
                bar.update(1)
        for done in pending.values():  # groups with a member left unquantized: each member on its own
            for _, q_inits in done.values():
                new_inits.extend(data.tensor(t.name, numpy_helper.to_array(t)) for t in q_inits)
        for t in graph.initializer:  # everything else (norm weights, fp32 head when excluded, ...) is copied
            if t.name not in replaced:
                new_inits.append(carry_initializer(t, src_folder, data))
    finally:
        data.close()
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    model.doc_string = f"qwen3vl-lab INT4 decoder ({recipe.name}), quantized by onnxruntime MatMulNBitsQuantizer"
    onnx.save_model(model, str(dst_folder / DECODER_FILE))
    return {"nodes": records, "excluded": excluded}


def write_side_by_side(members: list[tuple[list[onnx.NodeProto], list[TensorProto]]],
                       data: ExternalData) -> list[TensorProto]:
    """The quantized tensors of layers the fast decoder fuses (q/k/v, gate/up), input by input: all packed
    weights one after the other, then all scales, then all zero points.

    MatMulNBits tensors are N-major, so each such run is byte for byte the fused layer's tensor:
    `model-fast.onnx` points into `model.onnx.data` instead of keeping a second copy (decoder_fast.py).
    """
    nbits = [next((n for n in nodes if n.op_type == "MatMulNBits"), None) for nodes, _ in members]
    by_name = [{t.name: t for t in inits} for _, inits in members]
    out, written = [], set()
    if all(n is not None for n in nbits) and fusable(nbits):
        for j in range(1, len(nbits[0].input)):
            names = [n.input[j] for n in nbits]
            if all(name in tensors for name, tensors in zip(names, by_name)):
                for k, (name, tensors) in enumerate(zip(names, by_name)):
                    out.append(data.tensor(name, numpy_helper.to_array(tensors[name]), align=k == 0, inline=False))
                    written.add(name)
    for tensors in by_name:
        out.extend(data.tensor(t.name, numpy_helper.to_array(t)) for t in tensors.values() if t.name not in written)
    return out


def carry_initializer(t: onnx.TensorProto, src_folder: Path, data: ExternalData) -> onnx.TensorProto:
    """An initializer the new graph keeps unchanged: external data is copied into `data`, inline stays inline."""
    if t.data_location == TensorProto.EXTERNAL:
        return data.tensor(t.name, raw=read_raw(t, src_folder), data_type=t.data_type, dims=t.dims)
    return t


# -- a whole precision folder --------------------------------------------------------------------
def copy_assets(fp32_folder: str | Path, dst: str | Path) -> Path:
    """Copy the fp32 embedding/vision files into `dst` (a private source for hard-linked variants)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (Path(fp32_folder) / name).is_file() and not (dst / name).is_file():
            shutil.copy2(Path(fp32_folder) / name, dst / name)
    return dst


def link_or_copy(src: Path, dst: Path, link: bool) -> None:
    """Hard-link (no extra disk; onnxruntime refuses symlinks that leave the folder), else copy: link=False,
    or a filesystem that cannot link (another device, no hard links, too many links).

    onnxruntime reads hard-linked files like any other; onnx's own loader (`onnx.load` with external
    data, `onnx.checker` on a path) refuses external data with several links (a guard against link
    attacks): load such a graph with `load_external_data=False`, or copy the file to unlink it.
    """
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _folder_bytes(folder: Path, names) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def quantize_folder(fp32_folder: str | Path, out_folder: str | Path, recipe: Int4Recipe | None = None, *,
                    progress: bool = True, link: bool = False, assets: str | Path | None = None,
                    bits_for: Mapping[str, int | None] | None = None) -> Path:
    """An fp32 precision folder (OUT/cpu-fp32) -> a runnable INT4 folder: decoder, fp32 embedding/vision,
    genai_config.json, qwen3vl_lab.json (precision int4, the recipe) and quantization.json.

    Written into a temporary sibling folder and moved into place when complete. The embedding/vision
    files come from `assets` (default: the fp32 folder): copied, or with link=True hard-linked where
    the filesystem allows (`link_or_copy`; `qwen3vl-lab export` links, so cpu-int4/ adds no second copy
    of them; a recipe sweep links its variants to one private copy instead of the export's files).
    bits_for: per-weight exceptions to the recipe (mixed precision, `quantize_decoder`), kept in qwen3vl_lab.json.
    """
    recipe = (recipe or Int4Recipe()).validate()
    src, out = Path(fp32_folder), Path(out_folder)
    if not (src / DECODER_FILE).is_file() or not (src / GENAI_CONFIG).is_file():
        raise UserError(f"{src} is not an exported fp32 folder (no {DECODER_FILE} / {GENAI_CONFIG}); "
                        "run `qwen3vl-lab export --precision fp32` first")
    genai = read_export_config(src)  # genai_config.json + qwen3vl_lab.json
    if genai.get("qwen3vl_lab", {}).get("precision") != "fp32":
        raise UserError(f"{src} holds precision {genai.get('qwen3vl_lab', {}).get('precision')!r}; quantize the fp32 folder")
    if recipe.algorithm == "hqq":
        _check_hqq_available()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with staging_folder(out.parent, f".{out.name}-", name="the int4 folder", shown=out) as staging:
        nodes = quantize_decoder(src, staging, recipe, progress, bits_for)
        shared = Path(assets) if assets is not None else src
        for name in COPIED_FILES:
            if (shared / name).is_file():
                link_or_copy(shared / name, staging / name, link)
        seconds = time.perf_counter() - t0
        genai["qwen3vl_lab"]["precision"] = "int4"
        genai["qwen3vl_lab"]["recipe"] = recipe.to_dict()
        if bits_for:
            genai["qwen3vl_lab"]["bits_for"] = dict(bits_for)  # mixed precision: these MatMuls differ from the recipe
        gc.write_genai_config(staging, genai)
        decoder_files = (DECODER_FILE, DECODER_FILE + ".data")
        (staging / QUANTIZATION_FILE).write_text(json.dumps(quantization_record(
            recipe, nodes, seconds, _folder_bytes(src, decoder_files), _folder_bytes(staging, decoder_files)),
            indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, out, what="int4 folder", legacy=legacy_precision_patterns(out))
    return out


def quantization_record(recipe: Int4Recipe, nodes: dict, seconds: float, fp32_bytes: int, int4_bytes: int) -> dict:
    return {
        "recipe": recipe.to_dict(),
        "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "onnxruntime_version": onnxruntime.__version__,
        "source": f"cpu-fp32/{DECODER_FILE}",
        "seconds": round(seconds, 3),
        "decoder_bytes": {"fp32": fp32_bytes, "quantized": int4_bytes},
        "num_quantized": len(nodes["nodes"]),
        "excluded": nodes["excluded"],
        "nodes": nodes["nodes"],
    }


def read_recipe(folder: str | Path) -> Int4Recipe | None:
    """The recipe a folder was quantized with (from qwen3vl_lab.json), or None for an fp32 folder."""
    if not (Path(folder) / GENAI_CONFIG).is_file():
        return None
    recipe = read_export_config(folder).get("qwen3vl_lab", {}).get("recipe")
    return Int4Recipe.from_dict(recipe) if recipe else None
