"""Notebook 02's exercise: transformers' `get_rope_index` for one image, written by hand.

    from qwen3vl_lab.apps.lessons import mrope as lesson
    lesson.check_rope_index_one_image(my_fn)    # where it differs, with a hint
    lesson.rope_index_one_image                 # the reference solution

rope_index_one_image(n_before, grid_thw, n_after, merge=2) -> (3, S) int64, rows t, h, w, for the prompt
`n_before` text tokens, then one image of `grid_thw = (1, h, w)` patches (h/merge x w/merge tokens, row-major),
then `n_after` text tokens. S = n_before + h*w/merge**2 + n_after.
The check's oracle: `qwen3vl_lab.positions.build_positions` on the same prompt written as token ids (the function
tests/test_positions.py compares with transformers' `get_rope_index`), never the reference solution below.
"""

from __future__ import annotations

import numpy as np

from ...config import IMAGE_TOKEN_ID
from ...positions import build_positions
from .grading import graded, mismatch

TEXT_ID = 872  # any non-image token: the oracle only tells <|image_pad|> from the rest


# -- the reference solution ------------------------------------------------------------------------
def rope_index_one_image(n_before: int, grid_thw, n_after: int, merge: int = 2) -> np.ndarray:
    """Text (p, p, p); image cell (r, c) at (s, s + r, s + c); text after it from s + max(rows, cols)."""
    _, h, w = (int(v) for v in grid_thw)
    rows, cols = h // merge, w // merge
    before = np.arange(n_before)  # (n_before,)
    s = n_before  # the image starts where the text stopped
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols) each
    image = np.stack([np.full(rows * cols, s), s + r.reshape(-1), s + c.reshape(-1)])  # (3, rows*cols)
    after = s + max(rows, cols) + np.arange(n_after)  # NOT s + rows*cols: a big image does not push text away
    text = lambda p: np.stack([p, p, p])  # noqa: E731 (three equal rows)
    return np.concatenate([text(before), image, text(after)], axis=1).astype(np.int64)  # (3, S)


# -- the oracle and the hints ----------------------------------------------------------------------
def oracle(n_before: int, grid_thw, n_after: int, merge: int = 2) -> np.ndarray:
    """build_positions on the prompt as ids: n_before text ids, the image's <|image_pad|> run, n_after text ids."""
    _, h, w = (int(v) for v in grid_thw)
    ids = [TEXT_ID] * n_before + [IMAGE_TOKEN_ID] * (h * w // merge**2) + [TEXT_ID] * n_after
    grid = np.array([[1, h, w]], np.int64)
    return build_positions(np.array([ids]), grid, spatial_merge_size=merge).position_ids[:, 0]  # (3, S)


CASES = (  # (n_before, grid_thw, n_after): wide, tall, square, the 02 notebook's photo, nothing before
    (3, (1, 4, 6), 5),
    (5, (1, 8, 4), 3),
    (2, (1, 6, 6), 4),
    (4, (1, 16, 20), 6),
    (0, (1, 2, 2), 2),
)


def _hint(got: np.ndarray, want: np.ndarray, n_before: int, grid_thw, merge: int) -> str:
    _, h, w = grid_thw
    rows, cols = h // merge, w // merge
    image = slice(n_before, n_before + rows * cols)
    s = n_before
    if not np.array_equal(got[:, :n_before], want[:, :n_before]):
        return "text before the image counts 0, 1, 2, ... on all three rows (t = h = w = p)"
    if not (got[0, image] == s).all():
        return f"every image token has the same t: the image's start s = {s} (the index of its first token)"
    if np.array_equal(got[1:, image], want[2:0:-1, image]):
        return "h and w are swapped: h follows the row (index // columns), w the column (index % columns)"
    if not np.array_equal(got[1:, image], want[1:, image]):
        return (f"the image has {rows} x {cols} tokens (the {h} x {w} patch grid merged {merge} x {merge}), in reading "
                f"order: token k is cell (k // {cols}, k % {cols}) at (s, s + row, s + col)")
    if got.shape[1] > image.stop and got[0, image.stop] == s + rows * cols:
        return (f"the text after the image continues at s + max(rows, cols) = {s + max(rows, cols)}, not at s + the "
                f"number of image tokens ({s + rows * cols}): a big image does not push the text far away")
    return "after the image, text continues one by one from s + max(rows, cols), the same number on all three rows"


def _run(student_fn) -> None:
    for n_before, grid, n_after in CASES:
        where = f"{n_before} text tokens, an image of grid_thw {list(grid)}, {n_after} text tokens"
        want = oracle(n_before, grid, n_after)
        got = np.asarray(student_fn(n_before, grid, n_after))
        if got.shape != want.shape:
            raise mismatch(f"{where}: shape", got.shape, want.shape,
                           "return (3, S): rows t, h, w; S = text before + h*w/4 image tokens + text after")
        bad = np.argwhere(got != want)
        if bad.size:
            axis, token = (int(v) for v in bad[0])
            raise mismatch(f"{where}: row {'thw'[axis]}, token {token}", got[:, token], want[:, token],
                           _hint(got, want, n_before, grid, 2))


def check_rope_index_one_image(student_fn) -> bool:
    """student_fn(n_before, grid_thw, n_after) -> (3, S) positions; True when every case matches."""
    return graded("rope_index_one_image", student_fn, _run)


__all__ = ["CASES", "check_rope_index_one_image", "oracle", "rope_index_one_image"]
