"""Notebook 08's exercise: move an outlier channel out of the activations without changing the model.

    from qwen3vl_lab.apps.lessons import repair as lesson
    lesson.check_equalise(my_equalise)    # where it differs from the reference, with a hint
    lesson.equalise                       # the reference solution (read it after trying)

An RMSNorm output x = rms(h) * g feeds MatMuls y = x @ W (W: (K, N), one row per input channel). Dividing
channel k of g by s_k and multiplying row k of every W that reads x by s_k computes the same y exactly in real
numbers (x_k / s_k * s_k W_k), and with s_k a power of two, exactly in floating point too — while the
activation that int8 / 4-bit rounding sees no longer carries the outlier (SmoothQuant's and AWQ's per-channel
scale folded into the op before, arXiv:2211.10438 section 4).
"""

from __future__ import annotations

import numpy as np

RMS_EPS = 1e-6


# -- the reference solution ------------------------------------------------------------------------
def equalise(norm_weight: np.ndarray, weights: list[np.ndarray], scale: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """norm_weight (K,), the MatMul weights reading the norm [(K, N_i)], per-channel scale (K,) ->
    (norm_weight / scale, [W * scale per row])."""
    return norm_weight / scale, [w * scale[:, None] for w in weights]


def outlier_scale(norm_weight: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """A power-of-two scale per channel bringing each channel's largest |x| to at most 2x the median channel's."""
    x = np.abs(rms_norm(hidden, norm_weight)).reshape(-1, norm_weight.size).max(axis=0)  # (K,)
    ratio = np.maximum(x / np.median(x), 1.0)
    return np.exp2(np.maximum(np.floor(np.log2(ratio)), 0.0)).astype(np.float32)  # 1 where there is no outlier


def rms_norm(h: np.ndarray, weight: np.ndarray) -> np.ndarray:
    h = np.asarray(h, np.float64)
    return h / np.sqrt((h * h).mean(axis=-1, keepdims=True) + RMS_EPS) * weight


# -- the check ---------------------------------------------------------------------------------------
def _case(seed: int = 8):
    """A norm with channel 5 x 512 (Qwen-style massive activation), q/k/v-like weights reading it."""
    rng = np.random.default_rng(seed)
    K = 64
    g = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    g[5] *= 512.0
    weights = [(rng.standard_normal((K, n)) / np.sqrt(K)).astype(np.float32) for n in (64, 32, 32)]
    hidden = rng.standard_normal((12, K)).astype(np.float32)  # (tokens, K)
    return g, weights, hidden


def check_equalise(student_fn) -> bool:
    """Run `student_fn(norm_weight, weights, scale)` on a norm with one outlier channel: the MatMul outputs must be
    unchanged and the outlier gone from the activations. Raises AssertionError naming what differs, with a hint;
    returns False (and says so) while the exercise still raises NotImplementedError."""
    g, weights, hidden = _case()
    s = outlier_scale(g, hidden)
    try:
        new_g, new_w = student_fn(g.copy(), [w.copy() for w in weights], s.copy())
    except NotImplementedError:
        print("equalise: not written yet -- replace `raise NotImplementedError` with your code and run the cell again")
        return False
    if len(new_w) != len(weights) or any(np.shape(a) != b.shape for a, b in zip(new_w, weights)):
        raise AssertionError(f"equalise: expected {len(weights)} weights of shapes {[w.shape for w in weights]}, got "
                             f"{[np.shape(w) for w in new_w]}\nhint: scale the rows of each W (K, N): one per input channel")
    x, new_x = rms_norm(hidden, g), rms_norm(hidden, np.asarray(new_g))
    for i, (w, nw) in enumerate(zip(weights, new_w)):
        want, got = x @ w, new_x @ np.asarray(nw, np.float64)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        if err > 1e-5:
            raise AssertionError(f"equalise: MatMul {i}'s output changed (relative error {err:.3g}; the reference "
                                 "changes nothing)\nhint: what you divide out of the norm weight's channel k must "
                                 "come back in row k of every W that reads it")
    ratio = lambda a: float(np.abs(a).max(axis=0).max() / np.median(np.abs(a).max(axis=0)))  # noqa: E731
    if ratio(new_x) > 4.0:
        raise AssertionError(f"equalise: the activations still carry the outlier ({ratio(new_x):.0f}x the median "
                             f"channel; before {ratio(x):.0f}x)\nhint: divide the norm weight by the scale")
    print(f"equalise: correct -- the MatMul outputs are unchanged and the largest channel went from {ratio(x):.0f}x "
          f"to {ratio(new_x):.1f}x the median")
    return True


__all__ = ["check_equalise", "equalise", "outlier_scale", "rms_norm"]
