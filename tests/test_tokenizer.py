"""Tokenizer, chat template, placeholder expansion and streaming, checked against transformers' own code.

References: qwen3vl_lab/data/tokenizer/PROVENANCE.md (reference ids)
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.tokenizer import (
    TextStreamer,
    encode_prompt,
    expand_prompt,
    format_chat,
    frame_pair_timestamps,
    load_tokenizer,
    resolve_tokenizer_dir,
    shipped_tokenizer_dir,
    stream_text,
)

IMAGE_PROMPT_IDS = [151644, 872, 198, 151652, 151655, 151653, 74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# --- loading and reference ids (PROVENANCE.md) -------------------------------------------------------


def test_shipped_files_are_package_data():
    folder = shipped_tokenizer_dir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"):
        assert (folder / name).is_file(), name
    assert resolve_tokenizer_dir(None) == folder


def test_reference_ids(tok):
    assert tok("<|im_start|>hello<|im_end|>")["input_ids"] == [151644, 14990, 151645]
    text = format_chat(tok, "Describe this image.", images=1)
    assert tok(text)["input_ids"] == IMAGE_PROMPT_IDS
    assert len(tok) == 151669 and tok.vocab_size == 151643
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token_id is None


def test_special_token_ids(tok):
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
        "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
        "<tool_call>": 151657, "<think>": 151667, "</think>": 151668,
    }  # fmt: skip
    for text, token_id in expected.items():
        assert tok(text)["input_ids"] == [token_id], text


def test_round_trip(tok):
    texts = ["Hello, world!", "你好，世界。今天天气很好。", "def f(x):\r\n\treturn x  # 🤖👩‍👩‍👧", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ ñ"]
    for text in texts:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_cached_per_folder(tok):
    assert load_tokenizer() is tok
    assert load_tokenizer(shipped_tokenizer_dir()) is tok


# --- chat template ----------------------------------------------

GEN = "<|im_start|>assistant\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def test_format_chat_matches_facts(tok):
    expected = f"<|im_start|>user\n{IMG}Describe this image.<|im_end|>\n{GEN}"
    assert format_chat(tok, "Describe this image.", images=1) == expected
    hello = f"<|im_start|>user\nHello, who are you?<|im_end|>\n{GEN}"
    assert format_chat(tok, "Hello, who are you?") == hello
    as_list = [{"role": "user", "content": [{"type": "text", "text": "Hello, who are you?"}]}]
    assert format_chat(tok, as_list) == hello
    system = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
    ]
    assert format_chat(tok, system) == (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{IMG}Hi<|im_end|>\n{GEN}"
    )
    multi = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": "Sure?"},
    ]
    assert format_chat(tok, multi) == (
        f"<|im_start|>user\n{IMG}What is it?<|im_end|>\n<|im_start|>assistant\nNoise.<|im_end|>\n"
        f"<|im_start|>user\nSure?<|im_end|>\n{GEN}"
    )
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert format_chat(tok, video) == (
        f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n{GEN}"
    )
    assert format_chat(tok, "Describe this image.", images=1, add_vision_id=True) == (
        f"<|im_start|>user\nPicture 1: {IMG}Describe this image.<|im_end|>\n{GEN}"
    )
    assert format_chat(tok, "Hello, who are you?", add_generation_prompt=False) == (
        "<|im_start|>user\nHello, who are you?<|im_end|>\n"
    )


def test_format_chat_images_list_in_order(tok):
    expected = f"<|im_start|>user\n{IMG}{IMG}Compare.<|im_end|>\n{GEN}"
    assert format_chat(tok, "Compare.", images=["a.png", "b.png"]) == expected
    assert format_chat(tok, "x", images=[]) == format_chat(tok, "x") == format_chat(tok, "x", images=np.int64(0))


def test_format_chat_errors(tok):
    with pytest.raises(UserError, match="negative"):
        format_chat(tok, "x", images=-1)
    with pytest.raises(UserError, match="only applies to a prompt string"):
        format_chat(tok, [{"role": "user", "content": "x"}], images=1)
    with pytest.raises(UserError, match="'role'"):
        format_chat(tok, [{"content": "x"}])
    with pytest.raises(UserError, match="non-empty list"):
        format_chat(tok, [])


# --- placeholder expansion vs transformers' Qwen3VLProcessor -------------------


@pytest.fixture(scope="module")
def processor(tok):
    """transformers' Qwen3VLProcessor with the PIL image processor and the Qwen3-VL preprocessor values.

    It cannot be built without torchvision (the video-processor class check fails), so, as
    describes, only that check is skipped; the image path is the processor's own code.
    """
    pytest.importorskip("PIL")
    from transformers import ProcessorMixin
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda *args, **kwargs: None)
        proc = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None)
    return proc


def test_image_expansion_matches_processor(tok, processor):
    from PIL import Image

    images = [Image.new("RGB", (400, 300), (200, 30, 40)), Image.new("RGB", (64, 64)), Image.new("RGB", (1366, 768))]
    for n in (1, 3):
        text = format_chat(tok, "Compare these.", images=n)
        ref = processor(images=images[:n], text=[text])
        grids = np.asarray(ref["image_grid_thw"])
        ids = encode_prompt(tok, text, image_grid_thw=grids)
        assert ids.dtype == np.int64 and ids.ndim == 1
        np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"][0]))
    assert grids.tolist() == [[1, 18, 24], [1, 16, 16], [1, 48, 86]]  # table
    assert (ids == 151655).sum() == 108 + 64 + 1032


def test_image_count_mismatch(tok):
    text = format_chat(tok, "x", images=2)
    with pytest.raises(UserError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        encode_prompt(tok, text, image_grid_thw=[[1, 16, 16]])
    with pytest.raises(UserError, match="but 0 images"):
        encode_prompt(tok, text)
    with pytest.raises(UserError, match=r"\(N, 3\)"):
        encode_prompt(tok, format_chat(tok, "x", images=1), image_grid_thw=[[1, 16]])


def test_video_expansion_matches_reference(tok, processor):
    """Reference: the per-video text from the processor's own `replace_video_token` (5.24), put in place of
    the whole `<|vision_start|><|video_pad|><|vision_end|>` triple as transformers 4.57 and the Qwen
    reference do (4.57 `Qwen3VLProcessor.__call__`: `text.replace(vision_start + video_token + vision_end,
    video_placeholder, 1)`); 5.24 replaces only `<|video_pad|>` and keeps an outer pair."""
    from transformers.video_utils import VideoMetadata

    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    grids = np.array([[2, 4, 6], [3, 2, 2]])
    frames = [[0, 12, 24, 36], [0, 10, 20, 30, 40]]  # the second pads to 6 frames by repeating the last
    metadata = [VideoMetadata(total_num_frames=48, fps=24.0, frames_indices=f) for f in frames]
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Look."}, {"type": "video"}, {"type": "text", "text": "And:"}, {"type": "video"},
        {"type": "text", "text": "What happens?"},
    ]}]  # fmt: skip
    text = format_chat(tok, msgs)
    expected = text
    for i in range(2):
        per_video = processor.replace_video_token({"video_grid_thw": grids, "video_metadata": metadata}, i)
        expected = expected.replace("<|vision_start|><|video_pad|><|vision_end|>", per_video, 1)
    assert expected.startswith("<|im_start|>user\nLook.<0.2 seconds><|vision_start|><|video_pad|>")
    assert "<1.2 seconds>" in expected and "<|vision_end|>And:<0.2 seconds>" in expected

    timestamps = [frame_pair_timestamps(f, 24.0) for f in frames]
    for f, ts in zip(frames, timestamps):
        assert ts == processor._calculate_timestamps(f, 24.0, 2)
    assert expand_prompt(text, video_grid_thw=grids, video_timestamps=timestamps) == expected
    ids = encode_prompt(tok, text, video_grid_thw=grids, video_timestamps=timestamps)
    np.testing.assert_array_equal(ids, tok(expected)["input_ids"])
    assert (ids == 151656).sum() == 2 * 6 + 3 * 1
    assert (ids == 151652).sum() == 2 + 3  # one vision_start per temporal patch, no outer pair


def test_video_errors(tok):
    text = format_chat(tok, [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}])
    with pytest.raises(UserError, match="video_timestamps"):
        encode_prompt(tok, text, video_grid_thw=[[2, 4, 4]])
    with pytest.raises(UserError, match="grid_t=2"):
        encode_prompt(tok, text, video_grid_thw=[[2, 4, 4]], video_timestamps=[0.5])
    with pytest.raises(UserError, match="0 videos"):
        encode_prompt(tok, text)
    ids = encode_prompt(tok, text, video_grid_thw=[[2, 4, 4]], video_timestamps=[0.25, 1.25])  # flat list, one video
    assert tok.decode(ids).startswith("<|im_start|>user\n<0.2 seconds><|vision_start|><|video_pad|>")


# --- a checkpoint's own tokenizer wins ----------------------------------------------------


def _copy_with_template(dst, template):
    dst.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(shipped_tokenizer_dir() / name, dst / name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")


TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"
)


def test_model_dir_tokenizer_wins(tmp_path):
    _copy_with_template(tmp_path / "ckpt", TEMPLATE)
    _copy_with_template(tmp_path / "onnx_pkg" / "pytorch", TEMPLATE.replace("[bot]", "[BOT]"))
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")

    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok is not load_tokenizer()
    assert format_chat(tok, [{"role": "user", "content": "hi"}]) == "[user]hi[bot]"
    assert load_tokenizer(str(tmp_path / "ckpt")) is tok  # cached per resolved folder
    assert format_chat(load_tokenizer(tmp_path / "onnx_pkg"), [{"role": "user", "content": "hi"}]) == "[user]hi[BOT]"
    assert load_tokenizer(tmp_path / "weights_only") is load_tokenizer()  # no tokenizer files: shipped ones
    with pytest.raises(UserError, match="not a folder"):
        load_tokenizer(tmp_path / "missing")


def test_broken_tokenizer_files_are_a_user_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text("{ not json")
    (bad / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        load_tokenizer(bad)


def test_loads_offline_without_network(tmp_path):
    """A fresh interpreter with HF_HUB_OFFLINE=1, an empty HF cache and every socket connect refused."""
    script = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network disabled by the test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from qwen3vl_lab.tokenizer import format_chat, load_tokenizer
        tok = load_tokenizer()
        print(tok(format_chat(tok, "Describe this image.", images=1))["input_ids"])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "", "HTTPS_PROXY": ""}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == IMAGE_PROMPT_IDS


# --- streaming --------------------------------------------------------------------------------------


STREAM_TEXTS = [
    "你好，世界！今天的天气怎么样？古字：龘靐齉爩𠮷鬱。",
    "Emoji: 🤖🎉👩‍👩‍👧‍👦🇯🇵 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, ok.\n"
    "Second line: 日本語のテキスト。\n\n한국어 문장입니다.",
    "Mixed 中文 and English 😀😃😄 with ümlauts, ½ fractions and 𝔪𝔞𝔱𝔥 "
    "𝒮𝒸𝓇𝒾𝓅𝓉.\n",
]


def _pieces(tok, ids):
    return list(stream_text(tok, ids))


def test_stream_never_breaks_characters(tok):
    for text in STREAM_TEXTS:
        ids = tok(text)["input_ids"]
        assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should split characters across tokens"
        ids = ids + [151645, 151643]  # <|im_end|> <|endoftext|>: skipped
        pieces = _pieces(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
        assert all(p and "\ufffd" not in p for p in pieces)
        assert len(pieces) > 5  # it really streams


def test_stream_with_special_tokens_in_the_middle(tok):
    ids = tok("<|im_start|>assistant\n我很好🙂<|im_end|>")["input_ids"]
    assert "".join(_pieces(tok, ids)) == "assistant\n我很好🙂"


def test_stream_random_ids_match_decode(tok):
    """Random byte-level ids can spell invalid UTF-8; the pieces still concatenate to `decode`."""
    rng = np.random.default_rng(0)
    byte_ids = [i for i in range(256)]
    for _ in range(20):
        ids = rng.choice(byte_ids + [151645, 14990, 198], size=40).tolist()
        full = tok.decode(ids, skip_special_tokens=True)
        pieces = _pieces(tok, ids)
        assert "".join(pieces) == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in p for p in pieces)


def test_text_streamer_put_and_end(tok):
    ids = tok("𝔘!")["input_ids"]
    assert len(ids) >= 3 and tok.decode(ids[:1]) == "\ufffd"
    streamer = TextStreamer(tok)
    out = [streamer.put(np.int64(i)) for i in ids[:-1]]
    assert "\ufffd" not in "".join(out)
    out.append(streamer.put(np.array([ids[-1]])))
    out.append(streamer.end())
    assert "".join(out) == streamer.text == "𝔘!"
    streamer = TextStreamer(tok)
    streamer.put(ids[0])  # half a character, then the stream ends: flushed like decode() would
    assert streamer.end() == tok.decode(ids[:1])


def test_template_from_chat_template_json(tmp_path):
    """A checkpoint whose tokenizer_config.json has no template uses its processor's chat_template.json."""
    folder = tmp_path / "old_ckpt"
    _copy_with_template(folder, None)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}), encoding="utf-8")
    assert format_chat(load_tokenizer(folder), "hi") == "[user][{'type': 'text', 'text': 'hi'}][bot]"
