"""An fp32 + INT4 export keeps one copy of what the two folders share.

- cpu-int4's fp32 embedding and vision files are hard links to cpu-fp32's (a copy where linking fails);
- model-fast.onnx holds no weights of its own: every tensor, the fused q/k/v and gate/up ones
  included, is a reference into its folder's model.onnx.data, whose bytes are the concatenation of
  the plain decoder's tensors (checked byte for byte here; tests/test_fast.py checks the tokens);
- a decoder laid out otherwise (an older export) still gets a fast graph, with its own fused bytes.
"""

from __future__ import annotations

import os
import shutil

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.decoder_fast import (
    SourceDecoder,
    contiguous_span,
    fusion_groups,
    write_fast_decoder,
)
from qwen3vl_lab.export.quantize import (
    COPIED_FILES,
    ExternalData,
    carry_initializer,
    quantize_folder,
    read_raw,
)
from qwen3vl_lab.generate import generate_tokens, prepare_prompt
from qwen3vl_lab.layout import DECODER_FILE, FAST_DECODER_FILE
from qwen3vl_lab.model import load_model
from qwen3vl_lab.sampling import greedy


@pytest.fixture(scope="module")
def root(tiny_onnx_dir):
    return tiny_onnx_dir  # shared across test files: never modified in place


def external(t: TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def test_int4_embedding_and_vision_are_the_fp32_files(root):
    for name in COPIED_FILES:
        assert os.path.samefile(root / "cpu-int4" / name, root / "cpu-fp32" / name), name
    ort.InferenceSession(str(root / "cpu-int4" / "qwen3vl-embedding.onnx"), providers=["CPUExecutionProvider"])
    # the caveat the README states: onnx's own loader refuses external data with several links
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(root / "cpu-int4" / "qwen3vl-embedding.onnx"))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_fast_graph_keeps_no_weights_of_its_own(root, precision):
    folder = root / f"cpu-{precision}"
    assert not (folder / (FAST_DECODER_FILE + ".data")).exists()
    fast = onnx.load(str(folder / FAST_DECODER_FILE), load_external_data=False)
    plain = onnx.load(str(folder / DECODER_FILE), load_external_data=False)
    big = [t for t in fast.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert big and all(external(t)["location"] == DECODER_FILE + ".data" for t in big)
    fused = [n for n in fast.graph.node if any(i.endswith("+fused") for i in n.input)]
    if precision == "fp32":
        assert not fused  # fp32 fuses nothing (FastGraph)
        return
    assert len(fused) == 2 * 4  # tiny: (q, k, v) and (gate, up) in each of 4 layers
    source = SourceDecoder(plain, folder)
    inits = {t.name: t for t in fast.graph.initializer}
    for node in fused:
        weights = next(g for g in fusion_groups(source.linear) if source.node_for(g[0]).input[1] + "+fused" == node.input[1])
        members = [source.node_for(w) for w in weights]
        for j in range(1, len(node.input)):  # packed weights, scales (symmetric: no zero points)
            expected = b"".join(read_raw(source.tensor(m.input[j]), folder) for m in members)
            assert read_raw(inits[node.input[j]], folder) == expected


def test_linking_falls_back_to_a_copy(root, tmp_path, monkeypatch):
    def cannot_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cannot_link)
    f = quantize_folder(root / "cpu-fp32", tmp_path / "int4", progress=False, link=True)
    for name in COPIED_FILES:
        assert not os.path.samefile(f / name, root / "cpu-fp32" / name)
        assert (f / name).read_bytes() == (root / "cpu-fp32" / name).read_bytes()


def test_contiguous_span(tmp_path):
    def ext(offset, length, dims=(4, 2), location="m.data", dtype=TensorProto.UINT8):
        t = TensorProto(name="t", data_type=dtype, dims=list(dims), data_location=TensorProto.EXTERNAL)
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    span = contiguous_span([ext(4096, 8), ext(4104, 8, dims=(2, 2)), ext(4112, 4, dims=(2, 2))], tmp_path)
    assert span == ("m.data", 4096, 20)
    assert contiguous_span([ext(0, 8), ext(4096, 8)], tmp_path) is None  # a gap
    assert contiguous_span([ext(8, 8), ext(0, 8)], tmp_path) is None  # the wrong order
    assert contiguous_span([ext(0, 8), ext(8, 8, location="other.data")], tmp_path) is None
    assert contiguous_span([ext(0, 8), ext(8, 8, dims=(4, 3))], tmp_path) is None  # rows of another width
    assert contiguous_span([ext(0, 8), ext(8, 8, dtype=TensorProto.FLOAT)], tmp_path) is None
    inline = TensorProto(name="i", data_type=TensorProto.UINT8, dims=[4, 2], raw_data=bytes(8))
    assert contiguous_span([ext(0, 8), inline], tmp_path) is None
    # a downloaded folder's junk entries: one line naming the tensor and the entry, not a traceback
    for junk, entry in (("1e3", "offset"), ("-8", "offset")):
        with pytest.raises(UserError, match=f"external_data {entry} '{junk}', not a whole number"):
            contiguous_span([ext(0, 8), ext(junk, 8)], tmp_path)
    with pytest.raises(UserError, match="external_data length 'x', not a whole number"):
        contiguous_span([ext(0, 8), ext(8, "x")], tmp_path)
    with pytest.raises(UserError, match="outside"):
        contiguous_span([ext(0, 8), ext(8, 8, location="../m.data")], tmp_path)


def test_a_decoder_laid_out_otherwise_gets_its_own_fused_bytes(root, tmp_path):
    """model.onnx rewritten with every tensor in reverse order (as no export writes it): the fast graph
    concatenates the fused weights into model-fast.onnx.data and generates the same tokens."""
    folder = tmp_path / "int4"
    shutil.copytree(root / "cpu-int4", folder)
    model = onnx.load(str(folder / DECODER_FILE), load_external_data=False)
    (tmp_path / "new").mkdir()
    data = ExternalData(tmp_path / "new" / (DECODER_FILE + ".data"))  # the same file name, a new layout
    try:
        inits = [carry_initializer(t, folder, data) for t in reversed(model.graph.initializer)]
    finally:
        data.close()
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(inits)
    onnx.save_model(model, str(folder / DECODER_FILE))
    os.replace(tmp_path / "new" / (DECODER_FILE + ".data"), folder / (DECODER_FILE + ".data"))
    write_fast_decoder(folder)
    assert (folder / (FAST_DECODER_FILE + ".data")).stat().st_size > 0
    rebuilt, exported = load_model(folder, "int4", open_decoder=False), load_model(root, "int4", open_decoder=False)
    prompt = prepare_prompt(exported, "Hello there")
    tokens = [list(generate_tokens(m, prompt, greedy, 4, eos_token_ids=[], fast=True)) for m in (rebuilt, exported)]
    assert len(tokens[0]) == 4 and tokens[0] == tokens[1]
