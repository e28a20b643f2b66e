"""The Qwen3-VL text decoder as an ONNX graph, written op by op from the checkpoint's weights.

Read this file top to bottom to follow one token from `inputs_embeds` to `logits`:

    mask          causal + padding mask from attention_mask            (B, 1, S, T)
    mrope         cos/sin from the 3-row position ids (interleaved)     (B, 1, S, hd)
    layer i       x = x + attn(rms(x));  x = x + mlp(rms(x));  x += deepstack[i] (i < num_deepstack)
    head          rms(x) -> lm_head                                     (B, S, V)

Inputs  inputs_embeds (B, S, H) f32, position_ids (3, B, S) i64, attention_mask (B, T) i64,
        past_key_values.{i}.key/value (B, kv, P, hd) f32,
        deepstack_embeds (D, B, S, H) f32 [optional, default zeros: no visual tokens],
        logits_to_keep () i64 [optional, default 0 = all positions]
Outputs logits (B, S', V), present.{i}.key/value (B, kv, T, hd), [attentions.{i} (B, nh, S, T)]
with T = P + S. Only standard ai.onnx ops: every intermediate tensor can be tapped by name
(`layers.{i}.attn_out`, `layers.{i}.mlp_out`, `layers.{i}.hidden`, ...), which the INT4 doctor uses.
This follows transformers' `modeling_qwen3_vl.py` (Qwen3VLTextModel) exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..config import ModelConfig, TextConfig
from ..layout import (
    ATTENTION_MASK,
    DEEPSTACK_EMBEDS,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGITS,
    LOGITS_TO_KEEP,
    POSITION_IDS,
    attention_name,
    past_names,
    present_names,
)
from ..rope import mrope_inv_freq_by_axis
from .onnx_graph import FLOAT, INT64, GraphBuilder

Weights = Callable[[str], np.ndarray]  # HF parameter name -> float32 array

NEG_INF = float(np.finfo(np.float32).min)  # what transformers adds at masked positions
PREFIX = "model.language_model"


def linear(g: GraphBuilder, x: str, weights: Weights, name: str, out: str | None = None) -> str:
    """x @ W.T for an HF Linear weight W (out, in), stored transposed (in, out) for MatMul / MatMulNBits."""
    w = g.weight(name, np.ascontiguousarray(weights(name).T))
    return g.op("MatMul", [x, w], out=out)


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, name: str, eps: float, out: str | None = None) -> str:
    """weight * x / sqrt(mean(x^2) + eps), over the last axis (transformers' Qwen3VLTextRMSNorm)."""
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1], np.int64)], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(eps))])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.weight(name, weight)], out=out)


def rotate_half(g: GraphBuilder, x: str, hd: int) -> str:
    """cat(-x2, x1) over the last axis: channel j pairs with j + hd/2."""
    x1, x2 = g.op("Split", [x, g.const([hd // 2, hd // 2], np.int64)], n_out=2, axis=-1)
    return g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, hd: int) -> str:
    """x * cos + rotate_half(x) * sin."""  # x (B, n, S, hd), cos/sin (B, 1, S, hd)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotate_half(g, x, hd), sin])])


def build_mask(g: GraphBuilder, attention_mask: str, embeds: str) -> str:
    """Additive mask (B, 1, S, T): 0 where query i (absolute P+i) may see key j, else float32 min."""
    s = g.op("Gather", [g.op("Shape", [embeds]), g.const(1, np.int64)])  # S
    t = g.op("Gather", [g.op("Shape", [attention_mask]), g.const(1, np.int64)])  # T = P + S
    past = g.op("Sub", [t, s])
    q_pos = g.op("Add", [g.op("Range", [g.const(0, np.int64), s, g.const(1, np.int64)]), past])  # (S,)
    k_pos = g.op("Range", [g.const(0, np.int64), t, g.const(1, np.int64)])  # (T,)
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const([0], np.int64)]),
                                  g.op("Unsqueeze", [q_pos, g.const([1], np.int64)])])  # (S, T)
    keep = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2], np.int64)])], to=9)  # (B, 1, 1, T) bool
    allowed = g.op("And", [causal, keep])  # (B, 1, S, T)
    return g.op("Where", [allowed, g.const(np.float32(0.0)), g.const(np.float32(NEG_INF))], out="attention_bias")


def build_mrope(g: GraphBuilder, position_ids: str, text: TextConfig) -> tuple[str, str]:
    """cos, sin (B, 1, S, hd) from position ids (3, B, S), with interleaved MRoPE channels."""
    pos = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=FLOAT), g.const([-1], np.int64)])  # (3, B, S, 1)
    table = g.const(mrope_inv_freq_by_axis(text)[:, None, None, :])  # (3, 1, 1, hd/2)
    # each channel takes its own axis' position; the other two rows contribute exact zeros
    freqs = g.op("ReduceSum", [g.op("Mul", [pos, table]), g.const([0], np.int64)], keepdims=0)  # (B, S, hd/2)
    emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.const([1], np.int64)])  # (B, 1, S, hd)
    return g.op("Cos", [emb], out="rope_cos"), g.op("Sin", [emb], out="rope_sin")


def attention(g: GraphBuilder, x: str, i: int, cfg: TextConfig, weights: Weights, cos: str, sin: str,
              mask: str, with_attentions: bool) -> str:
    """Grouped-query self-attention with q/k RMSNorm, MRoPE and the KV cache (concat: past + new)."""
    nh, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    p = f"{PREFIX}.layers.{i}.self_attn"
    heads = g.const([0, 0, -1, hd], np.int64)  # (B, S, n*hd) -> (B, S, n, hd)
    q = g.op("Reshape", [linear(g, x, weights, f"{p}.q_proj.weight"), heads])
    k = g.op("Reshape", [linear(g, x, weights, f"{p}.k_proj.weight"), heads])
    v = g.op("Reshape", [linear(g, x, weights, f"{p}.v_proj.weight"), heads])
    q = rms_norm(g, q, weights(f"{p}.q_norm.weight"), f"{p}.q_norm.weight", cfg.rms_norm_eps)  # per head
    k = rms_norm(g, k, weights(f"{p}.k_norm.weight"), f"{p}.k_norm.weight", cfg.rms_norm_eps)
    q = g.op("Transpose", [q], perm=[0, 2, 1, 3])  # (B, nh, S, hd)
    k = g.op("Transpose", [k], perm=[0, 2, 1, 3])  # (B, kv, S, hd)
    v = g.op("Transpose", [v], perm=[0, 2, 1, 3])  # (B, kv, S, hd)
    q, k = apply_rope(g, q, cos, sin, hd), apply_rope(g, k, cos, sin, hd)
    k = g.op("Concat", [past_names(i)[0], k], axis=2, out=present_names(i)[0])  # (B, kv, T, hd)
    v = g.op("Concat", [past_names(i)[1], v], axis=2, out=present_names(i)[1])
    # GQA without copying K/V: query heads h = kv_head * rep + r share kv_head (transformers' repeat_kv)
    q_grouped = g.op("Reshape", [q, g.const([0, kv, -1, hd], np.int64)])  # (B, kv, rep*S, hd)
    scores = g.op("MatMul", [q_grouped, g.op("Transpose", [k], perm=[0, 1, 3, 2])])  # (B, kv, rep*S, T)
    scores = g.op("Reshape", [scores, g.const([0, nh, -1, 0], np.int64)], allowzero=0)  # (B, nh, S, T)
    scores = g.op("Add", [g.op("Mul", [scores, g.const(np.float32(hd**-0.5))]), mask])
    probs = g.op("Softmax", [scores], axis=-1, out=attention_name(i) if with_attentions else None)
    ctx = g.op("MatMul", [g.op("Reshape", [probs, g.const([0, kv, -1, 0], np.int64)]), v])  # (B, kv, rep*S, hd)
    ctx = g.op("Reshape", [ctx, g.const([0, nh, -1, hd], np.int64)])  # (B, nh, S, hd)
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, nh * hd], np.int64)])
    return linear(g, ctx, weights, f"{p}.o_proj.weight", out=f"layers.{i}.attn_out")  # (B, S, H)


def mlp(g: GraphBuilder, x: str, i: int, weights: Weights) -> str:
    """down(silu(gate(x)) * up(x))."""
    p = f"{PREFIX}.layers.{i}.mlp"
    gate = linear(g, x, weights, f"{p}.gate_proj.weight")
    up = linear(g, x, weights, f"{p}.up_proj.weight")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return linear(g, act, weights, f"{p}.down_proj.weight", out=f"layers.{i}.mlp_out")


def decoder_layer(g: GraphBuilder, x: str, i: int, cfg: TextConfig, weights: Weights, cos: str, sin: str,
                  mask: str, with_attentions: bool) -> str:
    p = f"{PREFIX}.layers.{i}"
    h = rms_norm(g, x, weights(f"{p}.input_layernorm.weight"), f"{p}.input_layernorm.weight", cfg.rms_norm_eps)
    x = g.op("Add", [x, attention(g, h, i, cfg, weights, cos, sin, mask, with_attentions)], out=f"layers.{i}.attn_residual")
    h = rms_norm(g, x, weights(f"{p}.post_attention_layernorm.weight"), f"{p}.post_attention_layernorm.weight", cfg.rms_norm_eps)
    return g.op("Add", [x, mlp(g, h, i, weights)])


def lm_head_weight(cfg: ModelConfig, weights: Weights, names: set[str] | None = None) -> np.ndarray:
    """(V, H): lm_head.weight, or the input embedding when the checkpoint ties them."""
    if cfg.tie_word_embeddings or (names is not None and "lm_head.weight" not in names):
        return weights(f"{PREFIX}.embed_tokens.weight")
    return weights("lm_head.weight")


def build_decoder(cfg: ModelConfig, weights: Weights, data_path, *, with_attentions: bool = False,
                  lm_head: np.ndarray | None = None, progress=None) -> GraphBuilder:
    """The whole decoder graph. `progress` (a tqdm bar, optional) is advanced once per layer."""
    text = cfg.text
    g = GraphBuilder("qwen3vl_text_decoder", data_path)
    B, S, T, P = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
    x = g.input(INPUTS_EMBEDS, FLOAT, [B, S, text.hidden_size])
    position_ids = g.input(POSITION_IDS, INT64, [3, B, S])
    attention_mask = g.input(ATTENTION_MASK, INT64, [B, T])
    for i in range(text.num_hidden_layers):
        for name in past_names(i):
            g.input(name, FLOAT, [B, text.num_key_value_heads, P, text.head_dim])
    deepstack = None
    if cfg.num_deepstack:
        # optional: a runtime that never feeds it (onnxruntime-genai) gets zeros, i.e. a text-only prompt's value
        zeros = np.zeros((cfg.num_deepstack, 1, 1, text.hidden_size), np.float32)  # broadcasts over (B, S)
        deepstack = g.optional_input(DEEPSTACK_EMBEDS, zeros, [cfg.num_deepstack, B, S, text.hidden_size])
    keep = g.optional_input(LOGITS_TO_KEEP[0], np.array(0, np.int64), [])  # default 0: all positions

    with g.scope("model"):
        mask = build_mask(g, attention_mask, x)
        cos, sin = build_mrope(g, position_ids, text)
        for i in range(text.num_hidden_layers):
            with g.scope(f"layers.{i}"):
                x = decoder_layer(g, x, i, text, weights, cos, sin, mask, with_attentions)
                if deepstack is not None and i < cfg.num_deepstack:
                    # DeepStack: ViT features added to the residual stream at visual positions (zeros elsewhere)
                    x = g.op("Add", [x, g.op("Gather", [deepstack, g.const(i, np.int64)], axis=0)])
                x = g.op("Identity", [x], out=f"layers.{i}.hidden")
            if progress is not None:
                progress.update(1)
        x = rms_norm(g, x, weights(f"{PREFIX}.norm.weight"), f"{PREFIX}.norm.weight", text.rms_norm_eps, out="final_norm")
        # keep only the last `logits_to_keep` positions (0 keeps all): prefill needs just the last one
        start = g.op("Neg", [g.op("Unsqueeze", [keep, g.const([0], np.int64)])])
        x = g.op("Slice", [x, start, g.const([np.iinfo(np.int64).max], np.int64), g.const([1], np.int64)])
    head = lm_head if lm_head is not None else lm_head_weight(cfg, weights)
    w = g.weight("lm_head.weight", np.ascontiguousarray(head.T))  # (H, V)
    with g.scope("lm_head"):
        logits = g.op("MatMul", [x, w], out=LOGITS)
    g.output(logits, FLOAT, [B, "logits_length", text.vocab_size])
    for i in range(text.num_hidden_layers):
        for name in present_names(i):
            g.output(name, FLOAT, [B, text.num_key_value_heads, T, text.head_dim])
    if with_attentions:
        for i in range(text.num_hidden_layers):
            g.output(attention_name(i), FLOAT, [B, text.num_attention_heads, S, T])
    return g


def build_embedding(cfg: ModelConfig, weights: Weights, data_path) -> GraphBuilder:
    """input_ids (B, S) int64 -> inputs_embeds (B, S, H): one Gather from the embedding table."""
    g = GraphBuilder("qwen3vl_embedding", data_path)
    ids = g.input(INPUT_IDS, INT64, ["batch_size", "sequence_length"])
    table = g.weight(f"{PREFIX}.embed_tokens.weight", weights(f"{PREFIX}.embed_tokens.weight"))  # (V, H)
    with g.scope("model/embed_tokens"):
        out = g.op("Gather", [table, ids], axis=0, out=INPUTS_EMBEDS)
    g.output(out, FLOAT, ["batch_size", "sequence_length", cfg.text.hidden_size])
    return g
