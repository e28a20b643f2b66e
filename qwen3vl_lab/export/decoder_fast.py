"""The fast text decoder: the same weights as `model.onnx`, run through onnxruntime's fused CPU kernels.

`export/decoder.py` spells the decoder out op by op so every tensor can be tapped; this variant
computes the same function with onnxruntime's contrib ops:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   RMSNorm (+ the residual add)
    MRotaryEmbedding (mrope_layout 1)                                 interleaved 3-D RoPE on q and k
    GroupQueryAttention (do_rotary 0)                                 attention over a KV buffer that
                                                                      is both past and present
    QuickGelu(alpha=1)                                                SiLU in one op

It is written from an exported decoder, not from the checkpoint: every linear layer is the node
the source `model.onnx` uses for that weight (MatMul in fp32, MatMulNBits after INT4
quantization), and every initializer is a reference into the source's `model.onnx.data`. So
`model-fast.onnx` sits beside `model.onnx` of any precision, and both graphs compute with the very
same (quantized) bytes. In INT4 the q/k/v and gate/up layers are also fused into one MatMulNBits
each, over their packed bytes concatenated: the quantizer writes those tensors side by side in
`model.onnx.data` (`quantize.write_side_by_side`), so each fused tensor is one more reference into
that file and `model-fast.onnx` is the graph only, in fp32 and INT4 alike. A source laid out
otherwise (an older export) gets the concatenated bytes in `model-fast.onnx.data` (~0.6 GB for 2B).

Inputs  inputs_embeds (B, S, H) f32, position_ids (3, B, S) i64, seqlens_k (B,) i32 (= total
        length - 1 per row), total_sequence_length () i32, cos_cache / sin_cache (C, hd/2) f32
        (cos/sin of position p * inv_freq, rows 0..C-1: `rope.rope_cache`), past_key_values.{i}.key/value
        (B, kv, C, hd) f32 — the preallocated buffers, bound again as present.{i}.*,
        deepstack_embeds (D, B, S, H) f32, logits_to_keep () i64 [optional, 0 = all]
Outputs logits (B, S', V), present.{i}.key/value (B, kv, C, hd)
Prompts must not be left-padded (GroupQueryAttention keeps each row's tokens at the start of
its buffer); `qwen3vl_lab/fast.py` runs this graph.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import ModelConfig, TextConfig
from ..errors import UserError
from ..layout import (
    COS_CACHE,
    DECODER_FILE,
    DEEPSTACK_EMBEDS,
    FAST_DECODER_FILE,
    INPUTS_EMBEDS,
    LOGITS,
    LOGITS_TO_KEEP,
    POSITION_IDS,
    SEQLENS_K,
    SIN_CACHE,
    TOTAL_SEQUENCE_LENGTH,
    past_names,
    present_names,
)
from ..layouts import read_export_config
from ..paths import external_data
from .decoder import PREFIX
from .files import add_to_stamp, staging_folder
from .onnx_graph import FLOAT, INT64, MS_DOMAIN, GraphBuilder

INT32 = TensorProto.INT32
SILU_FORMS = ("quickgelu", "sigmoid")  # SiLU as one QuickGelu(alpha=1), or Sigmoid + Mul
# RoPE as MRotaryEmbedding on q and k (any positions: images), or inside GroupQueryAttention (do_rotary) at
# row 0 of position_ids: exact only when t = h = w, i.e. text tokens (every decode step; text-only prompts)
ROTARY_FORMS = ("mrope", "gqa")
LINEAR_OPS = ("MatMul", "MatMulNBits", "FusedMatMul", "Gemm")
# onnxruntime's quantizer names the packed tensors after the weight: W_Q4, W_Q8G32, W_scales, W_zp, ...
QUANT_SUFFIX = re.compile(r"_(Q\d+(G\d+)?|scales?|zp|zero_points)$")


class SourceDecoder:
    """An exported `model.onnx` read without its weights: which node computes each linear layer."""

    def __init__(self, model: onnx.ModelProto, folder: Path | None = None):
        self.model, self.folder = model, folder
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.linear: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            if node.op_type not in LINEAR_OPS:
                continue
            for name in node.input[1:2]:  # the weight (or its packed form) is the second input
                if name in self.initializers:
                    self.linear.setdefault(QUANT_SUFFIX.sub("", name), node)

    def node_for(self, weight: str) -> onnx.NodeProto:
        if weight not in self.linear:
            raise UserError(f"the exported decoder has no linear layer for {weight!r}, so the fast decoder cannot "
                            "be written from it; re-export the checkpoint with `qwen3vl-lab export`")
        return self.linear[weight]

    def tensor(self, name: str) -> TensorProto:
        if name not in self.initializers:
            raise UserError(f"the exported decoder has no tensor {name!r}; re-export the checkpoint with "
                            "`qwen3vl-lab export`")
        return self.initializers[name]

    def array(self, name: str) -> np.ndarray:
        """One initializer's values (only its bytes are read from the source's data file)."""
        t = self.tensor(name)
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        path, offset, _ = external_data(t, self.folder)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(np.prod(t.dims)) if t.dims else 1
        with open(path, "rb") as f:
            f.seek(offset)
            return np.fromfile(f, dtype=dtype, count=count).reshape(tuple(t.dims))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class FastGraph(GraphBuilder):
    """GraphBuilder whose weights are shared with the source decoder (external-data references).

    With `fuse`, linear layers that read the same input (q/k/v, gate/up) become one node over their
    weights concatenated along N (MatMul: (K, N) columns; MatMulNBits: its N-major packed blocks,
    scales and zero points: the same quantized bytes, so the same numbers); those weights are
    written to this graph's own data file. fuse=None fuses quantized (MatMulNBits) layers only:
    measured on the 2B dimensions (2 cores), fusing gave ~8-11% faster INT4 decode and nothing
    measurable in fp32, where it would cost a second copy of 55% of the weights on disk."""

    def __init__(self, source: SourceDecoder, data_path: Path | None = None, fuse: bool | None = None,
                 silu: str = "quickgelu", rotary: str = "mrope"):
        super().__init__("qwen3vl_text_decoder_fast", data_path)
        if silu not in SILU_FORMS or rotary not in ROTARY_FORMS:
            raise ValueError(f"silu {silu!r} / rotary {rotary!r} is not one of {SILU_FORMS} / {ROTARY_FORMS}")
        self.source, self.fuse, self.silu, self.rotary = source, fuse, silu, rotary
        self.positions_1d: str | None = None  # (B, S) row 0 of position_ids, for rotary="gqa"
        self._shared: set[str] = set()

    def shared(self, name: str) -> str:
        """Use the source's initializer `name` as is (its bytes stay in the source's data file)."""
        if name not in self._shared:
            self.initializers.append(self.source.tensor(name))
            self._shared.add(name)
        return name

    def linear(self, x: str, weight: str, out: str | None = None) -> str:
        """x @ W through the source's own node for W (MatMul, or MatMulNBits with its scales)."""
        src = self.source.node_for(weight)
        for name in src.input[1:]:
            if name:
                self.shared(name)
        return self.op(src.op_type, [x, *src.input[1:]], out=out, domain=src.domain, **_attrs(src))

    def linears(self, x: str, weights: list[str]) -> list[str]:
        """x @ W for several weights: one fused node + Split when `fuse` and their nodes agree, else one each."""
        nodes = [self.source.node_for(w) for w in weights]
        fuse = self.fuse if self.fuse is not None else nodes[0].op_type == "MatMulNBits"
        if not fuse or self.data_path is None or not fusable(nodes):
            return [self.linear(x, w) for w in weights]
        first, attrs = nodes[0], _attrs(nodes[0])
        if first.op_type == "MatMul":
            parts = [self.source.array(n.input[1]) for n in nodes]  # (K, N_i)
            sizes = [p.shape[1] for p in parts]
            inputs = [self.weight(f"{weights[0]}+fused", np.concatenate(parts, axis=1))]  # (K, sum N_i)
        else:  # MatMulNBits: every quantized input is N-major
            sizes = [_attrs(n)["N"] for n in nodes]
            attrs["N"] = sum(sizes)
            inputs = [self.fused_rows(f"{first.input[j]}+fused", [n.input[j] for n in nodes])
                      for j in range(1, len(first.input))]
        out = self.op(first.op_type, [x, *inputs], domain=first.domain, **attrs)
        return self.op("Split", [out, self.const(sizes, np.int64)], n_out=len(nodes), axis=-1)


    def fused_rows(self, name: str, parts: list[str]) -> str:
        """The source tensors `parts` concatenated along axis 0: a reference into the source's data file when
        they lie there side by side (no bytes written), else the concatenation in this graph's data file."""
        tensors = [self.source.tensor(p) for p in parts]
        span = contiguous_span(tensors, self.source.folder)
        if span is None:
            return self.weight(name, np.concatenate([self.source.array(p) for p in parts], axis=0))
        location, offset, length = span
        t = TensorProto(name=name, data_type=tensors[0].data_type,
                        dims=[sum(int(x.dims[0]) for x in tensors), *tensors[0].dims[1:]])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        return name


def contiguous_span(tensors: list[TensorProto], folder: str | Path) -> tuple[str, int, int] | None:
    """(file, offset, length) when the tensors are external, in one file, one right after the other, of one
    dtype and the same shape but for axis 0 (so their bytes in a row are their concatenation); else None.
    Every location, offset and length is checked as it is read (`paths.external_data`: inside `folder`, whole
    numbers): a junk entry is one line, not a traceback."""
    first = tensors[0]
    if any(t.data_location != TensorProto.EXTERNAL or t.data_type != first.data_type or not t.dims
           or list(t.dims[1:]) != list(first.dims[1:]) for t in tensors):
        return None
    spans = [external_data(t, folder) for t in tensors]  # (path, offset, length or None)
    if any(length is None or path != spans[0][0] for path, _, length in spans):
        return None
    offset = end = spans[0][1]
    for _, start, length in spans:
        if start != end:
            return None
        end += length
    return {e.key: e.value for e in first.external_data}["location"], offset, end - offset


def fusion_groups(weights) -> list[tuple[str, ...]]:
    """The weights the fast decoder fuses into one node: each layer's (q, k, v) and (gate, up) projections,
    in that order, among `weights` (complete groups only)."""
    names = set(weights)
    groups = []
    for w in sorted(names):
        m = re.fullmatch(r"(.*\.layers\.\d+)\.self_attn\.q_proj\.weight", w)
        if m:
            groups.append(tuple(f"{m[1]}.self_attn.{x}_proj.weight" for x in "qkv"))
        m = re.fullmatch(r"(.*\.layers\.\d+)\.mlp\.gate_proj\.weight", w)
        if m:
            groups.append((w, f"{m[1]}.mlp.up_proj.weight"))
    return [g for g in groups if set(g) <= names]


def fusable(nodes: list[onnx.NodeProto]) -> bool:
    """Same op, same inputs count, same attributes except N, and a plain layout we know how to concatenate."""
    first = nodes[0]
    if first.op_type not in ("MatMul", "MatMulNBits") or any(n.op_type != first.op_type for n in nodes):
        return False
    if first.op_type == "MatMulNBits" and len(first.input) > 4:  # g_idx / bias: leave them alone
        return False
    strip = lambda n: {k: v for k, v in _attrs(n).items() if k != "N"}  # noqa: E731
    return all(len(n.input) == len(first.input) and strip(n) == strip(first) for n in nodes)


def rms_norm(g: FastGraph, x: str, weight: str, eps: float) -> str:
    """Qwen3VLTextRMSNorm over the last axis."""
    return g.op("SimplifiedLayerNormalization", [x, g.shared(weight)], axis=-1, epsilon=eps)


def skip_rms_norm(g: FastGraph, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(rms(x + residual), x + residual): the residual add fused into the next norm."""
    out = g.op("SkipSimplifiedLayerNormalization", [x, residual, g.shared(weight)], n_out=4,
               domain=MS_DOMAIN, epsilon=eps)
    return out[0], out[3]


def head_norm(g: FastGraph, x: str, weight: str, n_heads: int, cfg: TextConfig) -> str:
    """The per-head q/k RMSNorm: (B, S, n*hd) -> (B, S, n, hd) -> norm -> (B, S, n*hd)."""
    heads = g.op("Reshape", [x, g.const([0, 0, n_heads, cfg.head_dim], np.int64)])
    normed = rms_norm(g, heads, weight, cfg.rms_norm_eps)
    return g.op("Reshape", [normed, g.const([0, 0, n_heads * cfg.head_dim], np.int64)])


def mrope(g: FastGraph, x: str, n_heads: int, cfg: TextConfig) -> str:
    """Interleaved MRoPE (layout 1) on (B, S, n*hd) with the 3-row position ids."""
    return g.op("MRotaryEmbedding", [x, POSITION_IDS, COS_CACHE, SIN_CACHE], domain=MS_DOMAIN,
                num_heads=n_heads, mrope_section=list(cfg.mrope_section), mrope_layout=1, interleaved=0)


def attention(g: FastGraph, h: str, i: int, cfg: TextConfig) -> str:
    """q/k/v projections, q/k-norm, MRoPE, then GroupQueryAttention on the shared KV buffers."""
    nh, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    p = f"{PREFIX}.layers.{i}.self_attn"
    q, k, v = g.linears(h, [f"{p}.{n}_proj.weight" for n in "qkv"])  # (B, S, nh*hd), 2 x (B, S, kv*hd)
    q = head_norm(g, q, f"{p}.q_norm.weight", nh, cfg)
    k = head_norm(g, k, f"{p}.k_norm.weight", kv, cfg)
    rotary = []
    if g.rotary == "mrope":
        q, k = mrope(g, q, nh, cfg), mrope(g, k, kv, cfg)
    else:  # t = h = w: the interleaved MRoPE of a text token is the 1-D rotation at its (row 0) position
        if g.positions_1d is None:
            g.positions_1d = g.op("Gather", [POSITION_IDS, g.const(0, np.int64)], axis=0)  # (B, S)
        rotary = [COS_CACHE, SIN_CACHE, g.positions_1d]
    ctx, _, _ = g.op("GroupQueryAttention",
                     [q, k, v, past_names(i)[0], past_names(i)[1], SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *rotary],
                     out=[f"/model/layers.{i}/attn/output", *present_names(i)],
                     domain=MS_DOMAIN, num_heads=nh, kv_num_heads=kv, scale=float(hd ** -0.5),
                     do_rotary=int(bool(rotary)), rotary_interleaved=0)
    return g.linear(ctx, f"{p}.o_proj.weight")  # (B, S, H)


def silu(g: FastGraph, x: str) -> str:
    """x * sigmoid(x): QuickGelu with alpha 1 (one op), or Sigmoid then Mul (onnxruntime-genai's builder's form)."""
    if g.silu == "quickgelu":
        return g.op("QuickGelu", [x], domain=MS_DOMAIN, alpha=1.0)
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def mlp(g: FastGraph, h: str, i: int) -> str:
    """down(silu(gate(h)) * up(h))."""
    p = f"{PREFIX}.layers.{i}.mlp"
    gate, up = g.linears(h, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"])  # (B, S, I) each
    act = silu(g, gate)
    return g.linear(g.op("Mul", [act, up]), f"{p}.down_proj.weight")


def build_fast_decoder(cfg: ModelConfig, source: onnx.ModelProto, folder: Path | None = None,
                       fuse: bool | None = None, data_dir: Path | None = None,
                       silu: str = "quickgelu", rotary: str = "mrope") -> onnx.ModelProto:
    """The fused decoder graph over `source`'s weights (source loaded with load_external_data=False).

    fuse (True / None = quantized layers only / False) also concatenates q/k/v and gate/up weights
    (read from `folder`, written to `data_dir`/model-fast.onnx.data): fewer, larger kernels, at the
    cost of a second copy of those weights. Without `folder` nothing is fused."""
    text = cfg.text
    data = None
    if fuse is not False and folder is not None:
        data = Path(data_dir or folder) / (FAST_DECODER_FILE + ".data")
    g = FastGraph(SourceDecoder(source, folder), data, fuse=fuse, silu=silu, rotary=rotary)
    B, S, C = "batch_size", "sequence_length", "kv_capacity"
    x = g.input(INPUTS_EMBEDS, FLOAT, [B, S, text.hidden_size])
    g.input(POSITION_IDS, INT64, [3, B, S])
    g.input(SEQLENS_K, INT32, [B])
    g.input(TOTAL_SEQUENCE_LENGTH, INT32, [])
    for name in (COS_CACHE, SIN_CACHE):
        g.input(name, FLOAT, ["rope_length", text.head_dim // 2])
    for i in range(text.num_hidden_layers):
        for name in past_names(i):
            g.input(name, FLOAT, [B, text.num_key_value_heads, C, text.head_dim])
    deepstack = None
    if cfg.num_deepstack:
        deepstack = g.input(DEEPSTACK_EMBEDS, FLOAT, [cfg.num_deepstack, B, S, text.hidden_size])
    keep = g.optional_input(LOGITS_TO_KEEP[0], np.array(0, np.int64), [])
    eps = text.rms_norm_eps

    with g.scope("model"):
        residual = x
        h = rms_norm(g, x, f"{PREFIX}.layers.0.input_layernorm.weight", eps)
        for i in range(text.num_hidden_layers):
            p = f"{PREFIX}.layers.{i}"
            with g.scope(f"layers.{i}"):
                attn = attention(g, h, i, text)
                h, residual = skip_rms_norm(g, attn, residual, f"{p}.post_attention_layernorm.weight", eps)
                out = mlp(g, h, i)
                if deepstack is not None and i < cfg.num_deepstack:  # DeepStack joins the residual stream
                    out = g.op("Add", [out, g.op("Gather", [deepstack, g.const(i, np.int64)], axis=0)])
                last = i + 1 == text.num_hidden_layers
                norm = f"{PREFIX}.norm.weight" if last else f"{PREFIX}.layers.{i + 1}.input_layernorm.weight"
                h, residual = skip_rms_norm(g, out, residual, norm, eps)  # the last one is the final norm
        start = g.op("Neg", [g.op("Unsqueeze", [keep, g.const([0], np.int64)])])
        h = g.op("Slice", [h, start, g.const([np.iinfo(np.int64).max], np.int64), g.const([1], np.int64)])
    with g.scope("lm_head"):
        logits = g.linear(h, "lm_head.weight", out=LOGITS)
    g.output(logits, FLOAT, [B, "logits_length", text.vocab_size])
    for i in range(text.num_hidden_layers):
        for name in present_names(i):
            g.output(name, FLOAT, [B, text.num_key_value_heads, C, text.head_dim])
    return g.build(doc="qwen3vl-lab fast decoder: fused onnxruntime contrib ops over the weights of model.onnx")


def write_fast_decoder(folder: str | Path, cfg: ModelConfig | None = None, fuse: bool | None = None) -> Path:
    """Write `model-fast.onnx` beside an exported `model.onnx` (any precision); returns its path.

    Unfused (fp32 by default), the file holds the graph only (a few hundred kB): its weights are
    references into `model.onnx.data`. Fused (INT4 by default, see FastGraph) it adds
    `model-fast.onnx.data` with the concatenated q/k/v and gate/up weights. Everything is written in
    a staging folder and moved into place, the graph last.
    """
    folder = Path(folder)
    source_path = folder / DECODER_FILE
    if not source_path.is_file():
        raise UserError(f"{source_path} is missing; run `qwen3vl-lab export` first")
    if cfg is None:
        cfg = ModelConfig.from_dict(read_export_config(folder)["qwen3vl_lab"]["config"])
    source = onnx.load(str(source_path), load_external_data=False)
    out, data = folder / FAST_DECODER_FILE, folder / (FAST_DECODER_FILE + ".data")
    with staging_folder(folder, ".fast-", name="the folder") as staging:
        model = build_fast_decoder(cfg, source, folder, fuse=fuse, data_dir=staging)
        onnx.save_model(model, str(staging / FAST_DECODER_FILE))
        if (staging / data.name).is_file():
            (staging / data.name).replace(data)
        else:
            data.unlink(missing_ok=True)
        (staging / FAST_DECODER_FILE).replace(out)
        add_to_stamp(folder, [out.name, data.name])  # ours, should the folder be replaced later
    return out
