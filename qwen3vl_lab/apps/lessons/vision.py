"""Notebook 04's exercise: which row of `pixel_values` holds patch (r, c) of the image, and which image token it
becomes -- the patch-merge arithmetic, checked against the pixels themselves.

    from qwen3vl_lab.apps.lessons import vision as lesson
    lesson.check_patch_row(my_patch_row)     # where it differs, with a hint
    lesson.patch_row                         # the reference solution (read it after trying)

The image (H, W) is cut into 16 x 16 patches, a grid of h = H/16 rows and w = W/16 columns; the merger turns
each 2 x 2 block of patches into one image token. `pixel_values` does not list the patches row by row: it
lists them block by block (the 4 patches of token k are rows 4k .. 4k+3), the order the merger consumes.
The check's oracle is the picture: patch (r, c) is the 16 x 16 square cut out of the normalized image at
pixel (16 r, 16 c), and the student's row of `pixel_values` (made by the real preprocessing,
`image.patchify`, bit-identical to transformers) must hold exactly those pixels.
"""

from __future__ import annotations

import numpy as np

from ...image import ImageProcessorConfig, patchify, rescale_and_normalize
from .grading import graded, mismatch

PATCH = 16
MERGE = 2


# -- the reference solution ------------------------------------------------------------------------
def patch_row(r: int, c: int, grid_w: int) -> int:
    """Row of pixel_values holding patch (r, c) of an image whose patch grid is grid_w patches wide."""
    token = (r // MERGE) * (grid_w // MERGE) + c // MERGE  # the image token: blocks in reading order
    inside = (r % MERGE) * MERGE + c % MERGE  # 0..3 within the block: top-left, top-right, bottom-left, bottom-right
    return token * MERGE * MERGE + inside


def image_token(r: int, c: int, grid_w: int) -> int:
    """Which image token (0, 1, ... among the <|image_pad|>s) patch (r, c) ends up in."""
    return patch_row(r, c, grid_w) // (MERGE * MERGE)


# -- the oracle: the pixels ------------------------------------------------------------------------
def _image(grid_h: int, grid_w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random (3, H, W) normalized image and its pixel_values (the real patchify)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (grid_h * PATCH, grid_w * PATCH, 3), dtype=np.uint8)
    chw = rescale_and_normalize(rgb, ImageProcessorConfig())  # (3, H, W)
    return chw, patchify(chw)  # (3, H, W), (h * w, 1536)


def _patch(chw: np.ndarray, r: int, c: int) -> np.ndarray:
    """The 16 x 16 square at patch (r, c), as pixel_values holds it: (C, T=2, P, P) flattened to 1536."""
    square = chw[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]  # (3, 16, 16)
    return np.stack([square, square], axis=1).reshape(-1)  # a still image fills both frames


def _hint(got: int, r: int, c: int, w: int) -> str:
    if got == r * w + c:
        return ("that is reading order, patch by patch; pixel_values goes block by block: the 4 patches of one "
                "2 x 2 block (one image token) are 4 consecutive rows")
    if got == ((r // MERGE) * (w // MERGE) + c // MERGE) * 4 + (c % MERGE) * MERGE + r % MERGE:
        return "the right block, but inside it the order is row-major: top-left, top-right, bottom-left, bottom-right"
    if got == (r // MERGE) * (w // MERGE) + c // MERGE:
        return "that is the image token's index; each token has 4 rows: token k's patches are rows 4k .. 4k+3"
    if got == ((c // MERGE) * (w // MERGE) + r // MERGE) * 4 + (r % MERGE) * MERGE + c % MERGE:
        return "rows and columns are swapped: blocks go left to right along a row of blocks, then down"
    return "first find the 2 x 2 block (r // 2, c // 2) and its index in reading order, then the patch's place in it"


def _run_cases(student_fn) -> None:
    for (h, w), seed in (((6, 6), 0), ((4, 8), 1), ((8, 2), 2)):  # 96 x 96 (the shapes scenes), 64 x 128, 128 x 32
        chw, pixel_values = _image(h, w, seed)
        for r in range(h):
            for c in range(w):
                got = int(student_fn(r, c, w))
                want = int(np.flatnonzero((pixel_values == _patch(chw, r, c)).all(axis=1))[0])
                if got != want:
                    raise mismatch(f"patch (r={r}, c={c}) of a {h} x {w} patch grid: row", got, want,
                                   _hint(got, r, c, w))


def check_patch_row(student_fn) -> bool:
    """student_fn(r, c, grid_w) -> row of pixel_values; checked against the pixels of three images."""
    return graded("patch_row", student_fn, _run_cases)


__all__ = ["check_patch_row", "image_token", "patch_row"]
