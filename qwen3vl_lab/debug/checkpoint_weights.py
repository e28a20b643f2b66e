"""MatMulNBits weights traced back to the Hugging Face checkpoint's tensors, for INT4 decoders made by any tool.

    sources = checkpoint_sources("MODEL/cpu-int4", "MODEL/pytorch")    # one MatmulSource per MatMulNBits node
    sources[0].keys      # ('model.language_model.layers.0.self_attn.q_proj.weight', '...k_proj.weight', '...v_proj.weight')
    ckpt = CheckpointWeights("MODEL/pytorch"); w = ckpt.weight_of(qm)   # (K, N) float32: what the node should hold

An export made by another tool has no fp32 twin whose MatMuls write the same tensors as its
MatMulNBits, so `weights.compare_weights` compares them with the checkpoint instead. Which checkpoint
tensors a node holds is read from its packed weight's name, else its node name, as exporters write them:

    exporter                      MatMulNBits node (weight)                              checkpoint tensors
    qwen3vl-lab                   (model.language_model.layers.{i}.self_attn.q_proj.weight_Q4)  layers.{i}.self_attn.q_proj
    onnxruntime-genai's builder   /model/layers.{i}/attn/qkv_proj/MatMul_Q4              q_proj, k_proj, v_proj, stacked
    (the original guide's         /model/layers.{i}/attn/o_proj/MatMul_Q4                o_proj
    export)                       /model/layers.{i}/mlp/{gate,up,down}_proj/MatMul_Q4    gate_proj, up_proj, down_proj
                                  .../mlp/gate_up_proj/... (when fused)                  gate_proj, up_proj, stacked
                                  /lm_head/MatMul_Q4                                     lm_head, or embed_tokens if tied

A torch Linear stores its weight (out, in) = (N, K) and a fused projection stacks its parts along
`out` (the builder's Split after qkv_proj cuts q | k | v in that order); MatMulNBits multiplies by
W (K, N) (see weights.py), so W = concat(parts, axis=0).T. Checkpoint names are matched under any of
the usual prefixes (`model.language_model.`, `model.`, `language_model.model.`, none); a fused
tensor the checkpoint itself has (e.g. `qkv_proj`) is used as it is.

The checkpoint is read with `export.checkpoint.Checkpoint`: memory-mapped, one tensor at a time, as
float32 (safetensors' own numpy reader cannot read bfloat16, which real Qwen3-VL checkpoints are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import UserError
from ..export.checkpoint import Checkpoint
from ..layouts import find_layout
from ..model import Model

# (module, projection) in a node or weight name: "layers.3.self_attn.q_proj", "/model/layers.3/attn/qkv_proj/..."
PROJECTION = re.compile(r"layers[./](\d+)[./](self_attn|attn|mlp)[./]"
                        r"(qkv_proj|q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj)(?![a-z])")
LM_HEAD = re.compile(r"(?<![a-z_])lm_head(?![a-z_])")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_NAME = {parts: fused for fused, parts in FUSED.items()}  # ("q_proj", "k_proj", "v_proj") -> "qkv_proj"
MODULE = {"attn": "self_attn", "self_attn": "self_attn", "mlp": "mlp"}  # the builder's names -> the checkpoint's
# a checkpoint name without its prefix: "model.language_model.layers.0.mlp.up_proj.weight" -> "layers.0.mlp.up_proj.weight"
TEXT_KEY = re.compile(r"(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?"
                      r"(layers\.\d+\..+|embed_tokens\.weight|lm_head\.weight)")


def projection_parts(name: str) -> tuple[str, ...] | None:
    """The checkpoint projections (prefix-free, without `.weight`) a node or weight name refers to, fused ones
    as their parts in stacking order; ("lm_head",) for the head; None when the name says neither."""
    m = PROJECTION.search(name)
    if m:
        layer, module, proj = m.group(1), MODULE[m.group(2)], m.group(3)
        return tuple(f"layers.{layer}.{module}.{p}" for p in FUSED.get(proj, (proj,)))
    return ("lm_head",) if LM_HEAD.search(name) else None


def fused_name(parts: tuple[str, ...]) -> str | None:
    """("layers.0.self_attn.q_proj", "...k_proj", "...v_proj") -> "layers.0.self_attn.qkv_proj"; None if not fused."""
    if len(parts) < 2:
        return None
    base = parts[0].rpartition(".")[0]
    fused = FUSED_NAME.get(tuple(p.rpartition(".")[2] for p in parts))
    return f"{base}.{fused}" if fused else None


@dataclass(frozen=True)
class MatmulSource:
    """One MatMulNBits node and the checkpoint tensors its W (K, N) is made of."""

    node: str
    weight: str  # the packed initializer's name
    K: int
    N: int
    keys: tuple[str, ...]  # checkpoint tensor names, stacked along N in this order
    tied: bool = False  # the lm_head read from the tied embedding (the checkpoint has no lm_head.weight)

    @property
    def name(self) -> str:
        """A readable label: "layers.0.self_attn.q_proj+k_proj+v_proj", "lm_head (tied: embed_tokens)"."""
        short = [TEXT_KEY.fullmatch(k).group(1).removesuffix(".weight") for k in self.keys]
        if self.tied:
            return "lm_head (tied: embed_tokens)"
        if len(short) == 1:
            return short[0]
        head, _, _ = short[0].rpartition(".")
        return head + "." + "+".join(s.rpartition(".")[2] for s in short)


class CheckpointWeights:
    """A Hugging Face checkpoint read as the W (K, N) of MatMulNBits nodes, one tensor at a time."""

    def __init__(self, hf_dir: str | Path):
        self.ckpt = Checkpoint.open(hf_dir)
        self.root = Path(hf_dir)
        self.by_short: dict[str, str] = {}  # "layers.0.mlp.up_proj.weight" -> the checkpoint's full name
        for key in self.ckpt.names():
            m = TEXT_KEY.fullmatch(key)
            if m and (m.group(1) not in self.by_short or "language_model" in key):
                self.by_short[m.group(1)] = key

    def source(self, node: str, weight: str, K: int, N: int) -> MatmulSource:
        """Which checkpoint tensors make this node's W (K, N); a one-line UserError when none or shapes differ."""
        parts = projection_parts(weight) or projection_parts(node)
        if parts is None:
            raise UserError(f"MatMulNBits {node} ({weight}) names no projection of the checkpoint (q/k/v/o_proj, "
                            "gate/up/down_proj, lm_head); weight-by-weight comparison needs an fp32 export of the same "
                            "graph instead (compare_weights(fp32_folder, int4_folder))")
        tied = False
        fused = fused_name(parts)
        if fused and f"{fused}.weight" in self.by_short:
            parts = (fused,)  # the checkpoint has the fused tensor itself
        if parts == ("lm_head",) and "lm_head.weight" not in self.by_short:
            parts, tied = ("embed_tokens",), True
        missing = [p for p in parts if f"{p}.weight" not in self.by_short]
        if missing:
            raise UserError(f"checkpoint {self.root} has no {missing[0]}.weight (wanted for MatMulNBits {node}); "
                            "pass the checkpoint this export was made from")
        keys = tuple(self.by_short[f"{p}.weight"] for p in parts)
        shapes = [self.ckpt.shape(k) for k in keys]  # each (out, in)
        if any(len(s) != 2 or s[1] != K for s in shapes) or sum(s[0] for s in shapes) != N:
            raise UserError(f"MatMulNBits {node} is {K}x{N} (in x out) but checkpoint tensors {', '.join(keys)} are "
                            f"{', '.join('x'.join(map(str, s)) for s in shapes)} (out x in); pass the checkpoint this "
                            "export was made from")
        return MatmulSource(node, weight, K, N, keys, tied)

    def weight(self, source: MatmulSource) -> np.ndarray:
        """(K, N) float32: the parts (out, in) stacked along out, transposed (a view when there is one part)."""
        if len(source.keys) == 1:
            return self.ckpt.get(source.keys[0]).T
        return np.concatenate([self.ckpt.get(k) for k in source.keys], axis=0).T

    def weight_of(self, qm) -> np.ndarray:
        """(K, N) float32 for a weights.QuantizedMatrix (or anything with node, weight, K, N)."""
        return self.weight(self.source(qm.node, qm.weight, qm.K, qm.N))


def _checkpoint_of(x) -> Path | None:
    """The Hugging Face checkpoint (a folder with safetensors) shipped with an export, or None."""
    if x is None:
        return None
    if isinstance(x, Model):
        hf = x.layout.hf_dir if x.layout else None
    else:
        try:
            hf = find_layout(x).hf_dir
        except UserError:
            return None
    return hf if hf is not None and any(Path(hf).glob("*.safetensors")) else None


def find_checkpoint(*exports, hf_dir: str | Path | None = None) -> Path | None:
    """hf_dir if given, else the first checkpoint shipped with one of the exports (the guide's MODEL/pytorch/)."""
    if hf_dir is not None:
        return Path(hf_dir)
    return next((p for p in map(_checkpoint_of, exports) if p is not None), None)


def checkpoint_sources(model: Model | str | Path, hf_dir: str | Path | None = None) -> list[MatmulSource]:
    """Every MatMulNBits of a decoder with the checkpoint tensors it holds (hf_dir: else the shipped checkpoint)."""
    decoder = model.decoder_file if isinstance(model, Model) else find_layout(model, "int4").decoder
    root = find_checkpoint(model, hf_dir=hf_dir)
    if root is None:
        raise UserError(f"no Hugging Face checkpoint found with {decoder.parent}; pass hf_dir=CHECKPOINT (the folder "
                        "with the .safetensors the export was made from)")
    ckpt = CheckpointWeights(root)
    out = []
    for n in onnx.load(str(decoder), load_external_data=False).graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            out.append(ckpt.source(n.name, n.input[1], int(a["K"]), int(a["N"])))
    return out


__all__ = ["CheckpointWeights", "MatmulSource", "checkpoint_sources", "find_checkpoint", "fused_name", "projection_parts"]
