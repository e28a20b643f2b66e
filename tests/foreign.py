"""Foreign Qwen3-VL ONNX exports, built on tiny checkpoints for the tests (no network, seconds each).

The session fixtures at the end of conftest.py call these; each returns the folder it wrote.

    make_guide_export(hf_dir, out)       the original guide's layout: a plain-Qwen3 decoder (no position_ids,
                                         no DeepStack) from onnxruntime-genai's builder, fp32 + INT4, a Gather
                                         embedding model, pytorch/ = the Hugging Face folder
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

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3vl_lab.export.genai_config import write_genai_config
from qwen3vl_lab.layouts import read_export_config

VL_PREFIX = "model.language_model."  # Qwen3-VL's text weights; a Qwen3ForCausalLM has them under "model."
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json")
GUIDE_EMBEDDING = "qwen3vl-embedding.onnx"  # the guide's file name (cpu-fp32 only)
# the guide's INT4 recipe: RTN, block 32, accuracy_level 4, lm_head quantized too (the builder's default).
# onnxruntime-genai 0.18 silently ignores the deprecated `int4_`-prefixed spellings the guide passes
# (`int4_algo_config=rtn` builds the same graph as no option), so the current names are used.
GUIDE_INT4_OPTIONS = {"algo_config": "rtn", "block_size": "32", "accuracy_level": "4"}


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


def _safetensors_files(hf_dir: Path) -> list[Path]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no .safetensors file")
    return files


def read_text_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    """The text model's tensors under Qwen3ForCausalLM names (`model.language_model.*` -> `model.*`)."""
    out: dict[str, np.ndarray] = {}
    for path in _safetensors_files(hf_dir):
        with safe_open(str(path), "np") as f:
            for name in f.keys():
                if name.startswith(VL_PREFIX):
                    out["model." + name[len(VL_PREFIX):]] = f.get_tensor(name)
                elif name == "lm_head.weight":
                    out[name] = f.get_tensor(name)
    return out


def qwen3_text_checkpoint(hf_dir: str | Path, out: str | Path) -> Path:
    """The text part of a Qwen3-VL checkpoint saved as a Qwen3ForCausalLM checkpoint (same sizes, same tying).

    `rope_theta` sits at the config's root (the guide adds it there by hand: the builder reads it
    there). The tokenizer and generation config come along, so the builder writes the real
    tokenizer.json and the eos ids [im_end, endoftext]."""
    hf_dir, out = Path(hf_dir), Path(out)
    out.mkdir(parents=True)
    vl = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    t = vl["text_config"]
    theta = t["rope_parameters"]["rope_theta"]
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
            "attention_bias", "bos_token_id", "eos_token_id")
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **{k: t[k] for k in keys},
              "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
              "tie_word_embeddings": vl.get("tie_word_embeddings", False), "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(read_text_weights(hf_dir), str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    return out


def genai_build(hf_dir: str | Path, out: str | Path, precision: str, extra: dict[str, str] | None = None) -> Path:
    """`python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu --extra_options ...`, in process."""
    # heavy optional dependency (imports torch and transformers): only the tests that build a foreign export pay it
    from onnxruntime_genai.models import builder  # noqa: PLC0415

    out = Path(out)
    cache = out.parent / f".{out.name}-cache"
    options = [f"{k}={v}" for k, v in (extra or {}).items()]
    prepared = builder.parse_extra_options(None, str(hf_dir), str(out), precision, "cpu", str(cache), options)
    builder.create_model(None, str(hf_dir), str(out), precision, "cpu", str(cache), **prepared)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def write_gather_embedding(hf_dir: str | Path, path: str | Path) -> Path:
    """The guide's embedding model: input_ids (B, S) int64 -> inputs_embeds (B, S, H) f32, one Gather, opset 17.

    (The guide makes it with torch.onnx.export of embed_tokens; the graph is this one Gather.)"""
    weights = read_text_weights(Path(hf_dir))
    table = weights["model.embed_tokens.weight"].astype(np.float32)  # (V, H)
    hidden = table.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], name="/embed_tokens/Gather")],
        "embed_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden])],
        [onnx.numpy_helper.from_array(table, "embed_tokens.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch",
                              ir_version=8)  # what torch.onnx.export writes for opset 17
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def set_genai_type(folder: Path, model_type: str) -> None:
    """Edit genai_config.json's model.type (the guide's step 6 does this by hand)."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["type"] = model_type
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


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
# 1. The original guide's export
# ---------------------------------------------------------------------------------------------------


def make_guide_export(hf_dir: str | Path, out: str | Path) -> Path:
    """MODEL/cpu-fp32/{qwen3vl-embedding.onnx, model.onnx(+.data), genai_config.json, tokenizer files},
    MODEL/cpu-int4/{model.onnx(+.data), genai_config.json, tokenizer files}, MODEL/pytorch/ (the HF folder).

    The decoder: onnxruntime-genai's builder on the text part saved as a Qwen3 checkpoint, with
    exclude_embeds=true; INT4 with the guide's recipe. model.type is "qwen3" (the guide's hand edit)."""
    hf_dir, out = Path(hf_dir), Path(out)
    out.mkdir(parents=True)
    text_ckpt = qwen3_text_checkpoint(hf_dir, out / ".qwen3-text")
    fp32 = genai_build(text_ckpt, out / "cpu-fp32", "fp32", {"exclude_embeds": "true"})
    int4 = genai_build(text_ckpt, out / "cpu-int4", "int4", {"exclude_embeds": "true", **GUIDE_INT4_OPTIONS})
    shutil.rmtree(text_ckpt)
    for folder in (fp32, int4):
        set_genai_type(folder, "qwen3")
    write_gather_embedding(hf_dir, fp32 / GUIDE_EMBEDDING)
    shutil.copytree(hf_dir, out / "pytorch")
    return out


# ---------------------------------------------------------------------------------------------------
# 2. onnxruntime-genai's own builder on the Qwen3-VL checkpoint
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
