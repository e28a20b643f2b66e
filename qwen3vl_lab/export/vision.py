"""The Qwen3-VL vision tower as an ONNX graph, written op by op from the checkpoint's weights.

One call encodes ONE image (or one temporal patch of a video): full, non-causal attention over all
N patches of the call. Read this file top to bottom to follow the patches to the LLM tokens:

    patch embed   pixel_values @ W.T + b  (the Conv3d with stride = kernel, as a MatMul)   (N, D)
    pos embed     bilinear mix of 4 rows of the learned 48x48 table (host-computed taps)  (N, D)
    block i       x = x + attn(ln1(x), 2-D rotary);  x = x + mlp(ln2(x))   (tanh GELU)    (N, D)
    deepstack j   after block deepstack_visual_indexes[j]: 2x2 concat -> LN(4D) -> MLP     (N/4, out)
    merger        LN(D) -> 2x2 concat -> MLP (erf GELU)                                   (N/4, out)

Inputs  pixel_values (N, C*T*P*P) f32, pos_interp_indices (N, 4) i64, pos_interp_weights (N, 4) f32,
        rotary_cos (N, hd) f32, rotary_sin (N, hd) f32
Outputs image_features (N/4, out_hidden), deepstack_features (num_deepstack, N/4, out_hidden)

The grid-dependent inputs come from the numpy functions of `qwen3vl_lab/vision_inputs.py`
(see `qwen3vl_lab/vision.py: vision_feeds`). Rows of every (N, .) tensor are in pixel_values'
merge-block order, so the 4 patches of one LLM token are 4 consecutive rows and the 2x2 merge is
a plain Reshape. Only standard ai.onnx ops; every intermediate can be tapped by name
(`vision.patch_embed`, `vision.blocks.{i}.attn_out`, `vision.blocks.{i}.output`,
`vision.deepstack.{j}`, ...). This follows transformers' `Qwen3VLVisionModel` exactly.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig, VisionConfig
from ..layout import (
    DEEPSTACK_FEATURES,
    IMAGE_FEATURES,
    PIXEL_VALUES,
    POS_INDICES,
    POS_WEIGHTS,
    ROTARY_COS,
    ROTARY_SIN,
    VISION_FILE,
)
from .decoder import Weights, apply_rope, linear
from .onnx_graph import FLOAT, INT64, GraphBuilder

PREFIX = "model.visual"
LAYER_NORM_EPS = 1e-6  # every LayerNorm of the vision tower (blocks and mergers); not in config.json

# graph I/O names: defined in layout.py (vision.py feeds them), also written to genai_config.json
# by vision_genai_section
INPUT_NAMES = (PIXEL_VALUES, POS_INDICES, POS_WEIGHTS, ROTARY_COS, ROTARY_SIN)


def linear_bias(g: GraphBuilder, x: str, weights: Weights, name: str, out: str | None = None) -> str:
    """x @ W.T + b for an HF Linear `name` (without the `.weight` suffix)."""
    y = linear(g, x, weights, f"{name}.weight")
    return g.op("Add", [y, g.weight(f"{name}.bias", weights(f"{name}.bias"))], out=out)


def layer_norm(g: GraphBuilder, x: str, weights: Weights, name: str, out: str | None = None) -> str:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (nn.LayerNorm, biased var)."""
    axes = g.const([-1], np.int64)
    centered = g.op("Sub", [x, g.op("ReduceMean", [x, axes], keepdims=1)])
    var = g.op("ReduceMean", [g.op("Mul", [centered, centered]), axes], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(LAYER_NORM_EPS))])])])
    y = g.op("Mul", [g.op("Mul", [centered, inv]), g.weight(f"{name}.weight", weights(f"{name}.weight"))])
    return g.op("Add", [y, g.weight(f"{name}.bias", weights(f"{name}.bias"))], out=out)


def gelu_tanh(g: GraphBuilder, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): `gelu_pytorch_tanh`, the ViT MLP's activation."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.const(np.float32(0.044715))])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(np.float32(math.sqrt(2.0 / math.pi)))])])
    return g.op("Mul", [g.op("Mul", [x, g.const(np.float32(0.5))]), g.op("Add", [t, g.const(np.float32(1.0))])])


def gelu_erf(g: GraphBuilder, x: str) -> str:
    """0.5 x (1 + erf(x / sqrt 2)): exact `nn.GELU()`, the mergers' activation."""
    e = g.op("Erf", [g.op("Mul", [x, g.const(np.float32(1.0 / math.sqrt(2.0)))])])
    return g.op("Mul", [g.op("Mul", [x, g.const(np.float32(0.5))]), g.op("Add", [e, g.const(np.float32(1.0))])])


def patch_embed(g: GraphBuilder, pixels: str, vis: VisionConfig, weights: Weights) -> str:
    """Conv3d(C, D, kernel = stride = (T, P, P)) on one (C, T, P, P) patch per row = MatMul + bias."""
    w = weights(f"{PREFIX}.patch_embed.proj.weight").reshape(vis.hidden_size, -1)  # (D, C*T*P*P)
    x = g.op("MatMul", [pixels, g.weight(f"{PREFIX}.patch_embed.proj.weight", np.ascontiguousarray(w.T))])
    b = g.weight(f"{PREFIX}.patch_embed.proj.bias", weights(f"{PREFIX}.patch_embed.proj.bias"))
    return g.op("Add", [x, b], out="vision.patch_embed")  # (N, D)


def pos_embed(g: GraphBuilder, indices: str, interp_weights: str, weights: Weights) -> str:
    """sum_k weights[:, k] * table[indices[:, k]]: bilinear resampling of the 48x48 learned table."""
    table = g.weight(f"{PREFIX}.pos_embed.weight", weights(f"{PREFIX}.pos_embed.weight"))  # (48*48, D)
    taps = g.op("Gather", [table, indices], axis=0)  # (N, 4, D)
    w = g.op("Unsqueeze", [interp_weights, g.const([-1], np.int64)])  # (N, 4, 1)
    return g.op("ReduceSum", [g.op("Mul", [taps, w]), g.const([1], np.int64)], keepdims=0, out="vision.pos_embed")


def attention(g: GraphBuilder, x: str, i: int, vis: VisionConfig, weights: Weights, cos: str, sin: str) -> str:
    """Full (non-causal) multi-head self-attention over the call's N patches, 2-D rotary on q and k."""
    nh, hd, d = vis.num_heads, vis.head_dim, vis.hidden_size
    p = f"{PREFIX}.blocks.{i}.attn"
    qkv = linear_bias(g, x, weights, f"{p}.qkv")  # (N, 3D): columns [q all heads | k | v]
    heads = g.const([0, nh, hd], np.int64)  # (N, D) -> (N, nh, hd)
    q, k, v = (g.op("Reshape", [t, heads]) for t in g.op("Split", [qkv, g.const([d, d, d], np.int64)], n_out=3, axis=-1))
    q, k = apply_rope(g, q, cos, sin, hd), apply_rope(g, k, cos, sin, hd)  # cos/sin (N, 1, hd)
    q = g.op("Transpose", [q], perm=[1, 0, 2])  # (nh, N, hd)
    k_t = g.op("Transpose", [k], perm=[1, 2, 0])  # (nh, hd, N)
    v = g.op("Transpose", [v], perm=[1, 0, 2])  # (nh, N, hd)
    scores = g.op("Mul", [g.op("MatMul", [q, k_t]), g.const(np.float32(hd**-0.5))])  # (nh, N, N)
    probs = g.op("Softmax", [scores], axis=-1, out=f"vision.blocks.{i}.attn_probs")
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[1, 0, 2])  # (N, nh, hd)
    ctx = g.op("Reshape", [ctx, g.const([0, d], np.int64)])  # (N, D)
    return linear_bias(g, ctx, weights, f"{p}.proj", out=f"vision.blocks.{i}.attn_out")


def mlp(g: GraphBuilder, x: str, i: int, weights: Weights) -> str:
    """fc2(gelu_tanh(fc1(x))), with biases."""
    p = f"{PREFIX}.blocks.{i}.mlp"
    h = gelu_tanh(g, linear_bias(g, x, weights, f"{p}.linear_fc1"))  # (N, I)
    return linear_bias(g, h, weights, f"{p}.linear_fc2", out=f"vision.blocks.{i}.mlp_out")  # (N, D)


def vision_block(g: GraphBuilder, x: str, i: int, vis: VisionConfig, weights: Weights, cos: str, sin: str) -> str:
    p = f"{PREFIX}.blocks.{i}"
    h = layer_norm(g, x, weights, f"{p}.norm1")
    x = g.op("Add", [x, attention(g, h, i, vis, weights, cos, sin)], out=f"vision.blocks.{i}.attn_residual")
    h = layer_norm(g, x, weights, f"{p}.norm2")
    return g.op("Add", [x, mlp(g, h, i, weights)], out=f"vision.blocks.{i}.output")  # (N, D)


def patch_merger(g: GraphBuilder, x: str, vis: VisionConfig, weights: Weights, name: str,
                 postshuffle_norm: bool, out: str) -> str:
    """Concatenate each token's 4 consecutive patch rows to 4D, then fc2(gelu_erf(fc1(.))).

    The final `merger` normalizes each patch over D BEFORE the concat; the DeepStack mergers
    normalize over 4D AFTER it.
    """
    merged = g.const([-1, vis.hidden_size * vis.spatial_merge_size**2], np.int64)
    if postshuffle_norm:
        h = layer_norm(g, g.op("Reshape", [x, merged]), weights, f"{name}.norm")  # (N/4, 4D)
    else:
        h = g.op("Reshape", [layer_norm(g, x, weights, f"{name}.norm"), merged])  # (N, D) -> (N/4, 4D)
    h = gelu_erf(g, linear_bias(g, h, weights, f"{name}.linear_fc1"))  # (N/4, 4D)
    return linear_bias(g, h, weights, f"{name}.linear_fc2", out=out)  # (N/4, out_hidden)


def build_vision(cfg: ModelConfig, weights: Weights, data_path, progress=None) -> GraphBuilder:
    """The vision graph for one image / one temporal patch per call. `progress` (tqdm, optional)
    is advanced once per block."""
    vis = cfg.vision
    g = GraphBuilder("qwen3vl_vision", data_path)
    N = "num_patches"
    pixels = g.input(PIXEL_VALUES, FLOAT, [N, vis.patch_dim])
    indices = g.input(POS_INDICES, INT64, [N, 4])
    interp_weights = g.input(POS_WEIGHTS, FLOAT, [N, 4])
    cos_in = g.input(ROTARY_COS, FLOAT, [N, vis.head_dim])
    sin_in = g.input(ROTARY_SIN, FLOAT, [N, vis.head_dim])
    ds_index = {layer: j for j, layer in reversed(list(enumerate(vis.deepstack_visual_indexes)))}  # first j wins, like .index()
    deepstack: list[str] = []

    with g.scope("visual"):
        x = g.op("Add", [patch_embed(g, pixels, vis, weights), pos_embed(g, indices, interp_weights, weights)],
                 out="vision.embeddings")  # (N, D)
        cos = g.op("Unsqueeze", [cos_in, g.const([1], np.int64)])  # (N, 1, hd): broadcast over heads
        sin = g.op("Unsqueeze", [sin_in, g.const([1], np.int64)])
        for i in range(vis.depth):
            with g.scope(f"blocks.{i}"):
                x = vision_block(g, x, i, vis, weights, cos, sin)
            if i in ds_index:  # transformers appends in block order, merger picked by list position
                j = ds_index[i]
                with g.scope(f"deepstack_merger_list.{j}"):
                    deepstack.append(patch_merger(g, x, vis, weights, f"{PREFIX}.deepstack_merger_list.{j}",
                                                  postshuffle_norm=True, out=f"vision.deepstack.{j}"))
            if progress is not None:
                progress.update(1)
        with g.scope("merger"):
            patch_merger(g, x, vis, weights, f"{PREFIX}.merger", postshuffle_norm=False, out=IMAGE_FEATURES)
        if deepstack:
            axis0 = g.const([0], np.int64)
            g.op("Concat", [g.op("Unsqueeze", [d, axis0]) for d in deepstack], axis=0, out=DEEPSTACK_FEATURES)

    T = "num_merged_tokens"
    g.output(IMAGE_FEATURES, FLOAT, [T, vis.out_hidden_size])
    if deepstack:
        g.output(DEEPSTACK_FEATURES, FLOAT, [len(deepstack), T, vis.out_hidden_size])
    return g


def vision_genai_section(cfg: ModelConfig) -> dict:
    """The `model.vision` section of genai_config.json (onnxruntime-genai's layout, plus our extra
    inputs and the DeepStack output)."""
    vis = cfg.vision
    ds = cfg.num_deepstack > 0  # the graph has no DeepStack output when the tower has none
    return {
        "filename": VISION_FILE,
        "config_filename": "preprocessor_config.json",
        "spatial_merge_size": vis.spatial_merge_size,
        "patch_size": vis.patch_size,
        "temporal_patch_size": vis.temporal_patch_size,
        "num_position_embeddings": vis.num_position_embeddings,
        "head_size": vis.head_dim,
        "rope_theta": vis.rope_theta,
        "num_deepstack": cfg.num_deepstack,
        "inputs": {
            "pixel_values": PIXEL_VALUES,
            "pos_interp_indices": POS_INDICES,
            "pos_interp_weights": POS_WEIGHTS,
            "rotary_cos": ROTARY_COS,
            "rotary_sin": ROTARY_SIN,
        },
        "outputs": {"image_features": IMAGE_FEATURES, **({"deepstack_features": DEEPSTACK_FEATURES} if ds else {})},
        "deepstack_output": DEEPSTACK_FEATURES if ds else None,
    }
