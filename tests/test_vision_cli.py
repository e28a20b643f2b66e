"""Images and videos from the command line, the interactive chat and the Python pipeline.

Every bad input ends in one line on stderr naming the problem and the fix, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, grace_hopper
from helpers import run_cli as run
from PIL import Image

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.genai_config import write_genai_config
from qwen3vl_lab.layout import GENAI_CONFIG, OWN_CONFIG, VISION_FILE
from qwen3vl_lab.layouts import read_export_config


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_fp32_dir):
    return tiny_onnx_fp32_dir  # shared across test files: never modified in place


def linked_copy(src: Path, dst: Path, skip=(), edit_config=None) -> Path:
    """A cheap copy of an export: hard links to every file, minus `skip`; edit_config(config) edits
    genai_config.json + qwen3vl_lab.json as one dict (our settings under "qwen3vl_lab")."""
    configs = (GENAI_CONFIG, OWN_CONFIG)
    for f in src.rglob("*"):
        if f.is_dir() or f.name in skip:
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (f.name in configs and edit_config):
            os.link(f, target)  # a hard link: a symlink leading out of the folder is refused (paths.inside)
    for f in src.rglob(GENAI_CONFIG) if edit_config else ():
        config = read_export_config(f.parent)
        edit_config(config)
        write_genai_config(dst / f.parent.relative_to(src), config)
    return dst


@pytest.fixture(scope="module")
def text_only_dir(onnx_dir, tmp_path_factory) -> Path:
    """An export without the vision model (as from a text-only checkpoint)."""
    def drop_vision(config):
        config["model"].pop("vision", None)

    return linked_copy(onnx_dir, tmp_path_factory.mktemp("novision") / "m",
                       skip=(VISION_FILE, VISION_FILE + ".data"), edit_config=drop_vision)


@pytest.fixture(scope="module")
def small_context_dir(onnx_dir, tmp_path_factory) -> Path:
    """The same model with a 200-token context: the photo (304 tokens) cannot fit, a 384x384 image (144) can."""
    def shrink(config):
        config["qwen3vl_lab"]["config"]["text"]["max_position_embeddings"] = 200

    return linked_copy(onnx_dir, tmp_path_factory.mktemp("small") / "m", edit_config=shrink)

def gen(model_dir, *extra):
    return ["generate", "--model_dir", str(model_dir), "--prompt", "Describe it.", "--max_new_tokens", "3",
            "--temperature", "0", *extra]

# -- files of every kind -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imgs")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    jpg = Path(grace_hopper()).read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (d / "notes.txt").write_text("not an image\n")
    (d / "zero.png").write_bytes(zero_width_png())
    Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(d / "strip.png")  # 250:1
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(d / "small.png")
    (d / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    frames = d / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(frames / f"{i:02d}.png")
    mixed = d / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mixed / "b.png")
    (d / "empty").mkdir()
    (d / "oneframe").mkdir()
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(d / "oneframe" / "a.png")
    return {p.name: p for p in d.iterdir()}


def zero_width_png() -> bytes:
    """A syntactically valid PNG header declaring a 0 x 5 image (PIL refuses to write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# -- what works ----------------------------------------------------------------------------------
def test_image_and_video_prompts_generate(onnx_dir, files, capsys):
    code, out, _ = run(capsys, *gen(onnx_dir, "--image", grace_hopper(), "--json"))
    one = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and len(one["token_ids"]) == 3
    assert one["prompt_tokens"] > 304  # 600x512 -> 608x512 -> grid 38x32 -> 304 image tokens
    code, out, _ = run(capsys, *gen(onnx_dir, "--image", grace_hopper(), "--image", str(files["small.png"]), "--json"))
    two = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and two["prompt_tokens"] == one["prompt_tokens"] + 64 + 2  # 40x40 -> 256x256 (min_pixels)
    code, out, _ = run(capsys, *gen(onnx_dir, "--image", grace_hopper(), "--image_size", "384", "--json"))
    fixed = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and fixed["prompt_tokens"] == one["prompt_tokens"] - 304 + 144  # (384/32)^2
    code, out, _ = run(capsys, *gen(onnx_dir, "--video", str(files["frames"]), "--json"))
    video = json.loads(out.strip().splitlines()[-1])
    frame_list = sorted(str(p) for p in files["frames"].iterdir())
    code2, out2, _ = run(capsys, *gen(onnx_dir, "--video", *frame_list, "--json"))
    listed = json.loads(out2.strip().splitlines()[-1])
    assert code == 0 and code2 == 0 and len(video["token_ids"]) == 3
    assert (listed["token_ids"], listed["prompt_tokens"]) == (video["token_ids"], video["prompt_tokens"])
    # 4 frames 64x96 -> 2 frame pairs of 2x3 tokens, each "<t seconds><|vision_start|>...<|vision_end|>"
    assert video["prompt_tokens"] > 2 * 6 + 10


def test_images_come_before_the_text_in_the_order_given(onnx_dir, files, monkeypatch, capsys):
    import qwen3vl_lab.pipeline as pipeline

    seen = []
    real = pipeline.prepare_multimodal_prompt

    def spy(model, prompt, images=None, *args, **kwargs):
        p = real(model, prompt, images, *args, **kwargs)
        seen.append(p.input_ids[0])
        return p

    monkeypatch.setattr(pipeline, "prepare_multimodal_prompt", spy)
    code, _, _ = run(capsys, *gen(onnx_dir, "--image", str(files["small.png"]), "--image", grace_hopper()))
    assert code == 0
    ids = seen[0].tolist()
    from qwen3vl_lab.config import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID

    starts = [i for i, t in enumerate(ids) if t == VISION_START_TOKEN_ID]
    ends = [i for i, t in enumerate(ids) if t == VISION_END_TOKEN_ID]
    assert [e - s - 1 for s, e in zip(starts, ends)] == [64, 304]  # small first, then the photo
    assert ids.count(IMAGE_TOKEN_ID) == 368 and ends[-1] < len(ids) - 5  # the text follows the images


def test_python_pipeline_takes_paths_pil_and_numpy_and_encodes_once(onnx_dir):
    from qwen3vl_lab import Qwen3VLPipeline, Qwen3VLTextOnlyPipeline

    pipe = Qwen3VLPipeline(model_dir=onnx_dir)
    path = grace_hopper()
    kw = dict(max_new_tokens=4, temperature=0.0)
    by_path = pipe.generate_result("Describe it.", images=[path], **kw)
    by_pil = pipe.generate_result("Describe it.", images=[Image.open(path)], **kw)
    by_array = pipe.generate_result("Describe it.", images=np.array(Image.open(path)), **kw)
    assert by_path.token_ids == by_pil.token_ids == by_array.token_ids
    assert pipe.vision_calls == 1  # same pixels: encoded once, reused three times
    texts = pipe.generate(["What is it?", "Where is it?"], images=[path, [path]], **kw)  # one entry per prompt
    assert len(texts) == 2 and pipe.vision_calls == 1
    assert pipe.generate_result("Describe it.", **kw).prompt_tokens < 20  # text only still works
    text_only = Qwen3VLTextOnlyPipeline(onnx_dir)
    with pytest.raises(UserError, match="Qwen3VLPipeline"):
        text_only.generate("Describe it.", images=[path], **kw)
    with pytest.raises(UserError, match="zero size"):
        pipe.generate("Describe it.", images=[Image.new("RGB", (0, 5))], **kw)
    with pytest.raises(UserError, match="zero size"):
        pipe.generate("Describe it.", images=[np.zeros((0, 8, 3), np.uint8)], **kw)


def test_interactive_image_command_encodes_each_image_once(onnx_dir, files, monkeypatch, capsys):
    import qwen3vl_lab.pipeline as pipeline
    import qwen3vl_lab.steps as steps

    encoded, turns = [], []
    real_encode, real_prepare = steps.encode_image, pipeline.prepare_multimodal_prompt

    def count_encode(model, pixel_values, grid):
        encoded.append(np.asarray(grid).tolist())
        return real_encode(model, pixel_values, grid)

    def record_turn(model, prompt, images=None, *args, **kwargs):
        turns.append(len(images or []))
        return real_prepare(model, prompt, images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_image", count_encode)  # what the pipeline calls
    monkeypatch.setattr(pipeline, "prepare_multimodal_prompt", record_turn)
    lines = iter([f"/image {grace_hopper()}", "What is this?", f"/image {files['notes.txt']}", "/image",
                  f"/image {files['small.png']}", "And now?", "Thanks", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "generate", "--model_dir", str(onnx_dir), "--interactive", "--max_new_tokens", "2",
                         "--temperature", "0")
    assert code == 0
    assert len(out.strip().splitlines()) == 3  # one answer per message
    assert turns == [1, 2, 2]  # the history keeps earlier images
    assert encoded == [[[1, 38, 32]], [[1, 16, 16]]]  # each image through the vision tower once
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 2 and "notes.txt is not a readable image" in errors[0] and "/image needs a path" in errors[1]
    assert "Traceback" not in err


def test_interactive_drops_a_message_that_does_not_fit_and_goes_on(small_context_dir, monkeypatch, capsys):
    lines = iter([f"/image {grace_hopper()}", "What is this?", "Hello", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "generate", "--model_dir", str(small_context_dir), "--interactive",
                         "--max_new_tokens", "2", "--temperature", "0")
    assert code == 0 and len(out.strip().splitlines()) == 1  # only "Hello" was answered
    assert "context holds 200" in err and "dropped" in err and "Traceback" not in err


# -- bad input: one line, exit code 2 -------------------------------------------------------------
BAD_IMAGES = {
    "missing": ("nope.png", ["does not exist", "check the path"]),
    "corrupt": ("corrupt.png", ["not a readable image"]),
    "truncated": ("truncated.jpg", ["not a readable image"]),
    "unsupported": ("notes.txt", ["not a readable image", "PNG/JPEG"]),
    "zero-size": ("zero.png", ["not a readable image"]),
    "aspect-ratio": ("strip.png", ["aspect ratio 250:1", "crop or pad"]),
    "folder": ("frames", ["is a folder", "image file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_files_give_one_line(onnx_dir, files, capsys, case, tmp_path):
    name, needles = BAD_IMAGES[case]
    path = files.get(name, tmp_path / name)
    code, out, err = run(capsys, *gen(onnx_dir, "--image", str(path)))
    assert_one_line_error(code, err, str(path), *needles)
    assert out == ""


def test_image_that_does_not_fit_the_context_names_the_fix(small_context_dir, capsys):
    code, _, err = run(capsys, *gen(small_context_dir, "--image", grace_hopper()))
    assert_one_line_error(code, err, "context holds 200", "304 for images", "--image_size")
    code, out, err = run(capsys, *gen(small_context_dir, "--image", grace_hopper(), "--image_size", "384"))
    assert code == 0 and out.strip(), err  # the suggested fix works: 144 image tokens fit


def test_image_with_a_text_only_model_folder(text_only_dir, capsys):
    code, _, err = run(capsys, *gen(text_only_dir, "--image", grace_hopper()))
    assert_one_line_error(code, err, "has no vision model", "qwen3vl-lab export")
    code, out, _ = run(capsys, *gen(text_only_dir))
    assert code == 0 and out.strip()  # text still works there


@pytest.mark.parametrize("args,needles", [
    (["--video", "@clip.mp4"], ["clip.mp4 is not a readable video file"]),
    (["--video", "@empty"], ["no image files"]),
    (["--video", "@mixed"], ["different sizes"]),
    (["--video", "@oneframe"], ["at least 2 frames", "as an image"]),
    (["--video", "@small.png"], ["not a video file or a folder of frames"]),
    (["--video", "@small.png", "@corrupt.png"], ["corrupt.png is not a readable image"]),
    (["--video", "@nowhere"], ["does not exist"]),
    (["--raw", "--image", "@small.png"], ["raw prompt holds 0 <|image_pad|>", "drop --raw"]),
    (["--image_size", "100"], ["--image_size", "multiple of 32"]),
    (["--image_size", "abc"], ["--image_size"]),
    (["--video_fps", "0", "--video", "@frames"], ["--video_fps"]),
])
def test_bad_video_and_size_options(onnx_dir, files, capsys, args, needles, tmp_path):
    argv = [str(files.get(a[1:], tmp_path / a[1:])) if a.startswith("@") else a for a in args]
    code, _, err = run(capsys, *gen(onnx_dir, *argv))
    assert_one_line_error(code, err, *needles)


def test_a_single_frame_video_is_refused_in_python(onnx_dir, files):
    from qwen3vl_lab.generate import prepare_multimodal_prompt
    from qwen3vl_lab.model import load_model

    one = sorted(files["frames"].iterdir())[0]
    with pytest.raises(UserError, match="at least 2 frames"):
        prepare_multimodal_prompt(load_model(onnx_dir), "x", videos=[[one]])


# -- real processes ----------------------------------------------------------------------------
def test_subprocess_image_prompt_and_corrupt_image(onnx_dir, files):
    cmd = [sys.executable, "-m", "qwen3vl_lab", *gen(onnx_dir, "--image", grace_hopper(), "--json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["prompt_tokens"] > 300
    cmd = [sys.executable, "-m", "qwen3vl_lab", *gen(onnx_dir, "--image", str(files["corrupt.png"]))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "corrupt.png is not a readable image" in done.stderr
