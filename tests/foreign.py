"""Foreign Qwen3-VL ONNX exports, built on tiny checkpoints for the tests (no network, seconds each).

The session fixtures at the end of conftest.py call these; each returns the folder it wrote.

    make_guide_export(hf_dir, out)       the original guide's layout: a plain-Qwen3 decoder (no position_ids,
                                         no DeepStack) from onnxruntime-genai's builder, fp32 + INT4, a Gather
                                         embedding model, pytorch/ = the Hugging Face folder
                                         (qwen3vl_lab/export/guide.py; `qwen3vl-lab make-guide-export`)
    make_genai_export(hf_dir, out, p)    onnxruntime-genai 0.18's builder on the Qwen3-VL checkpoint itself:
                                         one folder, decoder with input_ids and position_ids (3, B, S)
    make_community_export(ours, out)     the onnx-community / transformers.js split, emulated from our export:
                                         onnx/{embed_tokens,vision_encoder,decoder_model_merged}{,_q4}.onnx, no DeepStack
    make_renamed_export(ours, out)       ours with outputs present_key_values.%d.key/value
    make_no_deepstack_export(ours, out)  ours without the deepstack_embeds input
    make_broken_kv_export(ours, out)     ours with layer 0's present key and value swapped: the prefill is right,
                                         every step that reads the cache is not

The last four copy an export of ours (weights copied, not hard-linked: onnx's loader refuses hard-linked
external data) and edit only the weight-less graphs; they drop model-fast.onnx, whose graph the edit
does not reach. Emulated graphs carry a metadata entry "qwen3vl_lab.emulation" saying what they are.

onnxruntime-genai's builder runs in this process (the first build pays its ~7 s import of torch and
transformers; each build of the tiny model then takes ~2 s).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto

from qwen3vl_lab.export.genai_config import write_genai_config
from qwen3vl_lab.export.guide import genai_build, make_guide_export  # noqa: F401 (conftest imports it from here)
from qwen3vl_lab.layouts import read_export_config


def graph_io(path: str | Path) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
    """(inputs, outputs) of an ONNX file as (name, dtype, shape) with symbolic dims as strings."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append((v.name, TensorProto.DataType.Name(t.elem_type), dims))
        return out

    initializers = {i.name for i in model.graph.initializer}
    return describe(i for i in model.graph.input if i.name not in initializers), describe(model.graph.output)


def op_types(path: str | Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# ---------------------------------------------------------------------------------------------------
# onnxruntime-genai's own builder on the Qwen3-VL checkpoint
# ---------------------------------------------------------------------------------------------------


def make_genai_export(hf_dir: str | Path, out: str | Path, precision: str = "fp32") -> Path:
    """One folder: model.onnx(+.data), genai_config.json (type qwen3_vl_text), tokenizer files.

    Decoder inputs input_ids, attention_mask, position_ids (3, B, S), past_key_values.*; with int4
    the tied embedding is read from the int4 lm_head through GatherBlockQuantized."""
    return genai_build(Path(hf_dir), Path(out), precision)


# ---------------------------------------------------------------------------------------------------
# Graph surgery on weight-less graphs (the weights stay in their external-data files)
# ---------------------------------------------------------------------------------------------------

EMULATION_KEY = "qwen3vl_lab.emulation"
FAST_FILES = ("model-fast.onnx", "model-fast.onnx.data")


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write through a new file (never into a hard-linked one)."""
    path.unlink(missing_ok=True)
    onnx.save(model, str(path))


def mark(model: onnx.ModelProto, text: str) -> None:
    entry = model.metadata_props.add()
    entry.key, entry.value = EMULATION_KEY, text


def rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere: node inputs/outputs, graph inputs/outputs, initializers, value_info.

    A mapping {a: b, b: a} swaps two names."""
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in values:
            v.name = mapping.get(v.name, v.name)


def prune_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def remove_deepstack(model: onnx.ModelProto) -> int:
    """Our decoder as our exporter writes it for a checkpoint without DeepStack: every
    `x + Gather(deepstack_embeds, i)` becomes `x`, and the input is gone. Returns the Adds removed."""
    graph = model.graph
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "deepstack_embeds"]
    adds, rewire = [], {}
    for g in gathers:
        add = next(n for n in graph.node if n.op_type == "Add" and g.output[0] in n.input)
        rewire[add.output[0]] = next(i for i in add.input if i != g.output[0])
        adds.append(add)
    dropped = {id(n) for n in (*gathers, *adds)}
    keep = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    for node in graph.node:
        node.input[:] = [rewire.get(n, n) for n in node.input]
    keep_inputs = [i for i in graph.input if i.name != "deepstack_embeds"]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    prune_unused_initializers(graph)  # the default zeros and the layer-index constants
    return len(adds)


def drop_outputs(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove graph outputs and every node that only they needed."""
    graph = model.graph
    keep = [o for o in graph.output if o.name not in names]
    del graph.output[:]
    graph.output.extend(keep)
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    prune_unused_initializers(graph)


def repoint_external_data(model: onnx.ModelProto, src_dir: Path, dst: Path, suffix: str) -> None:
    """Copy the graph's external-data file(s) beside `dst` as `<dst.name><suffix>` (`_1`, `_2`, ... for more)
    and point its initializers at the copies (offsets unchanged)."""
    locations: dict[str, str] = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entry = next(e for e in t.external_data if e.key == "location")
        if entry.value not in locations:
            n = len(locations)
            locations[entry.value] = f"{dst.name}{suffix}" + (f"_{n}" if n else "")
            shutil.copy2(src_dir / entry.value, dst.parent / locations[entry.value])
        entry.value = locations[entry.value]


def _copy_ours(src_root: Path, out: Path) -> Path:
    """A copy of our export without the fused decoder (its graph is not edited here)."""
    shutil.copytree(src_root, out, ignore=shutil.ignore_patterns(*FAST_FILES))
    return out


def _edit_decoders(root: Path, edit, note: str) -> list[Path]:
    folders = sorted(d for d in root.glob("cpu-*") if (d / "model.onnx").is_file())
    for folder in folders:
        model = load_graph(folder / "model.onnx")
        edit(model)
        mark(model, note)
        save_graph(model, folder / "model.onnx")
    return folders


# ---------------------------------------------------------------------------------------------------
# 3. The onnx-community / transformers.js split
# ---------------------------------------------------------------------------------------------------

COMMUNITY_NOTE = ("onnx-community layout emulated from a qwen3vl-lab export: decoder without DeepStack; the vision "
                  "graph keeps qwen3vl-lab's inputs (precomputed position inputs, not image_grid_thw) and loses "
                  "deepstack_features")
ROOT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")


def make_community_export(ours: str | Path, out: str | Path) -> Path:
    """ROOT/onnx/{embed_tokens,vision_encoder,decoder_model_merged}{"", "_q4"}.onnx (+ .onnx_data) from our
    cpu-fp32 / cpu-int4, and config, generation, preprocessor and tokenizer files at ROOT.

    decoder_model_merged: inputs_embeds, attention_mask, position_ids (3, B, S), past_key_values.*,
    optional num_logits_to_keep; outputs logits, present.*; no DeepStack (removed, not zero-fed)."""
    ours, out = Path(ours), Path(out)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True)
    for precision, suffix in (("fp32", ""), ("int4", "_q4")):
        src = ours / f"cpu-{precision}"
        if not src.is_dir():
            continue
        for name, stem in (("qwen3vl-embedding.onnx", "embed_tokens"), ("qwen3vl-vision.onnx", "vision_encoder"),
                           ("model.onnx", "decoder_model_merged")):
            model = load_graph(src / name)
            if stem == "decoder_model_merged":
                remove_deepstack(model)
                rename_values(model.graph, {"logits_to_keep": "num_logits_to_keep"})
            elif stem == "vision_encoder":
                drop_outputs(model, {"deepstack_features"})
            mark(model, COMMUNITY_NOTE)
            dst = onnx_dir / f"{stem}{suffix}.onnx"
            repoint_external_data(model, src, dst, "_data")
            save_graph(model, dst)
    for name in ROOT_FILES:
        shutil.copy2(ours / "pytorch" / name, out / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(ours / "cpu-fp32" / name, out / name)
    return out


# ---------------------------------------------------------------------------------------------------
# 4-6. Ours, changed in one way
# ---------------------------------------------------------------------------------------------------


def _set_own(root: Path, change) -> None:
    for folder in sorted(root.glob("cpu-*")):
        config = read_export_config(folder)
        change(config)
        config["qwen3vl_lab"].setdefault("source", {})["variant"] = root.name
        write_genai_config(folder, config)


def make_renamed_export(ours: str | Path, out: str | Path) -> Path:
    """Our export with the decoder outputs named present_key_values.%d.key/value (the guide's spelling);
    genai_config.json says so too."""
    root = _copy_ours(Path(ours), Path(out))

    def rename(model):
        rename_values(model.graph, {o.name: "present_key_values." + o.name[len("present."):]
                                    for o in model.graph.output if o.name.startswith("present.")})

    _edit_decoders(root, rename, "present.%d.* renamed present_key_values.%d.*")

    def config(c):
        c["model"]["decoder"]["outputs"].update(present_key_names="present_key_values.%d.key",
                                                present_value_names="present_key_values.%d.value")
    _set_own(root, config)
    return root


def make_no_deepstack_export(ours: str | Path, out: str | Path) -> Path:
    """Our export whose decoder has no deepstack_embeds input (the vision graph still returns DeepStack)."""
    root = _copy_ours(Path(ours), Path(out))
    _edit_decoders(root, remove_deepstack, "deepstack_embeds removed")
    _set_own(root, lambda c: c["qwen3vl_lab"]["decoder"]["inputs"].pop("deepstack_embeds", None))
    return root


BROKEN_LAYER = 0


def make_broken_kv_export(ours: str | Path, out: str | Path) -> Path:
    """Our export whose decoder returns layer 0's value cache as its key cache and vice versa.

    The prefill's logits are untouched (attention uses the right tensors inside the graph); every
    decode step that reads the returned cache disagrees with recomputing the whole sequence."""
    root = _copy_ours(Path(ours), Path(out))
    key, value = f"present.{BROKEN_LAYER}.key", f"present.{BROKEN_LAYER}.value"
    _edit_decoders(root, lambda m: rename_values(m.graph, {key: value, value: key}),
                   f"{key} and {value} swapped (a corrupted KV cache)")
    _set_own(root, lambda c: None)
    return root
