"""Video (a file, or a list of frames) -> `pixel_values_videos`, `video_grid_thw` and per-frame-pair timestamps.

Qwen3-VL sees a video as pairs of consecutive frames (temporal_patch_size 2): each pair becomes one
block of LLM tokens, announced by its time in text (`<1.2 seconds>`).
The steps follow transformers' `Qwen3VLVideoProcessor`:

    open_video           a video file (mp4, mkv, webm, ...: decoded with PyAV), a folder of image files, or a
                         list of paths / PIL images / arrays -> frames (F, H, W, 3) uint8 + their indices and rate
    video_smart_resize   one (H', W') for all frames: multiples of 32, t*H'*W' within [min_pixels, max_pixels]
    resize + normalize   PIL bicubic per frame, x / 255, (x - 0.5) / 0.5  -> (F, 3, H', W') float32
    patchify_video       pad to an even frame count (repeat the last), -> (F/2 * H'/16 * W'/16, 1536)

A video file is sampled as transformers does: `video_fps` frames per second (default 2, Qwen's own
rate) -> n = int(frames / file_fps * video_fps), clamped to [min_frames, max_frames] and to the frame
count, at `linspace(0, frames - 1, n).round()` (`Qwen3VLVideoProcessor.sample_frames`), decoded to
RGB the way `transformers.video_utils.load_video` does with PyAV; a frame pair's timestamp is the
mean of its two frames' index / file_fps. Frames given as a folder or a list are used as given (no
resampling): `video_fps` then says how many of them were taken per second, which sets the timestamps.

Difference from transformers: it resizes video frames with torchvision (not installed here), this
module with PIL like the image path, so resized pixels can differ by a few levels. Frames are resized
as they are decoded, so a long video never sits in memory at its native size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .image import MAX_ASPECT_RATIO, load_image, rescale_and_normalize, resize_image
from .jsonfile import read_json
from .limits import check_pixels
from .tokenizer import frame_pair_timestamps

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
    min_frames: int = 4  # frames sampled from a video file: at least (unless it has fewer) ...
    max_frames: int = 768  # ... and at most

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
            min_frames=int(d.get("min_frames", base.min_frames)),
            max_frames=int(d.get("max_frames", base.max_frames)),
        )

    @classmethod
    def from_dir(cls, folder: str | Path | None) -> "VideoProcessorConfig":
        """`<folder>/video_preprocessor_config.json`, or the defaults when the file is absent."""
        path = Path(folder) / "video_preprocessor_config.json" if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        fix = "restore the checkpoint's file"
        data = read_json(path, fix=fix)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path} is not a valid video preprocessor config ({e}); restore the checkpoint's file") from None


@dataclass
class VideoInputs:
    """What the vision encoder and the tokenizer need for a list of videos, in prompt order."""

    pixel_values_videos: np.ndarray  # (N_total, C*T*P*P) float32
    video_grid_thw: np.ndarray  # (n, 3) int64: (frame pairs, h, w) per video
    timestamps: list[list[float]]  # per video: seconds of each frame pair (text before each block)


# ----------------------------------------------------------------------------- frames
@dataclass
class VideoClip:
    """One video before resizing: its size, which frames are used, and a way to read them one at a time."""

    num_frames: int  # frames used (after sampling a file)
    height: int
    width: int
    frame_indices: np.ndarray  # (num_frames,) int: each used frame's index in the video
    fps: float  # frames per second of those indices (the file's rate; for given frames, video_fps)
    read: Callable[[], Iterator[np.ndarray]]  # -> each used frame, (height, width, 3) uint8, in order


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name (frame_0001.png, frame_0002.png, ...)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise UserError(f"video folder {folder} holds no image files ({', '.join(FRAME_SUFFIXES)}); "
                        "put the frames in it as PNG/JPEG files, or pass a video file")
    return files


def is_video_file(video) -> bool:
    """A path to a regular file that is not an image: decoded as a video (mp4, mkv, webm, avi, mov, ...)."""
    return isinstance(video, (str, Path)) and Path(video).is_file() and Path(video).suffix.lower() not in FRAME_SUFFIXES


def _frame_list(video) -> list:
    """One video given as a folder, a list of frames or an (F, H, W[, C]) array -> list of frames."""
    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            return list(frame_files(path))
        if not path.exists():
            raise UserError(f"video {path} does not exist; pass a video file, a folder of frames or a list of image files")
        raise UserError(f"{path} is not a video file or a folder of frames; pass a video file (mp4, mkv, webm, ...), a "
                        "folder, or its frame files as one list per video (videos=[[frame1, frame2, ...]])")
    if isinstance(video, np.ndarray) and video.ndim == 4:
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    raise UserError(f"cannot use a {type(video).__name__} as a video; pass a video file, a folder, a list of frames "
                    "or an (F, H, W, 3) array")


def load_frames(video) -> np.ndarray:
    """All frames of one video given as frames -> (F, H, W, 3) uint8. At least two frames, all of one size."""
    frames = [load_image(f) for f in _frame_list(video)]
    if len(frames) < 2:
        raise UserError(f"a video needs at least 2 frames, got {len(frames)}; pass a single frame as an image instead")
    sizes = {f.shape[:2] for f in frames}
    if len(sizes) > 1:
        raise UserError(f"the frames of a video have different sizes {sorted(sizes)}; resize them to one size first")
    return np.stack(frames)  # (F, H, W, 3)


def sample_frame_indices(total_frames: int, file_fps: float, fps: float, min_frames: int = 4,
                         max_frames: int = 768) -> np.ndarray:
    """Which frames of a video file to use: transformers' `Qwen3VLVideoProcessor.sample_frames` with `fps`."""
    n = int(total_frames / file_fps * fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int)  # (n,)


def _video_file_error(path: Path, e: Exception) -> UserError:
    """One line for a file PyAV cannot open or decode."""
    if isinstance(e, PermissionError):
        return UserError(f"cannot read video file {path} (permission denied); make it readable")
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return UserError(f"{path} is not a readable video file ({reason}); pass a video file (mp4, mkv, webm, ...) "
                     "or a folder of its frames")


def _count_frames(path: Path) -> int:
    """Frames of the first video stream by counting its packets (for files whose header does not say)."""
    import av  # noqa: PLC0415 - PyAV loads FFmpeg's libraries (~0.15 s): only when a video file is given

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def open_video_file(path: Path, fps: float, config: VideoProcessorConfig) -> VideoClip:
    """A video file, sampled at `fps` frames per second as transformers samples it; frames are decoded on `read()`."""
    import av  # noqa: PLC0415 - PyAV loads FFmpeg's libraries (~0.15 s): only when a video file is given

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream; pass a video file (mp4, mkv, webm, ...) or a folder of frames")
            stream = container.streams.video[0]
            rate, total, height, width = stream.average_rate, stream.frames, stream.height, stream.width
        total = total or _count_frames(path)
    except (av.error.FFmpegError, OSError) as e:  # not a video, unreadable, ...
        raise _video_file_error(path, e) from None
    if not rate or rate <= 0:
        raise UserError(f"{path} does not say its frame rate; re-encode it (e.g. `ffmpeg -i {path.name} -r 30 "
                        "fixed.mp4`) or pass its frames as a folder")
    if total < config.temporal_patch_size or not height or not width:
        raise UserError(f"{path} holds {total} decodable frame(s) of {height}x{width} (height x width); a video needs at least "
                        f"{config.temporal_patch_size} (pass a single frame as an image)")
    indices = sample_frame_indices(total, float(rate), fps, config.min_frames, config.max_frames)

    def read() -> Iterator[np.ndarray]:
        wanted, last, got = set(indices.tolist()), int(indices[-1]), 0
        try:
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i > last:
                        break
                    if i in wanted:
                        rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8, as transformers' PyAV loader
                        if rgb.shape[:2] != (height, width):
                            raise UserError(f"{path} changes its frame size at frame {i} ({rgb.shape[0]}x{rgb.shape[1]}, "
                                            f"was {height}x{width}, height x width); re-encode it to one size")
                        got += 1
                        yield rgb
        except (av.error.FFmpegError, OSError) as e:
            raise _video_file_error(path, e) from None
        if got < len(indices):
            raise UserError(f"{path} ended after {got} of the {len(indices)} frames to read (it says it has {total}); "
                            "the file is cut short or damaged: re-encode it or pass its frames as a folder")

    return VideoClip(len(indices), int(height), int(width), indices, float(rate), read)


def open_video(video, video_fps: float, config: VideoProcessorConfig) -> VideoClip:
    """One video: a video file (sampled at video_fps), or frames as given (taken at video_fps)."""
    if not video_fps or video_fps <= 0:
        raise UserError(f"video_fps must be > 0 (frames per second), got {video_fps}")
    if is_video_file(video):
        return open_video_file(Path(video), float(video_fps), config)
    frames = load_frames(video)  # (F, H, W, 3) uint8
    n, height, width = frames.shape[:3]
    return VideoClip(n, height, width, np.arange(n), float(video_fps), lambda: iter(frames))


# ----------------------------------------------------------------------------- resizing
def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """transformers' video `smart_resize` (video_processing_qwen3_vl.py): the budget counts all frames."""
    if num_frames < temporal_factor:
        raise UserError(f"a video needs at least {temporal_factor} frames, got {num_frames}; pass it as an image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:  # the frames as given, before any upscale
        raise UserError(f"video frames are {height}x{width} (height x width), aspect ratio above {MAX_ASPECT_RATIO}:1 "
                        "(transformers refuses it); crop or pad the frames")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
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
    clip = open_video(video, video_fps, config)
    if image_size is None:
        th, tw = video_smart_resize(clip.num_frames, clip.height, clip.width, config.temporal_patch_size,
                                    config.factor, config.min_pixels, config.max_pixels)
    else:
        th, tw = _fixed_size(image_size, config.factor)
    chw = np.stack([rescale_and_normalize(resize_image(f, th, tw, config.resample), config) for f in clip.read()])
    pixel_values, grid = patchify_video(chw, config.patch_size, config.merge_size, config.temporal_patch_size)
    timestamps = frame_pair_timestamps(clip.frame_indices, clip.fps, config.temporal_patch_size)
    return pixel_values, grid, timestamps


def preprocess_videos(videos, config: VideoProcessorConfig | None = None, image_size=None,
                      video_fps: float = 2.0) -> VideoInputs:
    """A list of videos (each a video file, a folder, a list of frames or an (F, H, W, 3) array) -> VideoInputs."""
    if not isinstance(videos, (list, tuple)) or not videos:
        raise UserError("videos must be a non-empty list; each video is a video file, a folder or a list of frames")
    results = [preprocess_video_one(v, config, image_size, video_fps) for v in videos]
    return VideoInputs(np.concatenate([r[0] for r in results]), np.stack([r[1] for r in results]),
                       [r[2] for r in results])
