"""Qwen3-VL's 3-D (t, h, w) text positions: transformers' `get_rope_index` in numpy.

Every token gets three position numbers, one per MRoPE axis:
- a text token at running position p gets (p, p, p);
- an image starting at s gets (s, s + r, s + c) for its merged cell (r, c), and the next token
  continues at s + max(h, w) / 2, not at s + number of image tokens;
- a video is one such block per temporal patch (the frames are separated by timestamp text).

`rope_deltas = max position + 1 - number of tokens` (negative with images) lets decode steps
continue without re-reading the prompt: the k-th new token sits at `prompt_len + k + delta`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .config import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from .errors import UserError

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values


@dataclass
class Positions:
    position_ids: np.ndarray  # (3, B, S) int64: rows t, h, w; padding slots hold 0
    rope_deltas: np.ndarray  # (B, 1) int64: max position + 1 - number of real tokens


def mm_token_type_ids(
    input_ids: np.ndarray, image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID
) -> np.ndarray:
    """0 for text (incl. <|vision_start|>/<|vision_end|> and timestamps), 1 for <|image_pad|>, 2 for <|video_pad|>."""
    ids = np.asarray(input_ids)
    types = np.zeros(ids.shape, dtype=np.int64)  # (B, S)
    types[ids == image_token_id] = IMAGE
    types[ids == video_token_id] = VIDEO
    return types


def token_groups(types: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal token type in one row -> [(type, start, end), ...] (end exclusive)."""
    groups, start = [], 0
    for key, run in itertools.groupby(types.tolist()):
        n = len(list(run))
        groups.append((key, start, start + n))
        start += n
    return groups


def text_block_positions(start: int, length: int) -> np.ndarray:
    """`length` text tokens from `start` -> (3, length): the same p on all three axes."""
    p = np.arange(length, dtype=np.int64) + start
    return np.stack([p, p, p])  # (3, L)


def vision_block_positions(start: int, grid_thw, merge_size: int = 2) -> np.ndarray:
    """One image (or one video frame pair) starting at `start` -> (3, t * h/m * w/m).

    Merged cell (r, c), row-major like the merger's output, gets (start + t_idx, start + r, start + c).
    """
    t, h, w = (int(v) for v in grid_thw)
    tt, rr, cc = np.meshgrid(np.arange(t), np.arange(h // merge_size), np.arange(w // merge_size), indexing="ij")
    return np.stack([tt.reshape(-1), rr.reshape(-1), cc.reshape(-1)]).astype(np.int64) + start  # (3, n)


def split_video_grids(video_grid_thw) -> np.ndarray:
    """(n, 3) video grids -> one (1, h, w) row per temporal patch: each frame pair is its own block."""
    g = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    g = np.repeat(g, g[:, 0], axis=0)
    g[:, 0] = 1
    return g


def _row_positions(types: np.ndarray, grids: dict, counters: dict, merge_size: int, row: int) -> np.ndarray:
    """3-D positions of one row's real tokens -> (3, L). Consumes grids in order across the batch."""
    chunks, current = [], 0
    for kind, start, end in token_groups(types):
        if kind == TEXT:
            chunks.append(text_block_positions(current, end - start))
            current += end - start
            continue
        name = "image" if kind == IMAGE else "video"
        k = counters[kind]
        if k >= len(grids[kind]):
            raise UserError(
                f"row {row} has more {name} placeholder runs than {name}_grid_thw rows ({len(grids[kind])}); "
                f"pass one grid per {name} (one per frame pair for video)"
            )
        grid = grids[kind][k]
        counters[kind] += 1
        block = vision_block_positions(current, grid, merge_size)
        if block.shape[1] != end - start:
            raise UserError(
                f"row {row}: {name} #{k} has {end - start} placeholder tokens but grid {grid.tolist()} needs "
                f"{block.shape[1]}; expand each placeholder to t*h*w/{merge_size**2} tokens between "
                "<|vision_start|> and <|vision_end|>"
            )
        chunks.append(block)
        current += max(int(grid[1]), int(grid[2])) // merge_size  # next token: start + max(h, w)/2
    return np.concatenate(chunks, axis=1)  # (3, L)


def build_positions(
    input_ids: np.ndarray,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    spatial_merge_size: int = 2,
) -> Positions:
    """Prefill positions (3, B, S) and rope_deltas (B, 1), equal to transformers' `get_rope_index`.

    With an attention_mask only attended tokens are numbered (from 0, per row) and padding slots
    get 0, so a left-padded row gets the same positions as the unpadded prompt.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise UserError(f"input_ids has shape {ids.shape}; expected (batch, seq_len)")
    types = mm_token_type_ids(ids, image_token_id, video_token_id)  # (B, S)
    grids = {
        IMAGE: np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3),
        VIDEO: np.zeros((0, 3), np.int64) if video_grid_thw is None else split_video_grids(video_grid_thw),
    }
    mask = np.ones(ids.shape, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise UserError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}; they must match")
    batch, seq = ids.shape
    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    counters = {IMAGE: 0, VIDEO: 0}
    for b in range(batch):
        if not mask[b].any():
            raise UserError(f"row {b} of attention_mask has no 1s; every row needs at least one real token")
        pos = _row_positions(types[b][mask[b]], grids, counters, spatial_merge_size, b)  # (3, L_b)
        position_ids[:, b, mask[b]] = pos
        deltas[b, 0] = pos.max() + 1 - pos.shape[1]
    for kind, name in ((IMAGE, "image_grid_thw"), (VIDEO, "video_grid_thw")):
        if counters[kind] != len(grids[kind]):
            raise UserError(
                f"{name} describes {len(grids[kind])} blocks (a video: one per temporal patch) but input_ids has "
                f"{counters[kind]} placeholder runs; pass one grid per image/video in the prompt"
            )
    return Positions(position_ids, deltas)


def next_positions(
    attention_mask: np.ndarray | None, rope_deltas: np.ndarray, n_new: int = 1, *, cache_len: int | None = None
) -> np.ndarray:
    """Positions of the next `n_new` tokens after a prefill -> (3, B, n_new) int64, same on all axes.

    With the full attention_mask (B, past + n_new): `cumsum(mask) - 1 + delta` at the last n_new
    columns (what transformers' model computes; `generate()`'s "last position + 1" gives the same
    for left padding). Without a mask: `cache_len + arange(n_new) + delta`.
    """
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)  # (B, 1)
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(np.int64)
        if mask.ndim != 2 or mask.shape[1] < n_new:
            raise UserError(f"attention_mask has shape {mask.shape}; expected (batch, past + n_new) with n_new={n_new}")
        pos = np.cumsum(mask, axis=-1) - 1  # (B, total)
        pos[mask == 0] = 0
        pos = pos[:, -n_new:]  # (B, n_new)
    else:
        if cache_len is None:
            raise UserError("next_positions needs attention_mask or cache_len (the number of tokens already in the cache)")
        pos = np.arange(cache_len, cache_len + n_new, dtype=np.int64)[None, :]  # (1, n_new)
    batch = pos.shape[0] if attention_mask is not None else deltas.shape[0]
    if batch % deltas.shape[0]:
        raise UserError(f"rope_deltas has {deltas.shape[0]} rows for a batch of {batch}; pass one delta per row")
    deltas = np.repeat(deltas, batch // deltas.shape[0], axis=0)  # beam-style expansion, like transformers
    out = pos + deltas  # (B, n_new)
    return np.broadcast_to(out[None], (3, *out.shape)).copy()  # (3, B, n_new)


def mrope_channel_axes(mrope_section, head_dim: int) -> np.ndarray:
    """Which axis ('T', 'H' or 'W') drives each of the head_dim/2 rotary frequency channels.

    Interleaved rule: channel j is H if j % 3 == 1 and j < 3 * section[1], W if
    j % 3 == 2 and j < 3 * section[2], else T. Channel j + head_dim/2 repeats channel j.
    [24, 20, 20], head_dim 128 -> 'THWTHW...THWTTTT'.
    """
    section = [int(s) for s in mrope_section]
    if len(section) != 3 or 2 * sum(section) != head_dim:
        raise UserError(f"mrope_section {section} must have 3 entries summing to head_dim/2 = {head_dim // 2}")
    axes = np.full(head_dim // 2, "T", dtype="<U1")
    j = np.arange(head_dim // 2)
    axes[(j % 3 == 1) & (j < 3 * section[1])] = "H"
    axes[(j % 3 == 2) & (j < 3 * section[2])] = "W"
    return axes
