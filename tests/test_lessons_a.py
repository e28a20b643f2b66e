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


# -- the lessons' figures and numbers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def text_2b():
    from qwen3vl_lab.config import parse_hf_config
    from qwen3vl_lab.export.tiny import hf_config_dict

    return parse_hf_config(hf_config_dict("2b")).text


def test_blocked_layout_is_qwen25_vl_contiguous_split():
    from qwen3vl_lab.viz.positions import QWEN25_VL_SECTION, blocked_channel_axes

    axes = blocked_channel_axes(QWEN25_VL_SECTION, 128)  # transformers' qwen2_5_vl split([16, 24, 24])
    assert "".join(axes) == "T" * 16 + "H" * 24 + "W" * 24


def test_rope_scores_depend_on_position_differences_only(text_2b):
    from qwen3vl_lab.viz.positions import relative_score_maps, rope_score

    q, k = np.random.default_rng(1).normal(size=(2, text_2b.head_dim))
    assert np.isclose(rope_score(text_2b, q, k, (3, 9, 4), (1, 2, 2)), rope_score(text_2b, q, k, (53, 17, 40), (51, 10, 38)))
    assert not np.isclose(rope_score(text_2b, q, k, (3, 9, 4), (1, 2, 2)), rope_score(text_2b, q, k, (3, 9, 4), (1, 3, 2)))
    # a text token (p, p, p) is turned like 1-D RoPE: pair (j, j + hd/2) by p * theta^(-2j/hd)
    j, p = 5, 7
    x = np.zeros(text_2b.head_dim)
    x[j] = 1.0
    angle = p * text_2b.rope_theta ** (-2 * j / text_2b.head_dim)
    from qwen3vl_lab.viz.positions import mrope_angles, rotate

    turned = rotate(x, mrope_angles(text_2b, (p, p, p)))
    assert np.isclose(turned[j], np.cos(angle), atol=1e-6) and np.isclose(turned[j + 64], np.sin(angle), atol=1e-6)
    mrope, flat = relative_score_maps(text_2b, (5, 5), (2, 2))
    assert mrope.shape == flat.shape == (5, 5) and np.isclose(mrope[2, 2], flat[2, 2])


def test_kv_bytes_at_2b_dims(text_2b):
    from qwen3vl_lab.viz.cache import kv_bytes

    assert int(kv_bytes(text_2b, 1)) == 224 * 1024  # 2 x 28 layers x 8 kv heads x 128 x 4 bytes
    assert int(kv_bytes(text_2b, 1, kv_heads=text_2b.num_attention_heads)) == 448 * 1024
    assert int(kv_bytes(text_2b, 4096, dtype_bytes=2)) == 112 * 1024 * 4096


def test_step_macs_formulas(text_2b):
    from qwen3vl_lab.viz.cache import step_macs

    assert step_macs(text_2b, 1, True) == step_macs(text_2b, 1, False), "one token: nothing to reuse"
    d, ff, L = text_2b.hidden_size, text_2b.intermediate_size, text_2b.num_hidden_layers
    dense = d * (2048 + 2 * 1024) + 2048 * d + 3 * d * ff  # q 16 x 128, k and v 8 x 128, o, the MLP
    assert step_macs(text_2b, 10, True) - step_macs(text_2b, 9, True) == L * 2 * 2048  # one more key: O(d)
    assert step_macs(text_2b, 10, False) - step_macs(text_2b, 9, False) == L * (dense + 2 * 2048 * 10)


def test_cache_speed_is_measured_on_both_decoders(shapes_prompt):
    import matplotlib

    matplotlib.use("Agg")
    from qwen3vl_lab.viz.cache import measure_cache_speed, plot_cache_speed

    model, _ = shapes_prompt
    timings = [measure_cache_speed(model, lengths=(8, 16), repeats=1, fast=fast) for fast in (True, False)]
    for t in timings:
        assert t.lengths.tolist() == [8, 16] and (t.cached_ms > 0).all() and (t.recomputed_ms > 0).all()
    assert len(plot_cache_speed(*timings).axes[0].lines) >= 4


def test_lesson_figures_draw(text_2b):
    import matplotlib

    matplotlib.use("Agg")
    from qwen3vl_lab.viz.cache import plot_kv_memory
    from qwen3vl_lab.viz.positions import plot_mrope_layouts, plot_relative_scores, plot_rotation_pair

    assert [ax.get_title().split(",")[0] for ax in plot_mrope_layouts(text_2b).axes[:2]] == \
        ["blocked (Qwen2.5-VL)", "interleaved (Qwen3-VL)"]
    assert len(plot_relative_scores(text_2b, grid=(4, 4), query_cell=(1, 1)).axes) == 3  # two maps + colour bar
    assert "turn together" in plot_rotation_pair(text_2b).axes[0].get_title()
    assert len(plot_kv_memory(text_2b).axes[0].get_legend().get_texts()) == 4  # fp32/fp16 x GQA/MHA
