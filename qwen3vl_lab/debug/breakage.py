"""Deliberately broken copies of an exported folder: known bugs for the doctor to find (and for notebooks to show).

    make_broken("OUT/cpu-fp32", "broken/no-qk-norm", "no_qk_norm")
    run_checklist("broken/no-qk-norm").item("qk_norm").status           # 'fail'

Kinds (each one a bug seen in real Qwen-VL ports):
    no_qk_norm     q_norm / k_norm skipped in every layer (alibaba/MNN#4683)
    no_deepstack   the decoder ignores deepstack_embeds (onnxruntime-genai#1989: "silently drops")
    positions_1d   the rotary embedding reads only the T row of position_ids, as 1-D RoPE would
    eos_missing    genai_config lists only <|endoftext|> as end of sequence
    wrong_type     genai_config model type "qwen3vl" (what the 0.18 builder writes with exclude_embeds)

Graph edits are made on the weight-less graph; the weight files are copied unchanged (or hard-linked).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..config import ENDOFTEXT_TOKEN_ID
from ..errors import UserError
from ..export.genai_config import write_genai_config
from ..layout import DECODER_FILE, DEEPSTACK_EMBEDS, GENAI_CONFIG, POSITION_IDS
from ..layouts import read_export_config

KINDS = ("no_qk_norm", "no_deepstack", "positions_1d", "eos_missing", "wrong_type")


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input reading `old` reads `new` instead (graph outputs keep their names)."""
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def prune_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes nothing depends on, then initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input} | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in used or t.name in {i.name for i in graph.input}]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def _skip_qk_norm(graph: onnx.GraphProto) -> int:
    """Bypass each q/k RMSNorm: its final `Mul(x * inv_rms, weight)` is replaced by x."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    count = 0
    for n in list(graph.node):
        w = [x for x in n.input if x in inits and ("q_norm" in x or "k_norm" in x)]
        if n.op_type != "Mul" or not w:
            continue
        normed = producer[[x for x in n.input if x not in inits][0]]  # Mul(x, inv_rms)
        _rewire(graph, n.output[0], normed.input[0])
        count += 1
    return count


def _skip_deepstack(graph: onnx.GraphProto) -> int:
    """Bypass each `Add(hidden, Gather(deepstack_embeds, j))`."""
    count = 0
    for g in [n for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] == DEEPSTACK_EMBEDS]:
        for add in _consumers(graph, g.output[0]):
            other = [x for x in add.input if x != g.output[0]][0]
            _rewire(graph, add.output[0], other)
            count += 1
    return count


def _positions_1d(graph: onnx.GraphProto) -> int:
    """Feed the T row to all three MRoPE axes: (3, B, S) -> Expand(Unsqueeze(position_ids[0]))."""
    users = _consumers(graph, POSITION_IDS)
    if not users:
        return 0
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "broken/row0"),
                              numpy_helper.from_array(np.array([0], np.int64), "broken/axes0")])
    nodes = [
        helper.make_node("Gather", [POSITION_IDS, "broken/row0"], ["broken/t_row"], name="broken/Gather", axis=0),
        helper.make_node("Unsqueeze", ["broken/t_row", "broken/axes0"], ["broken/t_row3"], name="broken/Unsqueeze"),
        helper.make_node("Shape", [POSITION_IDS], ["broken/shape"], name="broken/Shape"),
        helper.make_node("Expand", ["broken/t_row3", "broken/shape"], ["broken/position_ids_1d"], name="broken/Expand"),
    ]
    for n in users:
        for i, x in enumerate(n.input):
            if x == POSITION_IDS:
                n.input[i] = "broken/position_ids_1d"
    for k, n in enumerate(nodes):
        graph.node.insert(k, n)
    return len(users)


GRAPH_EDITS = {"no_qk_norm": _skip_qk_norm, "no_deepstack": _skip_deepstack, "positions_1d": _positions_1d}


def _copy_folder(src: Path, dst: Path, link: bool) -> None:
    dst.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():
        if f.is_file():
            if link:
                try:
                    os.link(f, dst / f.name)
                    continue
                except OSError:
                    pass
            shutil.copy2(f, dst / f.name)


def make_broken(src_folder: str | Path, dst_folder: str | Path, kind: str, *, link: bool = False) -> Path:
    """Copy one precision folder (cpu-fp32 or cpu-int4) to `dst_folder` with one known bug.

    link=True hard-links the weight files instead of copying them (no disk cost, but while the copy
    exists onnx's own loader refuses the source folder's external data: it rejects hard-linked files;
    onnxruntime and this package do not mind)."""
    src, dst = Path(src_folder), Path(dst_folder)
    if kind not in KINDS:
        raise UserError(f"unknown breakage {kind!r}; choose from {', '.join(KINDS)}")
    if not (src / GENAI_CONFIG).is_file():
        raise UserError(f"{src} is not a precision folder (no {GENAI_CONFIG}); pass e.g. OUT/cpu-fp32")
    if dst.exists():
        raise UserError(f"{dst} already exists; pass a new folder")
    _copy_folder(src, dst, link)
    if kind in GRAPH_EDITS:
        (dst / DECODER_FILE).unlink()  # a hard link: replace, never edit in place
        model = onnx.load(str(src / DECODER_FILE), load_external_data=False)
        if GRAPH_EDITS[kind](model.graph) == 0:
            shutil.rmtree(dst)
            raise UserError(f"{src / DECODER_FILE} has nothing to break for {kind!r}")
        prune_dead(model.graph)
        onnx.save_model(model, str(dst / DECODER_FILE))
    else:
        genai = read_export_config(src)  # genai_config.json + qwen3vl_lab.json
        if kind == "eos_missing":
            genai["model"]["eos_token_id"] = [ENDOFTEXT_TOKEN_ID]
            genai["qwen3vl_lab"]["config"]["eos_token_ids"] = [ENDOFTEXT_TOKEN_ID]
        else:
            genai["model"]["type"] = "qwen3vl"
        write_genai_config(dst, genai)  # a temporary file renamed over the (maybe hard-linked) copy
    genai = read_export_config(dst)
    genai["qwen3vl_lab"].setdefault("source", {})["broken"] = kind
    write_genai_config(dst, genai)
    return dst
