"""Run the exported vision graph: pixel patches -> LLM image tokens + DeepStack features.

The graph (`qwen3vl_lab/export/vision.py`) encodes ONE image, or one temporal patch of a video,
per call: attention spans the whole call. transformers attends within one segment per temporal
patch of each image (`cu_seqlens`), so running the graph once per image and
once per temporal patch, then concatenating in order, gives the same features:

    for each (t, h, w) in image_grid_thw:          rows t*h*w of pixel_values
        for each temporal patch 0..t-1:            rows h*w, grid (1, h, w)
            feeds = vision_feeds(rows, (1, h, w))  host numpy: pos-embed taps, rotary cos/sin
            image_features (h*w/4, H), deepstack (D, h*w/4, H) = session.run(feeds)
    concatenate along the token axis

The grid-dependent feeds are computed by the visible numpy functions of `vision_inputs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, VisionConfig
from .errors import UserError
from .layout import DEEPSTACK_FEATURES, IMAGE_FEATURES, PIXEL_VALUES, POS_INDICES, POS_WEIGHTS, ROTARY_COS, ROTARY_SIN
from .limits import check_image_memory
from .vision_inputs import interpolation_indices_and_weights, rotary_cos_sin, rotary_position_ids


@dataclass
class VisionFeatures:
    """What the decoder needs from the vision tower, for all images/videos of a prompt, in order."""

    image_features: np.ndarray  # (n_tokens, H) float32: row k replaces the k-th <|image_pad|>/<|video_pad|>
    deepstack: np.ndarray  # (D, n_tokens, H) float32: added after LLM layer j at the same positions
    grid_thw: np.ndarray  # (n, 3) int64

    @property
    def n_tokens(self) -> int:
        return int(self.image_features.shape[0])


def _vision_config(cfg: ModelConfig | VisionConfig) -> VisionConfig:
    return cfg.vision if isinstance(cfg, ModelConfig) else cfg


def _grid_row(grid_thw_row) -> tuple[int, int, int]:
    g = np.asarray(grid_thw_row, dtype=np.int64).reshape(-1)
    if g.shape != (3,) or (g <= 0).any():
        raise UserError(f"grid_thw row {g.tolist()} must be three positive numbers (t, h, w)")
    return int(g[0]), int(g[1]), int(g[2])


def vision_feeds(pixel_values: np.ndarray, grid_thw_row, cfg: ModelConfig | VisionConfig) -> dict[str, np.ndarray]:
    """The five inputs of one vision call: one image, or one temporal patch (grid (1, h, w)).

    pixel_values (h*w, C*T*P*P) float32 in merge-block row order (as `image.preprocess` makes them).
    """
    vis = _vision_config(cfg)
    t, h, w = _grid_row(grid_thw_row)
    if t != 1:
        raise UserError(f"vision_feeds takes one temporal patch (t = 1), got grid {[t, h, w]}; "
                        "use encode_image, which splits videos into one call per temporal patch")
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if pixel_values.shape != (h * w, vis.patch_dim):
        raise UserError(f"pixel_values has shape {tuple(pixel_values.shape)}, but grid {[t, h, w]} needs "
                        f"({h * w}, {vis.patch_dim}); pass the rows of this image from preprocess()")
    indices, weights = interpolation_indices_and_weights((1, h, w), vis.num_grid_per_side, vis.spatial_merge_size)
    cos, sin = rotary_cos_sin(rotary_position_ids((1, h, w), vis.spatial_merge_size), vis.head_dim, vis.rope_theta)
    return {
        PIXEL_VALUES: pixel_values,  # (N, C*T*P*P)
        POS_INDICES: indices,  # (N, 4) int64
        POS_WEIGHTS: weights,  # (N, 4) float32
        ROTARY_COS: cos,  # (N, hd)
        ROTARY_SIN: sin,  # (N, hd)
    }


def encode_image(session, pixel_values: np.ndarray, image_grid_thw, cfg: ModelConfig | VisionConfig) -> VisionFeatures:
    """Run the vision session once per image and once per temporal patch of a video; concatenate.

    `session` is an `onnxruntime.InferenceSession` of qwen3vl-vision.onnx (the caller owns it).
    pixel_values (N_total, C*T*P*P) and image_grid_thw (n, 3) as returned by `image.preprocess`.
    """
    vis = _vision_config(cfg)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if len(grids) == 0:
        raise UserError("image_grid_thw is empty: there is no image to encode; pass the grids from preprocess()")
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    total = int(grids.prod(axis=1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape[0] != total:
        raise UserError(f"pixel_values has shape {tuple(pixel_values.shape)}, but image_grid_thw "
                        f"{grids.tolist()} needs {total} rows; pass both from the same preprocess() call")
    outputs = [o.name for o in session.get_outputs()]
    has_deepstack = DEEPSTACK_FEATURES in outputs
    wanted = [IMAGE_FEATURES] + ([DEEPSTACK_FEATURES] if has_deepstack else [])
    feats, stacks = [], []
    start = 0
    for t, h, w in grids.tolist():
        check_image_memory(h * vis.patch_size, w * vis.patch_size, vis.num_heads, vis.patch_size)  # refuse, not OOM
        for _ in range(t):  # one call per temporal patch: exactly transformers' per-segment attention
            rows = pixel_values[start:start + h * w]
            start += h * w
            res = session.run(wanted, vision_feeds(rows, (1, h, w), vis))
            feats.append(res[0])  # (h*w/4, H)
            if has_deepstack:
                stacks.append(res[1])  # (D, h*w/4, H)
    image_features = np.concatenate(feats, axis=0)
    if has_deepstack:
        deepstack = np.concatenate(stacks, axis=1)
    else:
        deepstack = np.zeros((0, *image_features.shape), np.float32)
    return VisionFeatures(image_features=image_features, deepstack=deepstack, grid_thw=grids)
