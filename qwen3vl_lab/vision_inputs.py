"""The grid-dependent inputs of the Qwen3-VL vision encoder, computed on the host in numpy.

Everything here depends only on `grid_thw` (and a few config numbers), never on pixels, so the
ONNX vision graph takes these arrays as inputs:

    interp_indices, interp_weights  (N, 4)   bilinear resampling of the learned 48x48 position table
    position_ids                    (N, 2)   (row, col) of each patch, for the 2-D rotary
    cos, sin                        (N, hd)  the vision rotary, layout [row | col | row | col]
    cu_seqlens                      (S+1,)   attention segment boundaries (one per temporal patch)

All per-patch arrays follow pixel_values' merge-block row order. transformers' versions live in
`transformers/vision_utils.py` and `Qwen3VLVisionRotaryEmbedding`; tests/test_vision_inputs.py
checks each one against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import VisionConfig
from .errors import UserError
from .image import patch_positions


def _grids(grid_thw) -> np.ndarray:
    """One (t, h, w) row or an (n, 3) array -> (n, 3) int64, checked."""
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if len(g) == 0 or (g <= 0).any():
        raise UserError(f"grid_thw {g.tolist()} must hold positive (t, h, w) rows; use image_grid_thw from preprocess()")
    return g


def _check_mergeable(g: np.ndarray, merge_size: int) -> None:
    if (g[:, 1:] % merge_size).any():
        raise UserError(f"grid_thw {g.tolist()}: h and w must be multiples of merge_size {merge_size}")


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis, align_corners=True: index in 0..size-1 -> source in 0..side-1.

    Returns (i0, i1, w0, w1), all (N,). Float32 arithmetic in transformers' order, so bit-identical.
    """
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))  # = linspace(0, side-1, size)[index]
    floor = np.floor(src)
    frac = src - floor  # distance to the lower tap
    w0 = np.maximum(np.float32(1) - np.abs(frac - np.float32(0)), np.float32(0))
    w1 = np.maximum(np.float32(1) - np.abs(frac - np.float32(1)), np.float32(0))
    i0 = floor.astype(np.int64)
    i1 = np.minimum(i0 + 1, side - 1)  # the last row/col has no neighbour: clamp (its weight is 0 there)
    return i0, i1, w0, w1


def interpolation_indices_and_weights(
    grid_thw, num_grid_per_side: int = 48, merge_size: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling of the learned (48 x 48) position table to each patch grid.

    Returns indices (N, 4) int64 into the flat table and weights (N, 4) float32; the position
    embedding of patch i is `sum_k weights[i, k] * pos_embed[indices[i, k]]`. Tap order:
    (r0, c0), (r0, c1), (r1, c0), (r1, c1). Rows in merge-block order, repeated t times.
    Equal to transformers' `get_vision_interpolation_indices_and_weights(mode="bilinear",
    align_corners=True)`.
    """
    g = _grids(grid_thw)
    _check_mergeable(g, merge_size)
    side = num_grid_per_side
    all_idx, all_w = [], []
    for grid in g:
        t, h, w = grid.tolist()
        pos = patch_positions(grid, merge_size)  # (t*h*w, 2) (row, col) in merge-block order
        r0, r1, wr0, wr1 = _axis_taps(pos[:, 0], h, side)  # (N,) each
        c0, c1, wc0, wc1 = _axis_taps(pos[:, 1], w, side)
        all_idx.append(np.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], axis=1))  # (N, 4)
        all_w.append(np.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], axis=1))  # (N, 4) float32
    return np.concatenate(all_idx).astype(np.int64), np.concatenate(all_w).astype(np.float32)


def rotary_position_ids(grid_thw, merge_size: int = 2) -> np.ndarray:
    """(row, col) of every patch in merge-block order -> (N, 2) int64 (= get_vision_position_ids).

    The vision rotary rotates by the patch's row and column inside its own image; a video repeats
    the frame grid for each temporal patch.
    """
    g = _grids(grid_thw)
    _check_mergeable(g, merge_size)
    return patch_positions(g, merge_size)


def rotary_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """The hd/4 inverse frequencies shared by the row and the column: theta^(-k / (hd/2)), k = 0, 2, ..."""
    spatial_dim = head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)  # (hd/4,)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)  # correctly rounded, like torch
    return np.float32(1.0) / power  # (hd/4,) float32


def rotary_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """2-D ("axial") vision rotary -> cos, sin (N, head_dim) float32.

    Angles: [row * inv_freq | col * inv_freq] (hd/2), repeated twice to hd, because the rotation
    pairs channel j with j + hd/2 (rotate_half). Computed like Qwen3VLVisionRotaryEmbedding.
    """
    if head_dim % 4:
        raise UserError(f"vision head_dim {head_dim} must be a multiple of 4 for the 2-D rotary")
    pos = np.asarray(position_ids).astype(np.float32)  # (N, 2)
    freqs = pos[:, :, None] * rotary_inv_freq(head_dim, theta)  # (N, 2, hd/4) float32
    angles = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # (N, hd/2): [row | col]
    angles = np.concatenate([angles, angles], axis=-1)  # (N, hd)
    angles64 = angles.astype(np.float64)  # float32 angles; cos/sin correctly rounded back to float32
    return np.cos(angles64).astype(np.float32), np.sin(angles64).astype(np.float32)


def cu_seqlens(grid_thw) -> np.ndarray:
    """Attention segment boundaries -> (n_segments + 1,) int64: one segment of h*w patches per
    temporal patch (so a t = 2 video is 2 segments). Patches attend only inside their segment."""
    g = _grids(grid_thw)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])  # (n_segments,)
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)


def num_patches(grid_thw) -> np.ndarray:
    """Rows of pixel_values per image/video: t*h*w -> (n,) int64."""
    g = _grids(grid_thw)
    return g.prod(axis=1)


def num_merged_tokens(grid_thw, merge_size: int = 2) -> np.ndarray:
    """LLM tokens (<|image_pad|> count) per image/video: t*h*w / merge^2 -> (n,) int64."""
    return num_patches(grid_thw) // merge_size**2


@dataclass
class VisionGridInputs:
    """Everything the vision forward needs besides pixel_values and weights, for a set of grids."""

    interp_indices: np.ndarray  # (N, 4) int64
    interp_weights: np.ndarray  # (N, 4) float32
    position_ids: np.ndarray  # (N, 2) int64
    cos: np.ndarray  # (N, head_dim) float32
    sin: np.ndarray  # (N, head_dim) float32
    cu_seqlens: np.ndarray  # (n_segments + 1,) int64


def build_vision_inputs(grid_thw, config: VisionConfig | None = None) -> VisionGridInputs:
    """All grid-dependent vision inputs for `grid_thw` (one row or (n, 3)) and a VisionConfig."""
    config = config or VisionConfig()
    m = config.spatial_merge_size
    indices, weights = interpolation_indices_and_weights(grid_thw, config.num_grid_per_side, m)
    pos = rotary_position_ids(grid_thw, m)
    cos, sin = rotary_cos_sin(pos, config.head_dim, config.rope_theta)
    return VisionGridInputs(indices, weights, pos, cos, sin, cu_seqlens(grid_thw))
