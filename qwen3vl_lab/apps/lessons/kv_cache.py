"""Notebook 03's exercises: the cache update, and one new token's attention over the cache (with GQA).

    from qwen3vl_lab.apps.lessons import kv_cache as lesson
    lesson.check_update_cache(my_update)        # where it differs, with a hint
    lesson.check_attend_one(my_attend)
    lesson.update_cache, lesson.attend_one      # the reference solutions

update_cache(past_k, past_v, k_new, v_new) -> (k, v): past (B, kv_heads, T, hd) and the new token's (B, kv_heads, 1, hd)
-> the cache one position longer, (B, kv_heads, T + 1, hd), the new token last; the past arrays left as they were
(the decoder's `present.*` outputs are exactly this).
attend_one(q, k, v) -> (B, heads, 1, hd): the new token's queries (B, heads, 1, hd) over the whole cache
(B, kv_heads, T, hd); query head i reads key/value head i // (heads / kv_heads) (grouped-query attention);
softmax(q k^T / sqrt(hd)) v. No mask is needed: the cache holds only earlier tokens and the token itself.
The checks' oracles: numpy's concatenate for the update; for attention, an explicit loop over heads and
positions with Python's math (no matrix products), written for the check.
"""

from __future__ import annotations

import math

import numpy as np

from .grading import first_difference, graded, mismatch


# -- the reference solutions -----------------------------------------------------------------------
def update_cache(past_k: np.ndarray, past_v: np.ndarray, k_new: np.ndarray, v_new: np.ndarray):
    """(B, kv, T, hd) + (B, kv, 1, hd) -> two new (B, kv, T + 1, hd) arrays (the old ones untouched)."""
    return np.concatenate([past_k, k_new], axis=2), np.concatenate([past_v, v_new], axis=2)


def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q (B, H, 1, hd) over k, v (B, KV, T, hd) -> (B, H, 1, hd); query head i uses kv head i // (H / KV)."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (B, H, T, hd): kv head j serves query heads j*group .. j*group + group-1
    v = np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])  # (B, H, 1, T)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return p @ v  # (B, H, 1, hd)


# -- oracles ---------------------------------------------------------------------------------------
def _attend_loop(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    B, H, _, hd = q.shape
    KV, T = k.shape[1], k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for h in range(H):
            j = h // (H // KV)
            s = [sum(float(q[b, h, 0, d]) * float(k[b, j, t, d]) for d in range(hd)) / math.sqrt(hd) for t in range(T)]
            top = max(s)
            e = [math.exp(x - top) for x in s]
            for d in range(hd):
                out[b, h, 0, d] = sum(e[t] * float(v[b, j, t, d]) for t in range(T)) / sum(e)
    return out


def _arrays(B: int, KV: int, T: int, hd: int, seed: int, heads: int | None = None):
    rng = np.random.default_rng(seed)
    past_k, past_v = rng.normal(size=(2, B, KV, T, hd)).astype(np.float32)
    k_new, v_new = rng.normal(size=(2, B, KV, 1, hd)).astype(np.float32)
    q = rng.normal(size=(B, heads or KV, 1, hd)).astype(np.float32)
    return q, past_k, past_v, k_new, v_new


# -- the update ------------------------------------------------------------------------------------
def _update_hint(got: np.ndarray, past: np.ndarray, new: np.ndarray) -> str:
    if got.shape == (past.shape[0], past.shape[1] + 1, *past.shape[2:]):
        return "that grew the head axis (1); the sequence axis of (B, kv_heads, T, hd) is axis 2"
    if got.shape == (*past.shape[:3], past.shape[3] + 1):
        return "that grew head_dim (axis 3); the sequence axis of (B, kv_heads, T, hd) is axis 2"
    if got.shape != (*past.shape[:2], past.shape[2] + 1, past.shape[3]):
        return "the result is (B, kv_heads, T + 1, hd): the past with the new token appended along axis 2"
    if np.array_equal(got, np.concatenate([new, past], axis=2)):
        return "the new token goes last (position T), after the cached ones: concatenate [past, new], not [new, past]"
    return "append, don't change: positions 0 .. T-1 are the past exactly, position T the new token"


def _run_update(student_fn) -> None:
    for B, KV, T, hd, seed in ((1, 2, 5, 4, 0), (2, 3, 1, 8, 1), (1, 1, 0, 4, 2)):
        _, past_k, past_v, k_new, v_new = _arrays(B, KV, T, hd, seed)
        kept = past_k.copy(), past_v.copy()
        where = f"past (B, kv, T, hd) = {(B, KV, T, hd)}"
        try:
            got = student_fn(past_k, past_v, k_new, v_new)
        except ValueError as e:  # numpy refusing the shapes, e.g. a concatenate along the wrong axis
            raise mismatch(where, f"ValueError: {e}", "(k, v) of shape (B, kv_heads, T + 1, hd)",
                           "the arrays agree on every axis but the sequence one: concatenate along axis 2") from e
        if not (isinstance(got, tuple) and len(got) == 2):
            raise mismatch(f"{where}: return value", type(got).__name__, "a pair (k, v)", "return both arrays: (k, v)")
        if not (np.array_equal(past_k, kept[0]) and np.array_equal(past_v, kept[1])):
            raise mismatch(f"{where}: the past arrays after your call", "changed", "unchanged",
                           "leave the cache you were given as it was (notebook 03 goes back to it): build new arrays")
        for name, g, past, new in (("k", got[0], past_k, k_new), ("v", got[1], past_v, v_new)):
            want = np.concatenate([past, new], axis=2)
            g = np.asarray(g)
            if g.shape != want.shape:
                raise mismatch(f"{where}: {name}.shape", g.shape, want.shape, _update_hint(g, past, new))
            i = first_difference(g, want)
            if i is not None:
                pos = np.unravel_index(i, want.shape)[2]
                raise mismatch(f"{where}: {name} at position {pos}", g[:, :, pos], want[:, :, pos], _update_hint(g, past, new))


def check_update_cache(student_fn) -> bool:
    """student_fn(past_k, past_v, k_new, v_new) -> (k, v), each (B, kv_heads, T + 1, hd)."""
    return graded("update_cache", student_fn, _run_update)


# -- attention of the new token --------------------------------------------------------------------
def _attend_hint(got: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> str:
    group = q.shape[1] // k.shape[1]
    tiled = attend_one(q, np.tile(k, (1, group, 1, 1))[:, : q.shape[1]], np.tile(v, (1, group, 1, 1))[:, : q.shape[1]])
    if got.shape == tiled.shape and np.allclose(got, tiled, atol=1e-5):
        return (f"query head i reads kv head i // {group} (np.repeat along axis 1), not i % {k.shape[1]} (np.tile): "
                "neighbouring query heads share one key/value head")
    unscaled = attend_one(q * math.sqrt(q.shape[-1]), k, v)
    if got.shape == unscaled.shape and np.allclose(got, unscaled, atol=1e-5):
        return f"divide the scores by sqrt(head_dim) = {math.sqrt(q.shape[-1]):.3g} before the softmax"
    return ("scores = q . k / sqrt(hd) over the T cached positions, softmax over those T, then the weighted sum of "
            "the values; query head i uses kv head i // (heads / kv_heads)")


def _run_attend(student_fn) -> None:
    for B, H, KV, T, hd, seed in ((1, 2, 2, 4, 4, 3), (1, 4, 2, 6, 4, 4), (2, 6, 2, 3, 8, 5)):
        q, k, v, _, _ = _arrays(B, KV, T, hd, seed, heads=H)
        where = f"{H} query heads, {KV} kv heads, T = {T}"
        want = _attend_loop(q, k, v)
        try:
            got = np.asarray(student_fn(q.copy(), k.copy(), v.copy()))
        except ValueError as e:  # numpy refusing the shapes, e.g. (B, 4, 1, hd) @ (B, 2, hd, T)
            raise mismatch(where, f"ValueError: {e}", f"an array of shape {want.shape}",
                           f"{H} query heads but {KV} key/value heads: repeat each kv head {H // KV} times along axis 1 "
                           "(np.repeat) before q @ k^T") from e
        if got.shape != want.shape:
            raise mismatch(f"{where}: shape", got.shape, want.shape,
                           "one output per query head: (B, heads, 1, hd), like q" if got.shape[1:2] != (H,)
                           else _attend_hint(got, q, k, v))
        i = first_difference(got, want, atol=1e-4)
        if i is not None:
            head = np.unravel_index(i, want.shape)[1]
            raise mismatch(f"{where}: query head {head}", got[:, head], want[:, head], _attend_hint(got, q, k, v))


def check_attend_one(student_fn) -> bool:
    """student_fn(q (B, H, 1, hd), k (B, KV, T, hd), v (B, KV, T, hd)) -> (B, H, 1, hd)."""
    return graded("attend_one", student_fn, _run_attend)


__all__ = ["attend_one", "check_attend_one", "check_update_cache", "update_cache"]
