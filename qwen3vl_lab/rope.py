"""The text decoder's rotary frequencies: interleaved MRoPE, in numpy.

    mrope_inv_freq_by_axis(text)   (3, hd/2): which axis (T, H, W) rotates channel j, and how fast
    rope_cache(text, length)       cos, sin (length, hd/2): the tables the fused decoder reads

Both decoders use the same numbers: `export/decoder.py` bakes `mrope_inv_freq_by_axis` into
model.onnx as a constant, `fast.py` feeds `rope_cache` to model-fast.onnx, and `viz/positions.py`
plots them. The math lives here, on the runtime side, so none of them has to import another.
"""

from __future__ import annotations

import numpy as np

from .config import TextConfig


def mrope_inv_freq_by_axis(text: TextConfig) -> np.ndarray:
    """(3, hd/2) float32: row a holds inv_freq[j] where channel j rotates with axis a (T, H, W), else 0.

    Interleaved MRoPE: channel j uses H if j % 3 == 1 and j < 3*section[1],
    W if j % 3 == 2 and j < 3*section[2], T otherwise.
    """
    half = text.head_dim // 2
    exponent = np.arange(0, text.head_dim, 2, dtype=np.float32) / np.float32(text.head_dim)  # (hd/2,)
    power = (np.float64(text.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)  # rounded like torch
    inv_freq = np.float32(1.0) / power  # theta^(-2j/hd), bit-equal to transformers' inv_freq
    axis = np.zeros(half, dtype=np.int64)  # 0 = T
    j = np.arange(half)
    axis[(j % 3 == 1) & (j < 3 * text.mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * text.mrope_section[2])] = 2
    table = np.zeros((3, half), dtype=np.float32)
    table[axis, j] = inv_freq
    return table


def rope_cache(text: TextConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (length, hd/2) float32: angle p * inv_freq[j] for positions p = 0..length-1.

    MRotaryEmbedding picks, for channel j, the row of the position on j's axis (T, H or W), so one
    1-D table serves all three axes; inv_freq is the one `export/decoder.py` uses (bit-equal to
    transformers')."""
    inv_freq = mrope_inv_freq_by_axis(text).sum(axis=0)  # (hd/2,): each channel has one axis' value
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]  # (length, hd/2), fp32 like torch
    return np.cos(angles), np.sin(angles)
