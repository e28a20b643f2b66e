"""Batches: B prompts of different lengths, left-padded, compute what transformers' batched generate computes.

transformers is fed the same left-padded ids with attention_mask (padding_side="left", pad id
<|endoftext|>), pixel_values of all images in batch order and mm_token_type_ids; its generate computes
the per-row 3-D positions (get_rope_index with the mask) and pads finished rows. Checked: positions
identical, prefill logits at every real position and every decode step's logits within 1e-4, greedy
tokens identical to transformers' batch and to running each prompt alone; rows that hit EOS take the
pad token exactly like transformers' output. Then the pipeline (`generate([...], images=[...])`) and
the CLI (`--prompts_file`, `--batch_size`, JSONL out in input order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import grace_hopper, print_max_diffs
from helpers import run_cli as run

from qwen3vl_lab.errors import UserError  # noqa: E402
from qwen3vl_lab.generate import (  # noqa: E402
    batch_steps,
    generate_batch,
    generate_tokens,
    pad_prompts,
    prepare_multimodal_prompt,
    preprocess_visuals,
)
from qwen3vl_lab.model import load_model  # noqa: E402
from qwen3vl_lab.pipeline import Qwen3VLPipeline, greedy  # noqa: E402
from qwen3vl_lab.positions import mm_token_type_ids  # noqa: E402
from qwen3vl_lab.sampling import SamplingConfig, make_sampler  # noqa: E402
from qwen3vl_lab.steps import build_positions, decode_step, deepstack_embeds, embed, encode_image, merge_vision, prefill  # noqa: E402

TOL = 1e-4
N_NEW = 8
PAD = 151643
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs():
    yield
    print_max_diffs(MAX_DIFFS)

def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_fp32_dir):
    return tiny_onnx_fp32_dir  # shared across test files: never modified in place


@pytest.fixture(scope="module")
def model(onnx_dir):
    return load_model(onnx_dir)


# (prompt, images, image_size): mixed lengths; the image batch mixes a text-only row in
BATCHES = {
    "text": [("Hi", None, None), ("Hello, who are you? Tell me a long story about a dragon and a cat.", None, None),
             ("你好，世界！🌍 naïve café", None, None)],
    "images+text": [("Describe it.", [grace_hopper()], 256), ("What is two plus two, in words?", None, None),
                    ("Compare the two pictures.", [noise(64, 96, 1), noise(96, 64, 2)], None)],
}


def prepare_all(model, spec):
    return [prepare_multimodal_prompt(model, text, images, image_size=size) for text, images, size in spec]


def hf_batch_inputs(model, spec, batch) -> dict:
    """transformers' inputs for the padded batch: ids, mask, mm_token_type_ids and all images in batch order."""
    kw = {"input_ids": torch.tensor(batch.input_ids), "attention_mask": torch.tensor(batch.attention_mask),
          "mm_token_type_ids": torch.tensor(mm_token_type_ids(batch.input_ids))}
    visuals = [preprocess_visuals(model, images, image_size=size) for _, images, size in spec if images]
    if visuals:
        kw["pixel_values"] = torch.tensor(np.concatenate([v.pixel_values for v in visuals]))
        kw["image_grid_thw"] = torch.tensor(np.concatenate([v.image_grid_thw for v in visuals]))
    return kw


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_batch_matches_transformers_and_single_runs(model, tiny_dir, hf_model_factory, name):
    spec = BATCHES[name]
    prompts = prepare_all(model, spec)
    batch = pad_prompts(model, prompts)
    lengths = [p.length for p in prompts]
    assert len(set(lengths)) == len(lengths) and batch.input_ids.shape == (3, max(lengths))
    hf = hf_model_factory(tiny_dir)
    kw = hf_batch_inputs(model, spec, batch)

    # positions: transformers' get_rope_index with the attention mask
    with torch.no_grad():
        hf.model.rope_deltas = None
        ref_pos, ref_deltas = hf.model.get_rope_index(kw["input_ids"], image_grid_thw=kw.get("image_grid_thw"),
                                                      attention_mask=kw["attention_mask"],
                                                      mm_token_type_ids=kw["mm_token_type_ids"])
    np.testing.assert_array_equal(batch.positions.position_ids, ref_pos.numpy())
    np.testing.assert_array_equal(batch.positions.rope_deltas.reshape(-1), ref_deltas.numpy().reshape(-1))

    # prefill logits at every real position (transformers' batched forward with the mask)
    with torch.no_grad():
        hf.model.rope_deltas = None
        ref_prefill = hf(**kw, position_ids=ref_pos).logits.numpy()  # (B, S, V)
        hf.model.rope_deltas = None
        out = hf.generate(**kw, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=PAD)
    step = prefill(model, batch.inputs_embeds, batch.positions, attention_mask=batch.attention_mask,
                   deepstack=batch.deepstack, logits_to_keep=0)
    real = batch.attention_mask.astype(bool)
    d_prefill = float(np.abs(step.logits[real] - ref_prefill[real]).max())
    assert np.isfinite(step.logits).all() and all(np.isfinite(k).all() for k in step.cache.keys)

    # decode steps, teacher-forced on transformers' batched tokens
    ref_tokens = out.sequences[:, batch.length:].numpy()  # (B, N_NEW)
    ref_steps = np.stack([l.numpy() for l in out.logits])  # (N_NEW, B, V)
    ours = [step.logits[:, -1]]
    for k in range(N_NEW - 1):
        step = decode_step(model, ref_tokens[:, k:k + 1], step.cache, batch.positions.rope_deltas)
        ours.append(step.logits)
    d_steps = float(np.abs(np.stack(ours) - ref_steps).max())
    MAX_DIFFS[f"batch/{name}"] = max(d_prefill, d_steps)
    assert d_prefill <= TOL and d_steps <= TOL

    # greedy tokens: batch == transformers' batch == each prompt alone
    batched = generate_batch(model, prompts, greedy, N_NEW, eos_token_ids=[])
    alone = [list(generate_tokens(model, p, greedy, N_NEW, eos_token_ids=[])) for p in prompts]
    assert batched == ref_tokens.tolist() == alone
    assert len({tuple(t) for t in batched}) == len(batched)  # the rows really differ


def test_step_functions_take_the_padded_batch_directly(model):
    """embed -> merge_vision -> deepstack_embeds -> build_positions on (B, S) ids give pad_prompts' batch."""
    spec = BATCHES["images+text"]
    batch = pad_prompts(model, prepare_all(model, spec))
    visuals = [preprocess_visuals(model, images, image_size=size) for _, images, size in spec if images]
    grids = np.concatenate([v.image_grid_thw for v in visuals])
    feats = [encode_image(model, v.pixel_values, v.image_grid_thw) for v in visuals]
    features = np.concatenate([f.image_features for f in feats])  # (n_visual, H) in batch reading order
    deep = np.concatenate([f.deepstack for f in feats], axis=1)  # (D, n_visual, H)
    embeds = merge_vision(embed(model, batch.input_ids), batch.input_ids, features)  # (B, S, H)
    assert np.abs(embeds - batch.inputs_embeds).max() <= 1e-6
    assert np.abs(deepstack_embeds(batch.input_ids, deep) - batch.deepstack).max() <= 1e-6
    positions = build_positions(batch.input_ids, grids, attention_mask=batch.attention_mask)
    np.testing.assert_array_equal(positions.position_ids, batch.positions.position_ids)
    np.testing.assert_array_equal(positions.rope_deltas, batch.positions.rope_deltas)


def test_finished_rows_take_the_pad_token_like_transformers(model, tiny_dir, hf_model_factory):
    spec = BATCHES["images+text"]
    prompts = prepare_all(model, spec)
    alone = [list(generate_tokens(model, p, greedy, N_NEW, eos_token_ids=[])) for p in prompts]
    stop = alone[1][2]  # the text row ends at its third token; the image rows never produce it
    assert stop not in alone[1][:2] and all(stop not in row for row in (alone[0], alone[2]))
    batch = pad_prompts(model, prompts)
    steps = list(batch_steps(model, batch, greedy, N_NEW, eos_token_ids=[stop]))
    tokens = np.stack([s.tokens for s in steps], axis=1)  # (B, n)
    finished = np.stack([s.finished for s in steps], axis=1)  # (B, n)
    assert tokens.shape == (3, N_NEW) and finished[1, 2] and not finished[1, 1] and (tokens[1, 3:] == PAD).all()
    assert not finished[[0, 2], :-1].any() and finished[:, -1].all()  # the others go on to max_new_tokens

    hf = hf_model_factory(tiny_dir)
    with torch.no_grad():
        hf.model.rope_deltas = None
        out = hf.generate(**hf_batch_inputs(model, spec, batch), max_new_tokens=N_NEW, do_sample=False,
                          eos_token_id=[stop], pad_token_id=PAD)
    np.testing.assert_array_equal(tokens, out[:, batch.length:].numpy())
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in alone]
    assert generate_batch(model, prompts, greedy, N_NEW, eos_token_ids=[stop]) == expected


def test_repetition_penalty_sees_each_rows_own_history(model):
    """Each row is penalised for its own prompt and tokens (not the pads): batch == alone."""
    prompts = prepare_all(model, BATCHES["text"])
    config = SamplingConfig(temperature=0.0, repetition_penalty=1.5)
    batched = generate_batch(model, prompts, make_sampler(config), N_NEW, eos_token_ids=[])
    alone = [list(generate_tokens(model, p, make_sampler(config), N_NEW, eos_token_ids=[])) for p in prompts]
    plain = generate_batch(model, prompts, greedy, N_NEW, eos_token_ids=[])
    assert batched == alone and batched != plain


def test_pipeline_runs_a_list_of_prompts_in_batches(onnx_dir):
    pipe = Qwen3VLPipeline(onnx_dir)
    prompts = ["Hi", "Describe it.", "What is two plus two?", "Compare them."]
    images = [None, [grace_hopper()], [], [noise(64, 96, 1), noise(96, 64, 2)]]
    kw = dict(max_new_tokens=6, temperature=0.0, image_size=256)
    texts = pipe.generate(prompts, images=images, batch_size=3, **kw)
    alone = [pipe.generate_result(p, images=im, **kw) for p, im in zip(prompts, images)]
    assert texts == [r.text for r in alone]
    results = list(pipe.iter_results(prompts, images=images, batch_size=4, **kw))
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert [r.prompt_tokens for r in results] == [r.prompt_tokens for r in alone]
    with pytest.raises(UserError, match="one entry per prompt"):
        pipe.generate(prompts, images=[grace_hopper()], **kw)
    with pytest.raises(UserError, match="batch_size"):
        pipe.generate(prompts, batch_size=0, **kw)


# -- CLI ----------------------------------------------------------------------------------------
def test_prompts_file_writes_jsonl_in_input_order(onnx_dir, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(noise(64, 96, 3)).save(tmp_path / "a.png")
    rows = [{"prompt": "Hi", "id": "first"}, {"prompt": "Describe it.", "images": ["a.png"]},
            {"prompt": "Hello, who are you? Please answer briefly."}, {"prompt": "Two?", "images": "a.png"},
            {"prompt": "Last one"}]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    common = ["generate", "--model_dir", str(onnx_dir), "--temperature", "0", "--max_new_tokens", "5", "--json"]
    code, out, err = run(capsys, *common, "--prompts_file", str(jsonl), "--batch_size", "2")
    assert code == 0, err
    lines = [json.loads(l) for l in out.strip().splitlines()]
    assert [l["index"] for l in lines] == list(range(5)) and [l["prompt"] for l in lines] == [r["prompt"] for r in rows]
    assert lines[0]["id"] == "first" and "id" not in lines[1]
    assert "generate" in err and "5/5" in err  # the progress bar, on stderr
    for row, line in zip(rows, lines):  # each equals the single-prompt command
        images = [row["images"]] if isinstance(row.get("images"), str) else row.get("images", [])
        extra = [x for im in images for x in ("--image", str(tmp_path / im))]
        code, single, _ = run(capsys, *common, "--prompt", row["prompt"], *extra)
        assert json.loads(single.strip().splitlines()[-1])["token_ids"] == line["token_ids"]

    plain = tmp_path / "prompts.txt"
    plain.write_text("Hi\n\nLast one\n", encoding="utf-8")
    code, out, _ = run(capsys, *common, "--prompts_file", str(plain), "--batch_size", "8")
    assert code == 0
    by_text = [json.loads(l) for l in out.strip().splitlines()]
    assert [l["token_ids"] for l in by_text] == [lines[0]["token_ids"], lines[4]["token_ids"]]


BAD_FILES = {
    "missing": (None, ["does not exist"]),
    "empty": ("\n  \n", ["holds no prompts"]),
    "bad-json": ('{"prompt": "a"}\n{"prompt": \n', [":2 is not valid JSON"]),
    "no-prompt": ('{"text": "a"}\n', [':1 needs a "prompt"']),
    "missing-image": ('{"prompt": "a", "images": ["nope.png"]}\n', [":1: image nope.png does not exist"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_prompts_files_give_one_line(onnx_dir, tmp_path, capsys, case):
    text, needles = BAD_FILES[case]
    path = tmp_path / "p.jsonl"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    code, out, err = run(capsys, "generate", "--model_dir", str(onnx_dir), "--prompts_file", str(path))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err


def test_prompts_file_conflicts_and_bad_batch_size(onnx_dir, tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("Hi\n", encoding="utf-8")
    code, _, err = run(capsys, "generate", "--model_dir", str(onnx_dir), "--prompts_file", str(path), "--prompt", "x")
    assert code == 2 and "leave out --prompt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "generate", "--model_dir", str(onnx_dir), "--prompts_file", str(path), "--batch_size", "0")
    assert code == 2 and "--batch_size must be an integer >= 1" in err
