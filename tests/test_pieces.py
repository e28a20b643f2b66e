"""shapes/pieces.py and viz/pieces.py: the piece variants are what they say, made once; the plot draws the numbers.

The measurement itself (image answers break without 3-D positions or DeepStack, text answers do not) is
asserted by notebooks/07_doctor_your_export (tests/test_notebooks.py) on the trained shapes model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.layout import DECODER_FILE, DEEPSTACK_EMBEDS, POSITION_IDS
from qwen3vl_lab.model import load_model
from qwen3vl_lab.shapes.pieces import piece_accuracy, piece_variants, text_answer
from qwen3vl_lab.viz.pieces import plot_piece_accuracy


def _readers(folder, name: str) -> list[str]:
    graph = onnx.load(str(folder / DECODER_FILE), load_external_data=False).graph
    return [n.op_type for n in graph.node if name in n.input]


def test_piece_variants_remove_their_piece_once(shapes_onnx_fp32_dir, tmp_path):
    ours = shapes_onnx_fp32_dir / "cpu-fp32"
    assert _readers(ours, DEEPSTACK_EMBEDS) and _readers(ours, POSITION_IDS)  # the source reads both
    variants = piece_variants(shapes_onnx_fp32_dir, tmp_path, names=["no DeepStack", "neither"])
    assert _readers(variants["no DeepStack"], DEEPSTACK_EMBEDS) == []
    assert _readers(variants["no DeepStack"], POSITION_IDS) == _readers(ours, POSITION_IDS)
    assert _readers(variants["neither"], DEEPSTACK_EMBEDS) == []
    assert _readers(variants["neither"], POSITION_IDS) == ["Gather", "Shape"]  # only the T-row pick reads it
    assert sorted(p.name for p in variants["neither"].parent.iterdir()) == ["fp32"]  # no intermediate copy left
    stamp = (variants["neither"] / DECODER_FILE).stat().st_mtime_ns
    again = piece_variants(shapes_onnx_fp32_dir, tmp_path, names=["neither"])
    assert again["neither"] == variants["neither"] and (again["neither"] / DECODER_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="unknown piece variant"):
        piece_variants(shapes_onnx_fp32_dir, tmp_path, names=["no q_norm"])


def test_piece_accuracy_needs_its_reference_among_the_models(shapes_onnx_fp32_dir):
    model = load_model(shapes_onnx_fp32_dir)
    with pytest.raises(UserError, match="reference 'ours' is not one of the models"):
        piece_accuracy({"theirs": model}, reference="ours", n=1)
    assert text_answer(model, "What colour is the circle?", max_new_tokens=4)  # text-only prompts run


def test_plot_piece_accuracy_draws_the_numbers():
    image, text = [0.9, 0.1, 0.2], [1.0, 1.0, 0.5]
    fig = plot_piece_accuracy(labels=["ours", "a", "b"], image=image, text=text, reference="ours")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert np.allclose(heights, image + text[1:])  # the reference gets no text bar: it is the yardstick
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ours", "a", "b"]
    with pytest.raises(UserError, match="one of each per model"):
        plot_piece_accuracy(labels=["ours"], image=image, text=text)
