"""Video as a list of frames -> `pixel_values_videos`, `video_grid_thw` and per-frame-pair timestamps.

Qwen3-VL sees a video as pairs of consecutive frames (temporal_patch_size 2): each pair becomes one
block of LLM tokens, announced by its time in text (`<1.2 seconds>`).
The steps follow transformers' `Qwen3VLVideoProcessor`:

    load_frames          a folder of image files, or a list of paths / PIL images / arrays -> (F, H, W, 3) uint8
    video_smart_resize   one (H', W') for all frames: multiples of 32, t*H'*W' within [min_pixels, max_pixels]
    resize + normalize   PIL bicubic per frame, x / 255, (x - 0.5) / 0.5  -> (F, 3, H', W') float32
    patchify_video       pad to an even frame count (repeat the last), -> (F/2 * H'/16 * W'/16, 1536)

Frames are used as given (no resampling): `video_fps` says how many of them were taken per second
(default 2, Qwen's own sampling rate), which sets the timestamps. Decoding video files (mp4, ...)
is not done here: extract frames first, e.g. `ffmpeg -i clip.mp4 -vf fps=2 frames/%04d.png`.

Difference from transformers: it resizes video frames with torchvision (not installed here), this
module with PIL like the image path, so resized pixels can differ by a few levels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .image import MAX_ASPECT_RATIO, load_image, rescale_and_normalize, resize_image
from .limits import check_pixels
from .tokenizer import frame_pair_timestamps

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_FILE_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")


@dataclass(frozen=True)
class VideoProcessorConfig:
    """The numbers of `video_preprocessor_config.json` (Qwen3-VL checkpoint values as defaults)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 4096  # size.shortest_edge, over all frames (t * h * w)
    max_pixels: int = 25165824  # size.longest_edge, over all frames
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # bicubic

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict) -> "VideoProcessorConfig":
        base = cls()
        size = d.get("size") or {}
        return cls(
            patch_size=int(d.get("patch_size", base.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(d.get("merge_size", base.merge_size)),
            min_pixels=int(size.get("shortest_edge", base.min_pixels)),
            max_pixels=int(size.get("longest_edge", base.max_pixels)),
            image_mean=tuple(float(x) for x in d.get("image_mean", base.image_mean)),
            image_std=tuple(float(x) for x in d.get("image_std", base.image_std)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            resample=int(d.get("resample", base.resample)),
        )

    @classmethod
    def from_dir(cls, folder: str | Path | None) -> "VideoProcessorConfig":
        """`<folder>/video_preprocessor_config.json`, or the defaults when the file is absent."""
        path = Path(folder) / "video_preprocessor_config.json" if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path} is not a valid video preprocessor config ({e}); restore the checkpoint's file") from None


@dataclass
class VideoInputs:
    """What the vision encoder and the tokenizer need for a list of videos, in prompt order."""

    pixel_values_videos: np.ndarray  # (N_total, C*T*P*P) float32
    video_grid_thw: np.ndarray  # (n, 3) int64: (frame pairs, h, w) per video
    timestamps: list[list[float]]  # per video: seconds of each frame pair (text before each block)


# ----------------------------------------------------------------------------- frames
def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name (frame_0001.png, frame_0002.png, ...)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise UserError(f"video folder {folder} holds no image files ({', '.join(FRAME_SUFFIXES)}); "
                        "put the frames in it as PNG/JPEG files")
    return files


def _frame_list(video) -> list:
    """One video given as a folder, a list of frames or an (F, H, W[, C]) array -> list of frames."""
    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            return list(frame_files(path))
        if path.suffix.lower() in VIDEO_FILE_SUFFIXES:
            raise UserError(f"{path} is a video file; decoding video files is not supported, extract frames first "
                            "(e.g. `ffmpeg -i clip.mp4 -vf fps=2 frames/%04d.png`) and pass the folder")
        if not path.exists():
            raise UserError(f"video folder {path} does not exist; pass a folder of frames or a list of image files")
        raise UserError(f"{path} is not a folder of frames; pass a folder, or its frame files as one list per video "
                        "(videos=[[frame1, frame2, ...]])")
    if isinstance(video, np.ndarray) and video.ndim == 4:
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    raise UserError(f"cannot use a {type(video).__name__} as a video; pass a folder, a list of frames or an "
                    "(F, H, W, 3) array")


def load_frames(video) -> np.ndarray:
    """All frames of one video -> (F, H, W, 3) uint8. At least two frames, all of one size."""
    frames = [load_image(f) for f in _frame_list(video)]
    if len(frames) < 2:
        raise UserError(f"a video needs at least 2 frames, got {len(frames)}; pass a single frame as an image instead")
    sizes = {f.shape[:2] for f in frames}
    if len(sizes) > 1:
        raise UserError(f"the frames of a video have different sizes {sorted(sizes)}; resize them to one size first")
    return np.stack(frames)  # (F, H, W, 3)


# ----------------------------------------------------------------------------- resizing
def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """transformers' video `smart_resize` (video_processing_qwen3_vl.py): the budget counts all frames."""
    if num_frames < temporal_factor:
        raise UserError(f"a video needs at least {temporal_factor} frames, got {num_frames}; pass it as an image")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(f"video frames are {height}x{width}, aspect ratio above {MAX_ASPECT_RATIO}:1 "
                        "(transformers refuses it); crop or pad the frames")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _fixed_size(image_size, factor: int) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(hw) != 2 or min(hw) <= 0 or hw[0] % factor or hw[1] % factor:
        raise UserError(f"image_size {image_size} must be positive multiples of {factor} (patch * merge); e.g. 384")
    check_pixels(int(hw[0]), int(hw[1]), what=f"image_size {image_size}: a video frame")
    return int(hw[0]), int(hw[1])


# ----------------------------------------------------------------------------- patches
def patchify_video(frames: np.ndarray, patch_size: int = 16, merge_size: int = 2,
                   temporal_patch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(F, C, H, W) float32 -> (pixel_values (F/2 * H/P * W/P, C*T*P*P), grid (3,)), transformers' layout.

    An odd frame count is padded by repeating the last frame. Rows: (pair, block_row, block_col,
    in_row, in_col); columns (c, t, py, px) with frame 2k in t = 0 and frame 2k + 1 in t = 1.
    """
    if pad := -len(frames) % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    f, c, h, w = frames.shape
    gt, gh, gw, m, p = f // temporal_patch_size, h // patch_size, w // patch_size, merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, T, P, P)
    pixel_values = np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), dtype=np.float32)
    return pixel_values, np.array([gt, gh, gw], dtype=np.int64)


# ----------------------------------------------------------------------------- all together
def preprocess_video_one(video, config: VideoProcessorConfig | None = None, image_size=None,
                         video_fps: float = 2.0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """One video -> (pixel_values (t*h*w, 1536), grid_thw (3,), timestamps (t,) seconds)."""
    config = config or VideoProcessorConfig()
    if not video_fps or video_fps <= 0:
        raise UserError(f"video_fps must be > 0 (frames per second of the given frames), got {video_fps}")
    frames = load_frames(video)  # (F, H, W, 3) uint8
    n, height, width = frames.shape[:3]
    if image_size is None:
        th, tw = video_smart_resize(n, height, width, config.temporal_patch_size, config.factor,
                                    config.min_pixels, config.max_pixels)
    else:
        th, tw = _fixed_size(image_size, config.factor)
    chw = np.stack([rescale_and_normalize(resize_image(f, th, tw, config.resample), config) for f in frames])
    pixel_values, grid = patchify_video(chw, config.patch_size, config.merge_size, config.temporal_patch_size)
    timestamps = frame_pair_timestamps(range(n), video_fps, config.temporal_patch_size)
    return pixel_values, grid, timestamps


def preprocess_videos(videos, config: VideoProcessorConfig | None = None, image_size=None,
                      video_fps: float = 2.0) -> VideoInputs:
    """A list of videos (each a folder, a list of frames or an (F, H, W, 3) array) -> VideoInputs."""
    if not isinstance(videos, (list, tuple)) or not videos:
        raise UserError("videos must be a non-empty list; each video is a folder or a list of frames")
    results = [preprocess_video_one(v, config, image_size, video_fps) for v in videos]
    return VideoInputs(np.concatenate([r[0] for r in results]), np.stack([r[1] for r in results]),
                       [r[2] for r in results])
