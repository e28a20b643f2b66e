"""Foreign Qwen3-VL ONNX exports, built on tiny checkpoints for the tests (no network, seconds each).

The session fixtures at the end of conftest.py call these; each returns the folder it wrote.

    make_guide_export(hf_dir, out)       the original guide's layout: a plain-Qwen3 decoder (no position_ids,
                                         no DeepStack) from onnxruntime-genai's builder, fp32 + INT4, a Gather
                                         embedding model, pytorch/ = the Hugging Face folder
    make_genai_export(hf_dir, out, p)    onnxruntime-genai 0.18's builder on the Qwen3-VL checkpoint itself:
                                         one folder, decoder with input_ids and position_ids (3, B, S)

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
