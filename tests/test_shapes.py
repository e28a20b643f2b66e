"""The shapes task, its training code (3 steps only) and the shipped trained model, through transformers
and through our ONNX pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tomllib

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.shapes import task as shapes

ROOT = Path(__file__).resolve().parents[1]


# -- the task ----------------------------------------------------------------------------------
def test_same_seed_same_scene_different_seeds_differ():
    a_img, a_obj = shapes.make_scene(11)
    b_img, b_obj = shapes.make_scene(11)
    assert a_obj == b_obj
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    c_img, _ = shapes.make_scene(12)
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))
    assert a_img.size == (96, 96) and a_img.mode == "RGB"
    held = shapes.heldout_set(6)
    assert [len(o) for _, o in held] == [1, 2, 1, 2, 1, 2]
    assert [o for _, o in held] == [o for _, o in shapes.heldout_set(6)]


def test_spec_scene_questions_and_answers():
    _, objects = shapes.make_scene([("blue", "square", "bottom"), ("red", "circle", "left")])
    assert [o.cell for o in objects] == [3, 7]  # reading order: left (row 1) before bottom (row 2)
    got = [(qa.kind, qa.question, qa.answer) for qa in shapes.question_answer_pairs(objects)]
    assert got == [
        ("describe", "What is in the image?", "A red circle on the left and a blue square at the bottom."),
        ("colour", "What colour is the circle?", "Red."),
        ("position", "Where is the circle?", "On the left."),
        ("shape", "What shape is the red object?", "A circle."),
        ("colour", "What colour is the square?", "Blue."),
        ("position", "Where is the square?", "At the bottom."),
        ("shape", "What shape is the blue object?", "A square."),
    ]
    _, (tri,) = shapes.make_scene([{"colour": "yellow", "shape": "triangle", "position": "top right"}])
    assert [qa.answer for qa in shapes.question_answer_pairs([tri])] == [
        "A yellow triangle at the top right.", "Yellow.", "At the top right.", "A triangle."]


@pytest.mark.parametrize("seed", range(8))
def test_each_object_is_drawn_inside_its_own_cell(seed):
    """The pixels that are not background lie in the objects' cells; each cell holds its object's colour."""
    image, objects = shapes.make_scene(seed)
    rgb = np.asarray(image).astype(int)  # (96, 96, 3)
    ink = (np.abs(rgb - 255).sum(-1) > 30)  # (96, 96)
    cells = {shapes.object_cell(o) for o in objects}
    assert cells == {o.cell for o in objects}
    for cell in range(9):
        r, c = divmod(cell, 3)
        block = ink[32 * r:32 * r + 32, 32 * c:32 * c + 32]
        assert block.any() == (cell in cells), (cell, objects)
    for o in objects:
        x, y = o.xy
        pixel = rgb[int(y), int(x)]
        base = np.array(shapes.COLOURS[o.colour])
        nearest = min(shapes.COLOURS, key=lambda k: np.abs(pixel - np.array(shapes.COLOURS[k])).sum())
        assert nearest == o.colour, (pixel, base)


def test_cell_grid_and_bad_specs():
    assert shapes.cell_grid(np.arange(9))[1, 2] == 5
    for bad in ([("pink", "circle", "left")], [("red", "hexagon", "left")], [("red", "circle", "middle")],
                [("red", "circle", "left"), ("blue", "square", "left")],
                [("red", "circle", "left"), ("red", "square", "right")], [], "three"):
        with pytest.raises(UserError):
            shapes.make_scene(bad)
    with pytest.raises(UserError):
        shapes.cell_grid([1, 2, 3])


# -- training code (no training run here) -----------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    from qwen3vl_lab.export.tiny import preprocessor_config
    from qwen3vl_lab.image import ImageProcessorConfig
    from qwen3vl_lab.shapes.train import Encoder
    from qwen3vl_lab.tokenizer import load_tokenizer

    return Encoder(load_tokenizer(), ImageProcessorConfig.from_dict(preprocessor_config("shapes")))


def test_training_batches_are_deterministic_and_teach_the_answer(encoder):
    from qwen3vl_lab.shapes.train import TrainConfig, make_batch

    cfg = TrainConfig(batch_size=6, steps=100)
    a, b, c = make_batch(encoder, cfg, 50), make_batch(encoder, cfg, 50), make_batch(encoder, cfg, 51)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.pixel_values, b.pixel_values)
    assert not np.array_equal(a.pixel_values, c.pixel_values)
    assert a.image_grid_thw.tolist() == [[1, 6, 6]] * 6  # 96 px -> 6 x 6 patches -> 9 LLM tokens
    assert ((a.input_ids == 151655).sum(1) == 9).all()
    # the token after each predicting position is the target; the targets decode to answer + <|im_end|>
    assert np.array_equal(a.input_ids[a.rows, a.cols + 1], a.targets)
    row0 = a.targets[a.rows == 0]
    assert row0[-1] == 151645
    assert encoder.tokenizer.decode(row0[:-1]) in shapes.all_answers()


def test_sampled_softmax_with_every_row_is_the_full_softmax(encoder):
    torch = pytest.importorskip("torch")
    from qwen3vl_lab.shapes.train import SampledSoftmax, task_token_ids

    task = task_token_ids(encoder)
    vocab = 151936
    loss_fn = SampledSoftmax(task, vocab, negatives=vocab, seed=0)  # every other row: correction log(1) = 0
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(vocab, 16, generator=g)
    targets = torch.as_tensor(task[[0, 3, 5, 7, 1]])
    loss, _ = loss_fn(hidden, weight, targets)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    assert abs(float(loss) - float(ref)) < 1e-4


def test_three_training_steps_change_the_weights(encoder):
    torch = pytest.importorskip("torch")
    from qwen3vl_lab.shapes.train import (
        SampledSoftmax,
        TrainConfig,
        build_model,
        make_batch,
        make_optimizer,
        task_token_ids,
        train_step,
    )

    torch.set_num_threads(2)
    cfg = TrainConfig(batch_size=4, steps=3, negatives=64)
    model = build_model(0)
    before = model.model.visual.patch_embed.proj.weight.detach().clone()
    opt = make_optimizer(model, cfg)
    loss_fn = SampledSoftmax(task_token_ids(encoder), model.config.text_config.vocab_size, cfg.negatives, 0)
    losses = [train_step(model, opt, loss_fn, make_batch(encoder, cfg, s), 1e-3, 1.0)[0] for s in range(3)]
    assert all(np.isfinite(losses))
    assert not torch.equal(before, model.model.visual.patch_embed.proj.weight)


def test_task_rows_train_like_the_full_matrix_and_write_back(encoder):
    """TaskRows (only the task's embedding rows train) gives the same loss as the full matrix, moves only
    those rows, and restore() leaves an ordinary model whose embedding holds them."""
    torch = pytest.importorskip("torch")
    from qwen3vl_lab.shapes.train import (
        SampledSoftmax,
        TaskRows,
        TrainConfig,
        build_model,
        make_batch,
        make_optimizer,
        task_row_ids,
        train_step,
    )

    torch.set_num_threads(2)
    cfg = TrainConfig(batch_size=4, steps=2, negatives=64)
    rows = task_row_ids(encoder)
    batch = make_batch(encoder, cfg, 0)
    assert set(np.unique(batch.input_ids)) <= set(rows.tolist())  # every input token has a trainable row

    def first_loss(model):
        loss_fn = SampledSoftmax(rows, model.config.text_config.vocab_size, cfg.negatives, 0)
        opt = make_optimizer(model, cfg)
        return train_step(model, opt, loss_fn, batch, 1e-3, 1.0)[0], opt

    full_model = build_model(0)
    full_loss, _ = first_loss(full_model)
    model = build_model(0)
    before = model.model.language_model.embed_tokens.weight.detach().clone()
    task = TaskRows(model, rows)
    loss, opt = first_loss(model)
    assert abs(loss - full_loss) < 1e-5 * max(1.0, abs(full_loss))
    assert all(p is not model.lm_head.weight for g in opt.param_groups for p in g["params"])  # the big matrix is frozen
    model = task.restore()
    after = model.model.language_model.embed_tokens.weight
    others = np.setdiff1d(np.arange(after.shape[0]), rows)
    assert torch.equal(after[others], before[others])
    assert not torch.equal(after[rows], before[rows])
    assert model.lm_head.weight.data_ptr() == after.data_ptr()  # still tied


def test_position_embedding_init_options():
    """--pos_embed_std re-draws only the vision position table; sincos is MAE's 2-D code (row half, column half)."""
    torch = pytest.importorskip("torch")
    from qwen3vl_lab.shapes.train import build_model, sincos_2d

    code = sincos_2d(48, 64).reshape(48, 48, 64)
    assert np.allclose(code[:, :, :32], code[:, :1, :32]) and np.allclose(code[:, :, 32:], code[:1, :, 32:])
    assert len({row.tobytes() for row in code.reshape(-1, 64)}) == 48 * 48  # every cell of the table differs
    default, normal, sincos = build_model(0), build_model(0, 0.1), build_model(0, 0.1, "sincos")
    assert abs(float(default.model.visual.pos_embed.weight.detach().std()) - 0.02) < 0.002  # transformers' initializer_range
    assert abs(float(normal.model.visual.pos_embed.weight.detach().std()) - 0.1) < 0.005
    assert torch.allclose(sincos.model.visual.pos_embed.weight, torch.as_tensor(sincos_2d(48, 64)) * 0.1)
    assert torch.equal(default.model.visual.patch_embed.proj.weight, normal.model.visual.patch_embed.proj.weight)


def test_train_extra_pins_the_same_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["optional-dependencies"]["train"]


# -- the shipped trained model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    from qwen3vl_lab.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("shapes") / "qwen3vl-shapes", preset="shapes", trained=True)


@pytest.fixture(scope="module")
def shapes_onnx(trained_dir, tmp_path_factory):
    from qwen3vl_lab.export.exporter import export

    out = tmp_path_factory.mktemp("shapes") / "onnx"
    export(trained_dir, out, progress=False, log=lambda _: None)
    return out


def test_shipped_checkpoint_is_a_full_bf16_qwen3vl_with_its_recipe(trained_dir):
    from qwen3vl_lab.export.checkpoint import Checkpoint
    from qwen3vl_lab.export.tiny import trained_model_dir

    config = json.loads((trained_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["text_config"]["vocab_size"] == 151936 and config["dtype"] == "bfloat16"
    ckpt = Checkpoint.open(trained_dir)
    info = ckpt.info("model.language_model.embed_tokens.weight")
    assert info.shape == (151936, 128) and info.dtype == "BF16"
    assert (trained_dir / "vocab.json").is_file() and (trained_dir / "TRAINING.md").is_file()
    shipped = Path(str(trained_model_dir()))
    assert not (shipped / "vocab.json").exists()  # the tokenizer ships once, in data/tokenizer
    record = json.loads((trained_dir / "training.json").read_text())
    saved = record["eval"]["saved"]  # what training measured on 400 held-out scenes (see TRAINING.md)
    assert record["eval"]["scenes"] == 400 and record["config"]["init_from"] is None  # one run, from scratch
    for key in ("1_object", "describe", "colour", "shape"):
        assert saved[key]["accuracy"] >= 0.95, (key, saved[key])
    pre = json.loads((trained_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"longest_edge": 9216, "shortest_edge": 9216}


def transformers_answers(model, scenes_and_questions):
    from qwen3vl_lab.export.tiny import preprocessor_config
    from qwen3vl_lab.image import ImageProcessorConfig
    from qwen3vl_lab.shapes.train import Encoder, greedy_answers
    from qwen3vl_lab.tokenizer import load_tokenizer

    enc = Encoder(load_tokenizer(), ImageProcessorConfig.from_dict(preprocessor_config("shapes")))
    images = [im for im, _ in scenes_and_questions]
    return greedy_answers(model, enc, images, [q for _, q in scenes_and_questions])


FIXED = [  # hand-written scenes and answers: none of them is a training image (training scenes are jittered)
    ([("red", "circle", "left")], "What colour is the circle?", "Red."),
    ([("green", "triangle", "top right")], "Where is the triangle?", "At the top right."),
    ([("blue", "square", "center")], "What shape is the blue object?", "A square."),
    ([("yellow", "circle", "bottom")], "What is in the image?", "A yellow circle at the bottom."),
    ([("red", "triangle", "top left"), ("blue", "circle", "bottom right")], "What shape is the blue object?",
     "A circle."),
    ([("green", "square", "right"), ("yellow", "triangle", "left")], "What shape is the yellow object?",
     "A triangle."),
    ([("green", "square", "right"), ("yellow", "triangle", "left")], "What colour is the square?", "Green."),
    ([("blue", "triangle", "top"), ("red", "square", "bottom left")], "What is in the image?",
     "A blue triangle at the top and a red square at the bottom left."),
]


def test_transformers_answers_fixed_questions_correctly(trained_dir, hf_model_factory):
    model = hf_model_factory(trained_dir)
    items = [(shapes.make_scene(spec)[0], q) for spec, q, _ in FIXED]
    assert transformers_answers(model, items) == [a for _, _, a in FIXED]


@pytest.fixture(scope="module")
def twenty_scenes():
    items, expected, objects_of = [], [], {}
    for image, objects in shapes.heldout_set(20, seed=5):
        objects_of[id(image)] = objects
        for qa in shapes.question_answer_pairs(objects):
            items.append((image, qa.question))
            expected.append(qa.answer)
    return items, expected, objects_of


def test_onnx_fp32_answers_exactly_like_transformers(trained_dir, shapes_onnx, hf_model_factory, twenty_scenes):
    from qwen3vl_lab.model import load_model
    from qwen3vl_lab.shapes.evaluate import answer, cached_vision

    items, expected, twenty_objects = twenty_scenes
    ref = transformers_answers(hf_model_factory(trained_dir), items)
    model = load_model(shapes_onnx, "fp32")
    ours, encoders = [], {}
    for image, q in items:
        enc = encoders.setdefault(id(image), cached_vision(model))
        ours.append(answer(model, image, q, enc))
    assert ours == ref
    one_object = [a == b for a, b, (image, _) in zip(ours, expected, items) if len(twenty_objects[id(image)]) == 1]
    assert len(one_object) == 40 and np.mean(one_object) >= 0.9, np.mean(one_object)


def test_eval_shapes_cli(shapes_onnx, capsys):
    from qwen3vl_lab.apps.cli import main

    assert main(["eval-shapes", "--model_dir", str(shapes_onnx), "--n", "10", "--quiet", "--json"]) == 0
    out = capsys.readouterr().out
    for kind in shapes.QUESTION_TYPES:
        assert re.search(rf"^\s+{kind}\s+\d+\.\d%", out, re.M), out
    table = json.loads(out.strip().splitlines()[-1])["accuracy"]
    assert table["all"]["total"] == 5 * 4 + 5 * 7  # 5 one-object and 5 two-object scenes, every question
    assert table["1_object"]["accuracy"] >= 0.9 and table["describe"]["accuracy"] >= 0.9, table


def test_make_tiny_trained_cli_and_its_errors(tmp_path, capsys):
    from qwen3vl_lab.apps.cli import main

    assert main(["make-tiny", "--trained", "--output_dir", str(tmp_path / "m")]) == 0
    assert "trained shapes" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").stat().st_size < 45 * 2**20
    assert main(["make-tiny", "--trained", "--preset", "tiny", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "preset 'shapes'" in err
    assert not (tmp_path / "x").exists()
    assert main(["eval-shapes", "--model_dir", str(tmp_path / "nothing"), "--n", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval-shapes", "--model_dir", str(tmp_path / "m"), "--n", "0"])
    assert e.value.code == 2 and "--n must be an integer from 1 to 100,000" in capsys.readouterr().err


def test_trained_float32_and_legacy_copies_hold_the_same_weights(trained_dir, tmp_path):
    from qwen3vl_lab.export.checkpoint import Checkpoint
    from qwen3vl_lab.export.tiny import make_tiny

    out = make_tiny(tmp_path / "f32", preset="shapes", trained=True, dtype="float32", config_style="legacy")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "rope_scaling" in config["text_config"]
    a, b = Checkpoint.open(trained_dir), Checkpoint.open(out)
    assert sorted(a.names()) == sorted(b.names())
    assert b.info("model.language_model.norm.weight").dtype == "F32"
    for name in ("model.language_model.embed_tokens.weight", "model.visual.blocks.1.attn.qkv.weight"):
        assert np.array_equal(a.get(name), b.get(name))


def test_keyword_attention_points_at_the_asked_object(trained_dir, tmp_path_factory):
    """From the position that predicts the colour / shape word, some layer's heads put most of their image
    attention on the object's cell (uniform over the 9 cells would be 11%)."""
    from qwen3vl_lab.export.exporter import export
    from qwen3vl_lab.model import load_model
    from qwen3vl_lab.shapes.evaluate import keyword_attention

    out = tmp_path_factory.mktemp("shapes") / "onnx-attn"
    export(trained_dir, out, with_attentions=True, progress=False, log=lambda _: None)
    model = load_model(out, "fp32")
    shares = {"colour": [], "shape": []}
    for image, objects in shapes.heldout_set(8, seed=3, n_objects=1):
        for qa in shapes.question_answer_pairs(objects, kinds=("colour", "shape")):
            ka = keyword_attention(model, image, qa)
            assert ka.keyword_token.strip().lower() == qa.word
            assert ka.image_attention.shape == (4, 4, 9) and ka.object_cell == objects[0].cell
            shares[qa.kind].append(ka.layer_share())  # (L,)
    for kind, s in shares.items():
        assert np.mean(s, axis=0).max() > 0.4, (kind, np.mean(s, axis=0))


@pytest.mark.parametrize("flags, needle", [
    (("--lr", "0"), "--lr"),
    (("--pos_embed_std", "-1"), "--pos_embed_std"),
    (("--seed", "-2"), "--seed"),
    (("--steps", "0"), "--steps"),
    (("--pos_embed_init", "uniform"), "--pos_embed_init"),
])
def test_train_shapes_bad_values_are_one_line_errors(tmp_path, capsys, flags, needle):
    from helpers import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "train-shapes", "--output_dir", str(tmp_path / "out"), *flags)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()
