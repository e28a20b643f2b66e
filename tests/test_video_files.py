"""Video files (`--video clip.mp4`) decoded with PyAV and sampled as transformers' Qwen3-VL video processor does.

The reference is transformers' own code: `transformers.video_utils.load_video` (its default PyAV
backend) with `Qwen3VLVideoProcessor.sample_frames` as the frame sampler, the processor's
`smart_resize` and `patchify`, and `Qwen3VLProcessor._calculate_timestamps`. The processor's
`__call__` itself cannot run here: it decodes with torchcodec and resizes and normalizes with
torchvision, and no torchvision build works with the CPU torch pinned for the tests (the PyPI wheel is
a CUDA build). So the clips are made at a size `smart_resize` keeps (no resize on either side), and
normalization is written out as the processor computes it (rescale fused into mean/std, then
torchvision's `(x - mean) / std`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error
from helpers import run_cli as run

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.video import (
    VideoProcessorConfig,
    open_video,
    preprocess_video_one,
    sample_frame_indices,
)

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

FPS_FILE = 10  # the clips: 2 s of coloured frames at 10 fps, 64 x 96 (multiples of 32: no resize)
H, W = 64, 96


def make_clip(path: Path, n: int = 20, fps: int = FPS_FILE, h: int = H, w: int = W, codec: str = "mpeg4") -> Path:
    """n frames whose colour and a moving bar change every frame, encoded with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            rgb = np.zeros((h, w, 3), np.uint8)
            rgb[..., 0], rgb[..., 1] = (i * 12) % 256, 255 - (i * 12) % 256
            rgb[:, (i * 4) % w:(i * 4) % w + 8, 2] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    good = make_clip(d / "clip.mp4")
    out = {"clip.mp4": good, "clip.mkv": make_clip(d / "clip.mkv"),  # mkv: the header has no frame count
           "odd.mp4": make_clip(d / "odd.mp4", n=23, fps=7, h=100, w=150),  # 3.3 s, needs a resize
           "three.mp4": make_clip(d / "three.mp4", n=3)}
    for name, data in {"empty.mp4": b"", "notes.mp4": b"not a video\n" * 50,
                       "cut.mp4": good.read_bytes()[: good.stat().st_size // 2]}.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    with av.open(str(d / "sound.wav"), "w") as container:  # audio only
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    out["sound.wav"] = d / "sound.wav"
    return out


def video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    # Qwen3-VL's video_preprocessor_config.json values (FACTS §6.2)
    return Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, patch_size=16, temporal_patch_size=2, merge_size=2)


def reference(path: Path, fps: float):
    """transformers: decode + sample (load_video, PyAV) -> (frames, metadata, pixel_values, grid, timestamps)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    from transformers.video_utils import load_video

    vp = video_processor()
    frames, meta = load_video(str(path), backend="pyav",
                              sample_indices_fn=lambda metadata, **kw: vp.sample_frames(metadata, fps=fps))
    n, h, w = frames.shape[:3]
    assert smart_resize(n, h, w, 2, 32, 4096, 25165824) == (h, w)  # the processor would not resize these
    mean, std, _ = vp._fuse_mean_std_and_rescale_factor(do_normalize=True, image_mean=(0.5,) * 3,
                                                        image_std=(0.5,) * 3, do_rescale=True, rescale_factor=1 / 255)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32)  # (F, 3, H, W)
    x = (x - mean[:, None, None]) / std[:, None, None]  # torchvision's normalize
    pixel_values, gt, gh, gw = vp.patchify(x[None], patch_size=16, merge_size=2, temporal_patch_size=2)
    timestamps = Qwen3VLProcessor._calculate_timestamps(None, meta.frames_indices, meta.fps, 2)
    return frames, meta, pixel_values[0].numpy(), [gt, gh, gw], timestamps


# -- what transformers does --------------------------------------------------------------------------
@pytest.mark.parametrize("total,file_fps,fps", [
    (20, 10, 2), (20, 10, 4), (20, 10, 10), (20, 10, 0.5), (3, 10, 2), (2, 25, 2), (300, 30, 2), (301, 29.97, 2),
    (24 * 600, 24, 2), (100, 24, 1.7), (7, 7, 2), (9, 30, 5),
])
def test_frame_sampling_matches_transformers(total, file_fps, fps):
    from transformers.video_utils import VideoMetadata

    ref = video_processor().sample_frames(VideoMetadata(total_num_frames=total, fps=file_fps), fps=fps)
    np.testing.assert_array_equal(sample_frame_indices(total, file_fps, fps), ref)


@pytest.mark.parametrize("fps", [2.0, 4.0, 10.0])
def test_video_file_matches_transformers(clips, fps):
    frames, meta, ref_pixels, ref_grid, ref_timestamps = reference(clips["clip.mp4"], fps)
    clip = open_video(clips["clip.mp4"], fps, VideoProcessorConfig())
    np.testing.assert_array_equal(clip.frame_indices, meta.frames_indices)
    assert clip.fps == meta.fps == FPS_FILE
    np.testing.assert_array_equal(np.stack(list(clip.read())), frames)  # the same decoded RGB
    pixel_values, grid, timestamps = preprocess_video_one(clips["clip.mp4"], video_fps=fps)
    assert grid.tolist() == ref_grid
    np.testing.assert_allclose(pixel_values, ref_pixels, rtol=0, atol=1e-6)
    assert timestamps == ref_timestamps


def test_two_frames_per_second_of_a_ten_fps_clip(clips):
    """The numbers of the default: 20 frames at 10 fps, fps 2 -> 4 frames [0, 6, 13, 19] -> pairs at 0.3 s, 1.6 s."""
    pixel_values, grid, timestamps = preprocess_video_one(clips["clip.mp4"])
    assert grid.tolist() == [2, 4, 6] and pixel_values.shape == (2 * 4 * 6, 1536)
    assert timestamps == pytest.approx([0.3, 1.6])


def test_a_clip_that_needs_resizing_gets_transformers_grid_and_timestamps(clips):
    """Pixels differ here by the resize backend (PIL vs torchvision); the sampled frames, grid and times do not."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    from transformers.video_utils import load_video

    vp = video_processor()
    frames, meta = load_video(str(clips["odd.mp4"]), backend="pyav",
                              sample_indices_fn=lambda metadata, **kw: vp.sample_frames(metadata, fps=2))
    n = len(frames)  # 23 frames at 7 fps -> int(23 / 7 * 2) = 6
    h, w = smart_resize(n, 100, 150, 2, 32, 4096, 25165824)
    _, grid, timestamps = preprocess_video_one(clips["odd.mp4"])
    assert grid.tolist() == [-(-n // 2), h // 16, w // 16]
    assert timestamps == Qwen3VLProcessor._calculate_timestamps(None, meta.frames_indices, meta.fps, 2)


def test_a_container_without_a_frame_count_samples_the_same_frames(clips):
    """An mkv header does not say how many frames it holds (transformers' loader then sees 0): they are counted."""
    mp4 = open_video(clips["clip.mp4"], 2.0, VideoProcessorConfig())
    mkv = open_video(clips["clip.mkv"], 2.0, VideoProcessorConfig())
    np.testing.assert_array_equal(mkv.frame_indices, mp4.frame_indices)
    np.testing.assert_array_equal(np.stack(list(mkv.read())), np.stack(list(mp4.read())))


def test_a_short_clip_uses_every_frame(clips):
    """3 frames (fewer than min_frames 4): all three, the last repeated to make the second pair."""
    from transformers.video_utils import VideoMetadata

    clip = open_video(clips["three.mp4"], 2.0, VideoProcessorConfig())
    ref = video_processor().sample_frames(VideoMetadata(total_num_frames=3, fps=FPS_FILE), fps=2)
    assert clip.frame_indices.tolist() == ref.tolist() == [0, 1, 2]
    _, grid, _ = preprocess_video_one(clips["three.mp4"])
    assert grid.tolist() == [2, 4, 6]


def test_frames_given_as_a_list_still_use_video_fps(clips):
    frames = np.stack(list(open_video(clips["clip.mp4"], 10.0, VideoProcessorConfig()).read()))  # all 20
    _, grid, timestamps = preprocess_video_one(list(frames[:4]), video_fps=2.0)
    assert grid.tolist() == [2, 4, 6] and timestamps == [0.25, 1.25]


def test_config_min_and_max_frames_are_read(tmp_path):
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"min_frames": 2, "max_frames": 6}))
    config = VideoProcessorConfig.from_dir(tmp_path)
    assert (config.min_frames, config.max_frames) == (2, 6)
    assert len(sample_frame_indices(600, 30, 2, config.min_frames, config.max_frames)) == 6


# -- bad files: one line, exit code 2 --------------------------------------------------------------------
BAD = {
    "empty.mp4": "is not a readable video file",
    "notes.mp4": "is not a readable video file",
    "cut.mp4": "is not a readable video file",
    "sound.wav": "has no video stream",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_video_files_are_one_line_errors(clips, name):
    with pytest.raises(UserError, match=BAD[name]) as e:
        preprocess_video_one(clips[name])
    assert str(clips[name]) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_video_file(clips, tmp_path):
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(clips["clip.mp4"].read_bytes())
    locked.chmod(0)
    with pytest.raises(UserError, match="permission denied"):
        preprocess_video_one(locked)


def test_a_permission_error_names_the_fix(clips, monkeypatch):
    """As PyAV reports an unreadable file (av.error.PermissionError is a PermissionError), even when run as root."""
    def denied(*args, **kwargs):
        raise av.error.PermissionError(13, "Permission denied")

    monkeypatch.setattr(av, "open", denied)
    with pytest.raises(UserError, match="cannot read video file .*clip.mp4 .permission denied.; make it readable"):
        preprocess_video_one(clips["clip.mp4"])


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_fp32_dir):
    return tiny_onnx_fp32_dir


def gen(model_dir, *extra):
    return ["generate", "--model_dir", str(model_dir), "--prompt", "What happens?", "--max_new_tokens", "2",
            "--temperature", "0", "--json", *extra]


def test_cli_video_file(onnx_dir, clips, capsys):
    code, out, err = run(capsys, *gen(onnx_dir, "--video", clips["clip.mp4"]))
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 2
    code, out4, err = run(capsys, *gen(onnx_dir, "--video", clips["clip.mp4"], "--video_fps", "4"))
    assert code == 0, err  # 8 frames: 4 pairs of 2 x 3 tokens instead of 2, each with its "<t seconds>" text
    assert json.loads(out4.strip().splitlines()[-1])["prompt_tokens"] > result["prompt_tokens"] + 2 * 6


@pytest.mark.parametrize("name", ["empty.mp4", "notes.mp4", "sound.wav"])
def test_cli_bad_video_file(onnx_dir, clips, capsys, name):
    code, out, err = run(capsys, *gen(onnx_dir, "--video", clips[name]))
    assert_one_line_error(code, err, str(clips[name]), BAD[name])
    assert out == ""
