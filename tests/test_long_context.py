"""Long contexts: positions, masks and the KV cache stay right past 2048, 4096 and 8192 tokens.

- Prompts of 2100 and 4200 tokens: the prefill's last logits and two decode steps agree with
  transformers within 1e-4 (whole prefill at 2100, chunked at both), greedy tokens identical.
- Chunked prefill (text, image with chunk edges inside the image, a left-padded batch) gives the
  whole prefill's logits within 1e-5 and identical greedy tokens; DeepStack and positions are sliced per chunk.
- One 8k+ prompt through the pipeline: the cache holds exactly bytes_per_token x tokens, decode
  positions continue at S + k, and two chunk sizes give the same tokens.
- Context limits come from the checkpoint's config: a clear error, a generation budget cut at the end
  of the context, and in the interactive chat the oldest turns are dropped with a notice.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import grace_hopper, print_max_diffs
from helpers import run_cli as run

from qwen3vl_lab.cache import bytes_per_token  # noqa: E402
from qwen3vl_lab.errors import UserError  # noqa: E402
from qwen3vl_lab.generate import (  # noqa: E402
    ContextOverflow,
    generate_batch,
    generate_tokens,
    pad_prompts,
    prepare_ids,
    prepare_multimodal_prompt,
    prepare_prompt,
    run_prefill,
)
from qwen3vl_lab.layout import OWN_CONFIG  # noqa: E402
from qwen3vl_lab.model import load_model  # noqa: E402
from qwen3vl_lab.pipeline import Qwen3VLPipeline, greedy  # noqa: E402
from qwen3vl_lab.steps import decode_step, prefill, prefill_chunked  # noqa: E402

TOL = 1e-4
CHUNK_TOL = 1e-5
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs():
    yield
    print_max_diffs(MAX_DIFFS)

@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_fp32_dir):
    return tiny_onnx_fp32_dir  # shared across test files: never modified in place


@pytest.fixture(scope="module")
def model(onnx_dir):
    return load_model(onnx_dir)


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 150000, (1, n), dtype=np.int64)  # (1, n) ordinary tokens


# -- against transformers past 2048 and 4096 ------------------------------------------------------
@pytest.mark.parametrize("n", [2100, 4200])
def test_long_prompt_matches_transformers(model, tiny_dir, hf_model_factory, n):
    ids = random_ids(n, seed=n)
    hf = hf_model_factory(tiny_dir)
    with torch.no_grad():
        hf.model.rope_deltas = None
        out = hf.generate(torch.tensor(ids), max_new_tokens=3, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=151643)
    ref_tokens = out.sequences[0, n:].numpy()
    ref_steps = np.stack([l[0].numpy() for l in out.logits])  # (3, V): prefill's last, then 2 decode steps

    prompt = prepare_ids(model, ids)
    runs = {"chunked-1024": 1024} if n > 4096 else {"whole": None, "chunked-1024": 1024}
    for name, chunk in runs.items():
        step = run_prefill(model, prompt, chunk)
        logits = [step.logits[0]]
        for tok in ref_tokens[:-1]:
            step = decode_step(model, np.array([[tok]]), step.cache, prompt.positions.rope_deltas)
            logits.append(step.logits[0])
            assert int(step.position_ids[0, 0, 0]) == step.cache.length - 1  # text: position = index
        diff = float(np.abs(np.stack(logits) - ref_steps).max())
        MAX_DIFFS[f"{n} tokens/{name}"] = diff
        assert diff <= TOL
        assert step.cache.length == n + 2
    assert list(generate_tokens(model, prompt, greedy, 3, eos_token_ids=[], prefill_chunk=1024)) == ref_tokens.tolist()


# -- chunked prefill == whole prefill ---------------------------------------------------------------
def assert_same_prefill(model, prompt, chunk, name, n_new=6):
    whole = prefill(model, prompt.inputs_embeds, prompt.positions, attention_mask=prompt.attention_mask,
                    deepstack=prompt.deepstack, logits_to_keep=0)
    parts = prefill_chunked(model, prompt.inputs_embeds, prompt.positions, chunk,
                            attention_mask=prompt.attention_mask, deepstack=prompt.deepstack, logits_to_keep=0)
    real = np.ones(prompt.input_ids.shape, bool) if prompt.attention_mask is None else prompt.attention_mask.astype(bool)
    diff = float(np.abs(parts.logits[real] - whole.logits[real]).max())
    MAX_DIFFS[f"chunked/{name}"] = diff
    assert parts.logits.shape == whole.logits.shape and diff <= CHUNK_TOL
    for k_whole, k_parts in zip(whole.cache.keys, parts.cache.keys):
        assert np.abs(k_parts - k_whole).transpose(0, 2, 1, 3)[real].max() <= CHUNK_TOL  # (B, T, kv, hd) at real T
    n_chunks = -(-prompt.length // chunk)
    assert [r.kind for r in parts.cache.history] == ["prefill"] * n_chunks
    assert sum(r.new_tokens for r in parts.cache.history) == prompt.length == parts.cache.length
    if prompt.attention_mask is None:
        alone = list(generate_tokens(model, prompt, greedy, n_new, eos_token_ids=[]))
        assert list(generate_tokens(model, prompt, greedy, n_new, eos_token_ids=[], prefill_chunk=chunk)) == alone


def test_chunked_prefill_equals_whole_text(model):
    prompt = prepare_ids(model, random_ids(300, seed=1))
    assert_same_prefill(model, prompt, 64, "text/64")
    whole = prefill(model, prompt.inputs_embeds, prompt.positions, logits_to_keep=5).logits  # (1, 5, V)
    parts = prefill_chunked(model, prompt.inputs_embeds, prompt.positions, 297, logits_to_keep=5).logits
    assert parts.shape == whole.shape == (1, 5, model.config.text.vocab_size)  # the last 5 straddle a chunk edge
    assert np.abs(parts - whole).max() <= CHUNK_TOL


def test_chunked_prefill_equals_whole_image(model):
    prompt = prepare_multimodal_prompt(model, "Describe it.", images=[grace_hopper()], image_size=256)
    visual = np.flatnonzero(prompt.input_ids[0] == model.config.image_token_id)
    assert prompt.deepstack is not None and visual[0] % 32 != 0 and len(visual) > 32  # edges inside the image
    assert_same_prefill(model, prompt, 32, "image/32")


def test_chunked_prefill_equals_whole_padded_batch(model):
    prompts = [prepare_prompt(model, "Hi"), prepare_multimodal_prompt(model, "Describe it.", images=[grace_hopper()],
                                                                       image_size=256)]
    batch = pad_prompts(model, prompts)
    assert (batch.attention_mask[0, :16] == 0).all()  # the short row's first chunk is all padding
    assert_same_prefill(model, batch, 16, "padded-batch/16")
    assert generate_batch(model, prompts, greedy, 6, eos_token_ids=[], prefill_chunk=16) == \
        generate_batch(model, prompts, greedy, 6, eos_token_ids=[])


def test_bad_chunk_size_is_a_user_error(model, onnx_dir):
    prompt = prepare_prompt(model, "Hi")
    with pytest.raises(UserError, match="chunk size must be at least 1"):
        prefill_chunked(model, prompt.inputs_embeds, prompt.positions, 0)
    with pytest.raises(UserError, match="prefill_chunk must be None or an integer >= 1"):
        Qwen3VLPipeline(onnx_dir).generate("Hi", prefill_chunk=-3)


def test_cli_prefill_chunk_gives_the_same_tokens(onnx_dir, capsys):
    common = ["generate", "--model_dir", str(onnx_dir), "--prompt", "Hello, who are you?", "--temperature", "0",
              "--max_new_tokens", "6", "--json"]
    answers = []
    for extra in ([], ["--prefill_chunk", "4"]):
        code, out, err = run(capsys, *common, *extra)
        assert code == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert answers[0] == answers[1] and len(answers[0]) == 6
    code, _, err = run(capsys, *common, "--prefill_chunk", "0")
    assert code == 2 and "--prefill_chunk must be an integer >= 1" in err


# -- 8k+ tokens through the pipeline ------------------------------------------------------------------
def test_8k_prompt_through_the_pipeline(model, onnx_dir):
    text = "The quick brown fox jumps over the lazy dog. " * 850
    pipe = Qwen3VLPipeline(onnx_dir)
    result = pipe.generate_result(text, max_new_tokens=3, temperature=0.0, prefill_chunk=512)
    assert result.prompt_tokens > 8192 and len(result.token_ids) == 3

    prompt = prepare_prompt(model, text)
    S = prompt.length
    step = run_prefill(model, prompt, 1024)  # another chunk size than the pipeline's
    per_token = bytes_per_token(model.config.text)  # 2 x layers x kv_heads x head_dim x 4 bytes
    assert step.cache.nbytes == per_token * S
    tokens = []
    for k in range(3):
        token = greedy(step.logits)  # (1,)
        tokens.append(int(token[0]))
        if k == 2:
            break
        step = decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)
        assert int(step.position_ids[0, 0, 0]) == S + k  # decode positions continue past 8192
        assert step.cache.nbytes == per_token * (S + k + 1)  # grows by exactly one token's K and V
        assert step.cache.history[-1].nbytes - step.cache.history[-2].nbytes == per_token
    assert tokens == result.token_ids


# -- context limits ------------------------------------------------------------------------------
def linked_copy(src, dst, limit: int):
    """The export with max_position_embeddings = limit (hard links to everything else)."""
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.name == OWN_CONFIG:  # our settings (genai_config.json is onnxruntime-genai's schema)
            config = json.loads(f.read_text())
            config["config"]["text"]["max_position_embeddings"] = limit
            target.write_text(json.dumps(config))
        else:
            os.link(f, target)  # a hard link: a symlink leading out of the folder is refused (paths.inside)
    return dst


@pytest.fixture(scope="module")
def small_dir(onnx_dir, tmp_path_factory):
    return linked_copy(onnx_dir, tmp_path_factory.mktemp("small") / "m", 90)


def test_context_limit_comes_from_the_config(small_dir):
    model = load_model(small_dir)
    assert model.context_length == 90
    with pytest.raises(ContextOverflow, match="context holds 90") as e:
        prepare_ids(model, random_ids(90))
    assert e.value.prompt_tokens == 90 and isinstance(e.value, UserError)
    prompt = prepare_ids(model, random_ids(86))
    assert len(list(generate_tokens(model, prompt, greedy, 20, eos_token_ids=[]))) == 4  # stops at the context end
    short = prepare_ids(model, random_ids(20))
    assert [len(t) for t in generate_batch(model, [prompt, short], greedy, 20, eos_token_ids=[])] == [4, 20]

def test_interactive_drops_the_oldest_turns(small_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import qwen3vl_lab.pipeline as pipeline

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    seen = []  # (prompt text, number of images) of every turn
    real_prepare = pipeline.prepare_multimodal_prompt

    def record(model, prompt, images=None, *args, **kwargs):
        p = real_prepare(model, prompt, images, *args, **kwargs)
        seen.append((prompt, len(images or []), p.length))
        return p

    monkeypatch.setattr(pipeline, "prepare_multimodal_prompt", record)
    turns = [f"/image {tmp_path / 'a.png'}"] + [f"turn {i} says hello" for i in range(8)] + ["quit"]
    lines = iter(turns)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "generate", "--model_dir", str(small_dir), "--interactive", "--max_new_tokens", "4",
                         "--temperature", "0", "--image_size", "64")
    assert code == 0 and "Traceback" not in err
    notices = [l for l in err.splitlines() if "dropped the oldest turn" in l]
    assert notices and all("context holds 90" in l for l in notices)
    assert len(seen) == 8 and "error:" not in err  # every message was answered (a prompt is recorded once it fits)
    assert all(length < 90 for _, _, length in seen)
    assert seen[0][1] == 1 and seen[-1][1] == 0  # the first turn's image left with the first turn
    assert "turn 0 says" in seen[0][0] and "turn 0 says" not in seen[-1][0] and "turn 7 says" in seen[-1][0]
