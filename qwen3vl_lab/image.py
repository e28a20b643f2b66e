"""Image preprocessing for Qwen3-VL, identical to transformers' `Qwen2VLImageProcessorPil`.

Pipeline, one image at a time:

    load_image      any input -> RGB uint8 (H, W, 3)          (alpha composited on white)
    smart_resize    pick (H', W'): multiples of 32, pixel count within [min_pixels, max_pixels]
    resize_image    PIL bicubic on uint8 -> (H', W', 3)
    rescale_and_normalize   x / 255, then (x - 0.5) / 0.5  -> float32 (3, H', W')
    patchify        (3, H', W') -> (H'/16 * W'/16, 1536) rows in merge-block order

`preprocess` chains them for a list of images and returns `pixel_values (N_total, 1536)` float32
and `image_grid_thw (n, 3)` int64, bit-identical to transformers (tests/test_image.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .jsonfile import read_json
from .limits import check_pixels
from .paths import existing_file

MAX_ASPECT_RATIO = 200  # transformers refuses images longer than 200:1


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing numbers of a Qwen3-VL checkpoint (`preprocessor_config.json`).

    The defaults are the Qwen3-VL 2B/4B/8B values, not transformers' class defaults (patch 14,
    CLIP mean/std), which describe Qwen2-VL.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # size.shortest_edge: 256 * 256 (at least 64 LLM tokens)
    max_pixels: int = 16777216  # size.longest_edge: 4096 * 4096 (at most 16384 LLM tokens)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)  # 3

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged 2x2 block of 16-pixel patches = 32."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Columns of pixel_values: C * T * P * P = 3 * 2 * 16 * 16 = 1536."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """Read a `preprocessor_config.json` dict (5.x `size.shortest_edge/longest_edge`, or legacy
        `min_pixels/max_pixels`, which win like in transformers' `__init__`). Missing keys keep the
        Qwen3-VL defaults."""
        base = cls()
        kind = d.get("image_processor_type", "Qwen2VLImageProcessor")
        if "Qwen" not in str(kind):
            raise UserError(
                f"preprocessor_config.json is for {kind}, not Qwen3-VL's Qwen2VLImageProcessor; pass a Qwen3-VL checkpoint"
            )
        size = d.get("size") or {}
        if not isinstance(size, dict):
            raise UserError(f"preprocessor_config.json 'size' is {size!r}; expected a dict with shortest_edge/longest_edge")
        min_pixels = size.get("shortest_edge", size.get("min_pixels", base.min_pixels))
        max_pixels = size.get("longest_edge", size.get("max_pixels", base.max_pixels))
        if d.get("min_pixels") is not None:
            min_pixels = d["min_pixels"]
        if d.get("max_pixels") is not None:
            max_pixels = d["max_pixels"]
        cfg = cls(
            patch_size=int(d.get("patch_size", base.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(d.get("merge_size", base.merge_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=_three(d.get("image_mean", base.image_mean), "image_mean"),
            image_std=_three(d.get("image_std", base.image_std), "image_std"),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            resample=int(d.get("resample", base.resample)),
        )
        if min(cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.min_pixels) <= 0:
            raise UserError("preprocessor_config.json has a non-positive patch_size/merge_size/min_pixels; fix the file")
        if cfg.min_pixels > cfg.max_pixels:
            raise UserError(f"min_pixels {cfg.min_pixels} > max_pixels {cfg.max_pixels}; fix preprocessor_config.json")
        if cfg.resample not in [int(r) for r in Image.Resampling]:
            raise UserError(f"resample {cfg.resample} is not a PIL filter (0-5); use 3 (BICUBIC)")
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ImageProcessorConfig":
        """Read `<model_dir>/preprocessor_config.json`."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise UserError(f"{model_dir} has no preprocessor_config.json; pass the folder of a Qwen3-VL checkpoint")
        return cls.from_dict(read_json(path, fix="restore the checkpoint's preprocessor_config.json"))


def _three(v, name: str) -> tuple[float, float, float]:
    """A mean/std given as one number or three numbers -> 3 floats."""
    vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
    if len(vals) != 3:
        raise UserError(f"preprocessor_config.json {name} has {len(vals)} values; expected 1 or 3 (RGB)")
    return tuple(vals)


# ----------------------------------------------------------------------------- loading
def load_image(x) -> np.ndarray:
    """Any image input -> RGB uint8 array (H, W, 3), the way transformers converts it.

    Accepts a path (str / Path; EXIF orientation applied like transformers' `load_image`), a PIL
    image, or a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4): uint8, or integer-valued
    numbers in 0..255, or floats in [0, 1] (scaled by 255 and truncated, like `to_pil_image`).
    Transparency is composited onto white. 16-bit PIL images go through PIL's `convert("RGB")`,
    which saturates values above 255 (transformers does exactly this).
    """
    if isinstance(x, (str, Path)):
        x = _open_image_file(Path(x))
    if isinstance(x, Image.Image):
        return _pil_to_rgb(x)
    if isinstance(x, np.ndarray):
        return _array_to_rgb(x)
    raise UserError(f"cannot use a {type(x).__name__} as an image; pass a file path, a PIL image or a numpy array")


def native_size(x) -> tuple[int, int] | None:
    """(height, width) of an image as `load_image` will see it, without decoding its pixels (a file's
    header only, EXIF rotation applied); None when it cannot be told (the loader then names the problem)."""
    try:
        if isinstance(x, (str, Path)):
            with Image.open(x) as img:
                width, height = img.size
                rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
            return (width, height) if rotated else (height, width)
        if isinstance(x, Image.Image):
            return x.height, x.width
        if isinstance(x, np.ndarray) and x.ndim >= 2:
            return int(x.shape[0]), int(x.shape[1])
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
        return None
    return None


def _open_image_file(path: Path) -> Image.Image:
    """Open and decode an image file (one-line UserError when missing or unreadable)."""
    existing_file(path, "image file", fix="pass the path of a PNG/JPEG/... file (check the path)")
    try:
        img = Image.open(path)
        img.load()  # decode now, so truncated files fail here
        return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path} is not a readable image ({type(e).__name__}: {e}); pass a PNG/JPEG/WebP/... file") from None


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8, as transformers' `convert_to_rgb` (image_transforms.py l.759)."""
    if img.width == 0 or img.height == 0:
        raise UserError(f"image has zero size ({img.height}x{img.width}); pass a non-empty image")
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    try:
        if has_alpha:  # P with transparency, LA, RGBA, PA: composite onto opaque white
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:  # L, P, I;16, I, F, CMYK, YCbCr, 1: PIL's own conversion (16-bit saturates at 255)
            rgb = img.convert("RGB")
        return np.array(rgb)  # (H, W, 3) uint8
    except (OSError, ValueError) as e:  # a lazily opened, truncated file fails only here
        raise UserError(f"cannot decode the {img.mode} image ({e}); re-save it as PNG/JPEG") from None


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """numpy (H, W[, C]) -> (H, W, 3) uint8, as transformers' numpy path (convert_to_rgb, to_pil_image)."""
    if a.ndim == 2:
        a = a[:, :, None]  # grayscale (H, W) -> (H, W, 1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise UserError(f"image array has shape {a.shape}; expected channels-last (H, W), (H, W, 3) or (H, W, 4)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise UserError(f"image array has zero size {a.shape}; pass a non-empty image")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise UserError(f"image array has dtype {a.dtype}; pass uint8 (0..255) or float (0..1)")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise UserError("image array contains NaN or infinity; pass finite values (uint8 0..255 or float 0..1)")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)  # gray -> RGB
    elif a.shape[-1] == 4:
        a = _composite_on_white(a)
    return _to_uint8(a)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) -> (H, W, 3): alpha * rgb + (1 - alpha) * white, same dtype (image_transforms.py l.799-807)."""
    is_int = np.issubdtype(rgba.dtype, np.integer)
    if not is_int and (rgba.min() < 0.0 or rgba.max() > 1.0):
        raise UserError("float RGBA image has values outside [0, 1]; scale it to [0, 1] or pass uint8")
    white = 255 if is_int else 1.0
    alpha = rgba[..., 3:4] / white  # (H, W, 1)
    composite = alpha * rgba[..., :3] + (1 - alpha) * white  # (H, W, 3)
    return np.round(composite).astype(rgba.dtype) if is_int else composite.astype(rgba.dtype)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Integer-valued 0..255 -> cast; floats in [0, 1] -> x * 255 truncated (transformers' to_pil_image)."""
    if a.dtype == np.uint8:
        return a
    if np.allclose(a, a.astype(np.int64)):
        if a.min() < 0 or a.max() > 255:
            raise UserError(
                f"image array values span [{a.min()}, {a.max()}], outside 0..255 (16-bit?); "
                "convert to uint8 first, e.g. (a // 257).astype(np.uint8)"
            )
        return a.astype(np.uint8)
    if a.min() >= 0 and a.max() <= 1:
        return (a.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise UserError(f"float image array values span [{a.min()}, {a.max()}]; pass floats in [0, 1] or uint8 in 0..255")


# ----------------------------------------------------------------------------- resizing
def smart_resize(
    height: int, width: int, factor: int = 32, min_pixels: int = 65536, max_pixels: int = 16777216
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Exactly transformers' rounding (image_processing_pil_qwen2_vl.py l.58-84): Python `round` (half to
    even) first; if too large scale down with floor; if too small scale up with ceil.
    """
    if height <= 0 or width <= 0:
        raise UserError(f"image has zero size ({height}x{width}); pass a non-empty image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(
            f"image is {height}x{width}, aspect ratio {max(height, width) / min(height, width):.0f}:1 exceeds "
            f"{MAX_ASPECT_RATIO}:1 (transformers refuses it); crop or pad the image"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, config: ImageProcessorConfig, image_size=None) -> tuple[int, int]:
    """The (height, width) an image is resized to: `smart_resize`, or the fixed `image_size`."""
    if image_size is None:
        return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    hw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(hw) != 2:
        raise UserError(f"image_size {image_size} must be an int or (height, width); e.g. 384")
    h, w = hw
    if h <= 0 or w <= 0 or h % config.factor or w % config.factor:
        raise UserError(f"image_size {image_size} must be positive multiples of {config.factor} (patch * merge); e.g. 384")
    check_pixels(int(h), int(w), what=f"image_size {image_size}: an image")  # before resizing, not in the OOM
    return int(h), int(w)


def resize_image(rgb: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with PIL (bicubic by default), like transformers."""
    return np.array(Image.fromarray(rgb).resize((width, height), resample=resample))


def rescale_and_normalize(rgb: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: x * 1/255 (in float64, then float32), then (x - mean) / std."""
    chw = np.moveaxis(rgb, -1, 0)  # (3, H, W)
    x = (chw.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.array(config.image_mean, dtype=np.float32)[:, None, None]  # (3, 1, 1)
    std = np.array(config.image_std, dtype=np.float32)[:, None, None]
    return (x - mean) / std  # (3, H, W) float32


# ----------------------------------------------------------------------------- patches
def patchify(image: np.ndarray, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2) -> np.ndarray:
    """(C, H, W) float32 -> (H/P * W/P, C*T*P*P) rows in merge-block order.

    Rows: (block_row, block_col, in_row, in_col); the 4 patches of LLM token k are rows 4k..4k+3.
    Columns: (c, t, py, px); a still image fills both temporal slots with the same pixels.
    """
    c, h, w = image.shape
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = image.astype(np.float32).reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))  # (..., C, T, P, P)
    return x.reshape(gh * gw, c * temporal_patch_size * p * p)  # (N, 1536)


def patch_positions(grid_thw, merge_size: int = 2) -> np.ndarray:
    """(row, col) in patch units of every pixel_values row -> (N, 2) int64.

    `grid_thw` is one (t, h, w) row or an (n, 3) array (images concatenated). For video the frame
    grid repeats t times. Row i of pixel_values covers pixels [16*row : 16*row+16, 16*col : 16*col+16].
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    out = []
    for t, h, w in grids.tolist():
        m = merge_size
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
        rows = rows.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # merge-block order
        cols = cols.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))  # (t*h*w, 2)
    return np.concatenate(out, axis=0).astype(np.int64)


def unpatchify(
    pixel_values: np.ndarray, grid_thw, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2
) -> np.ndarray:
    """Inverse of `patchify` for one image/video: (t*h*w, C*T*P*P) -> frames (t*T, C, H, W) float32.

    For a still image `unpatchify(pv, grid)[0]` is the normalized (3, H, W) image.
    """
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    p, m, tp = patch_size, merge_size, temporal_patch_size
    c = pixel_values.shape[1] // (tp * p * p)
    x = pixel_values.reshape(t, h // m, w // m, m, m, c, tp, p, p)  # (t, bh, bw, ih, iw, C, T, P, P)
    x = x.transpose(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, T, C, bh, ih, P, bw, iw, P)
    return np.ascontiguousarray(x.reshape(t * tp, c, h * p, w * p))


# ----------------------------------------------------------------------------- all together
def preprocess_one(image, config: ImageProcessorConfig | None = None, image_size=None) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (pixel_values (h*w, 1536) float32, grid_thw (3,) int64)."""
    config = config or ImageProcessorConfig()
    rgb = load_image(image)  # (H, W, 3) uint8
    height, width = target_size(rgb.shape[0], rgb.shape[1], config, image_size)
    resized = resize_image(rgb, height, width, config.resample)  # (H', W', 3) uint8
    chw = rescale_and_normalize(resized, config)  # (3, H', W') float32
    patches = patchify(chw, config.patch_size, config.merge_size, config.temporal_patch_size)  # (N, 1536)
    grid = np.array([1, height // config.patch_size, width // config.patch_size], dtype=np.int64)
    return patches, grid


def preprocess(images, config: ImageProcessorConfig | None = None, image_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Images (one or a list) -> (pixel_values (N_total, 1536) float32, image_grid_thw (n, 3) int64).

    `image_size=None` uses smart_resize (like transformers); an int or (h, w) resizes every image to
    exactly that size (multiples of 32), a fixed-cost option.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise UserError("no images given; pass at least one image")
    else:
        images = [images]
    results = [preprocess_one(im, config, image_size) for im in images]
    pixel_values = np.concatenate([r[0] for r in results], axis=0)  # (N_total, 1536)
    image_grid_thw = np.stack([r[1] for r in results]).astype(np.int64)  # (n, 3)
    return pixel_values, image_grid_thw
