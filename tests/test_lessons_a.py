"""Notebooks 01-03's exercises (qwen3vl_lab/apps/lessons/{quickstart,mrope,kv_cache}.py): every check passes the
reference solution and catches one wrong solution with the hint meant for it; the shipped CJK font draws tokens."""

import warnings

import numpy as np
import pytest

from qwen3vl_lab.apps.lessons import kv_cache, mrope, quickstart
from qwen3vl_lab.apps.lessons.grading import Mismatch


def not_written(*_):
    raise NotImplementedError


# -- 02: get_rope_index for one image --------------------------------------------------------------
def test_mrope_check_passes_the_reference():
    assert mrope.check_rope_index_one_image(mrope.rope_index_one_image) is True


def test_mrope_check_catches_text_continuing_after_the_token_count():
    def wrong(n_before, grid, n_after):
        pos = mrope.rope_index_one_image(n_before, grid, n_after)
        n_image = grid[1] * grid[2] // 4
        p = n_before + n_image + np.arange(n_after)  # the classic mistake: 1-D counting after the image
        pos[:, n_before + n_image:] = p
        return pos

    with pytest.raises(Mismatch, match="not at s \\+ the number of image tokens"):
        mrope.check_rope_index_one_image(wrong)


def test_mrope_check_catches_swapped_rows_and_columns():
    def wrong(n_before, grid, n_after):
        pos = mrope.rope_index_one_image(n_before, grid, n_after)
        return pos[[0, 2, 1]]

    with pytest.raises(Mismatch, match="h and w are swapped"):
        mrope.check_rope_index_one_image(wrong)


def test_mrope_check_reports_an_unwritten_exercise(capsys):
    assert mrope.check_rope_index_one_image(not_written) is False
    assert "not written yet" in capsys.readouterr().out


def test_mrope_oracle_is_transformers_get_rope_index():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16, out_hidden_size=16,
                           deepstack_visual_indexes=[0]))
    model = Qwen3VLModel(config).eval()
    for n_before, grid, n_after in mrope.CASES:
        ids = np.array([[mrope.TEXT_ID] * n_before + [config.image_token_id] * (grid[1] * grid[2] // 4)
                        + [mrope.TEXT_ID] * n_after])
        with torch.no_grad():
            pos, _ = model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == config.image_token_id) * 1),
                                          image_grid_thw=torch.tensor([grid]))
        np.testing.assert_array_equal(pos.numpy()[:, 0], mrope.oracle(n_before, grid, n_after))
        np.testing.assert_array_equal(pos.numpy()[:, 0], mrope.rope_index_one_image(n_before, grid, n_after))


# -- 03: the cache update and one token's attention ------------------------------------------------
def test_cache_update_check_passes_the_reference():
    assert kv_cache.check_update_cache(kv_cache.update_cache) is True


def test_cache_update_check_catches_the_wrong_axis():
    def wrong(past_k, past_v, k_new, v_new):
        return np.concatenate([past_k, k_new], axis=1), np.concatenate([past_v, v_new], axis=1)

    with pytest.raises(Mismatch, match="concatenate along axis 2"):
        kv_cache.check_update_cache(wrong)


def test_attend_one_check_catches_missing_kv_head_sharing():
    def wrong(q, k, v):  # no GQA: 4 query heads against 2 kv heads do not broadcast
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        p = np.exp(scores - scores.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True) @ v

    with pytest.raises(Mismatch, match="repeat each kv head 2 times"):
        kv_cache.check_attend_one(wrong)


def test_cache_update_check_catches_the_new_token_first():
    def wrong(past_k, past_v, k_new, v_new):
        return np.concatenate([k_new, past_k], axis=2), np.concatenate([v_new, past_v], axis=2)

    with pytest.raises(Mismatch, match="the new token goes last"):
        kv_cache.check_update_cache(wrong)


def test_attend_one_check_passes_the_reference():
    assert kv_cache.check_attend_one(kv_cache.attend_one) is True


def test_attend_one_check_catches_tiled_kv_heads():
    def wrong(q, k, v):  # query head i reads kv head i % KV: np.tile instead of np.repeat
        group = q.shape[1] // k.shape[1]
        return kv_cache.attend_one(q, np.tile(k, (1, group, 1, 1)), np.tile(v, (1, group, 1, 1)))

    with pytest.raises(Mismatch, match="not i % 2 \\(np.tile\\)"):
        kv_cache.check_attend_one(wrong)


def test_attend_one_check_catches_a_missing_scale():
    def wrong(q, k, v):
        return kv_cache.attend_one(q * np.sqrt(q.shape[-1]), k, v)

    with pytest.raises(Mismatch, match="divide the scores by sqrt\\(head_dim\\)"):
        kv_cache.check_attend_one(wrong)


# -- 01: the greedy loop on the trained shapes model -----------------------------------------------
@pytest.fixture(scope="module")
def shapes_prompt(shapes_onnx_fp32_dir):
    from qwen3vl_lab.generate import prepare_multimodal_prompt
    from qwen3vl_lab.model import load_model
    from qwen3vl_lab.shapes import task as shapes

    model = load_model(shapes_onnx_fp32_dir)
    scene, _ = shapes.make_scene(5)
    return model, prepare_multimodal_prompt(model, "What is in the image?", [scene], image_size=(96, 96))


def test_greedy_check_passes_the_reference(shapes_prompt):
    model, prompt = shapes_prompt
    assert quickstart.check_greedy_generate(quickstart.greedy_generate, model, prompt) is True


def test_greedy_check_catches_a_stale_cache(shapes_prompt):
    model, prompt = shapes_prompt
    with pytest.raises(Mismatch, match="the cache the previous step returned"):
        quickstart.check_greedy_generate(quickstart._stale_cache, model, prompt)


def test_greedy_check_catches_missing_rope_deltas(shapes_prompt):
    model, prompt = shapes_prompt
    with pytest.raises(Mismatch, match="pass prompt.positions.rope_deltas"):
        quickstart.check_greedy_generate(quickstart._no_deltas, model, prompt)


# -- the CJK font ----------------------------------------------------------------------------------
def test_viz_draws_cjk_token_labels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from qwen3vl_lab.viz.figure import new_figure, use_cjk_font

    assert use_cjk_font() in matplotlib.rcParams["font.family"]
    fig, ax = new_figure(figsize=(3, 1))
    ax.set_title("的 한국 です")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "cjk.png")
    assert not [w for w in caught if "missing from font" in str(w.message)]
