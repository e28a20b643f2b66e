"""The original guide's export of a Qwen3-VL checkpoint: what most users arrive with, rebuilt for comparison.

    make_guide_export("models/Qwen3-VL-2B-Instruct", "models/guide")     # or `qwen3vl-lab make-guide-export`

    MODEL/cpu-fp32/{qwen3vl-embedding.onnx, model.onnx + .data, genai_config.json, tokenizer files}
    MODEL/cpu-int4/{model.onnx + .data, genai_config.json, tokenizer files}
    MODEL/pytorch/                       the Hugging Face checkpoint, copied

The guide builds Qwen3-VL's text model with onnxruntime-genai's builder *as a plain Qwen3 decoder*
(`exclude_embeds=true`): inputs inputs_embeds, attention_mask, past_key_values.*; RoPE applied inside
GroupQueryAttention from the mask (1-D positions: right for text, wrong for image tokens); no DeepStack.
The same decoder comes out of onnxruntime-genai 0.18's own builder when the text part of the
checkpoint is saved as a Qwen3ForCausalLM checkpoint (`model.language_model.*` -> `model.*`, same sizes,
rope_theta at the config's root, same tying), which is what this module does. INT4: RTN, block 32,
accuracy_level 4, lm_head quantized too. The embedding model is one Gather (the guide exports
embed_tokens with torch.onnx.export at opset 17), and genai_config.json's model.type is set to "qwen3"
by hand, as the guide does.

onnxruntime-genai is an optional dependency (`pip install 'qwen3vl-lab[genai]'`). Its builder imports
torch and transformers (~7 s); a small checkpoint is built in this process (the tiny model then takes
~2 s per precision), a large one in a child process per precision, as the guide runs it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import UserError
from ..jsonfile import read_json
from ..paths import existing_dir
from ..paths import output_dir as checked_output_dir
from ..tokenizer import refuse_custom_code
from .checkpoint import Checkpoint, LazyTensor, save_checkpoint_weights
from .files import replace_folder, staging_folder

VL_PREFIX = "model.language_model."  # Qwen3-VL's text weights; a Qwen3ForCausalLM has them under "model."
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json",
                   "chat_template.jinja")
GUIDE_EMBEDDING = "qwen3vl-embedding.onnx"  # the guide's file name (cpu-fp32 only)
# the guide's INT4 recipe: RTN, block 32, accuracy_level 4, lm_head quantized too (the builder's default).
# onnxruntime-genai 0.18 silently ignores the deprecated `int4_`-prefixed spellings the guide passes
# (`int4_algo_config=rtn` builds the same graph as no option), so the current names are used.
GUIDE_INT4_OPTIONS = {"algo_config": "rtn", "block_size": "32", "accuracy_level": "4"}
GENAI_EXTRA = "pip install 'qwen3vl-lab[genai]'"
SEPARATE_PROCESS_BYTES = 1 << 30  # checkpoints larger than this are built in a child process per precision
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
             "attention_bias", "bos_token_id", "eos_token_id")


def _vl_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json; pass a Qwen3-VL checkpoint folder (config.json + safetensors)")
    config = read_json(path, fix="restore the checkpoint's config.json")
    if "text_config" not in config:
        raise UserError(f"{path} has no text_config: not a Qwen3-VL checkpoint; pass a Qwen3-VL checkpoint folder")
    return config


def text_weights(ckpt: Checkpoint) -> dict[str, LazyTensor]:
    """The text model's tensors under Qwen3ForCausalLM names (`model.language_model.*` -> `model.*`), read one at a time."""
    out: dict[str, LazyTensor] = {}
    for name in ckpt.names():
        if name.startswith(VL_PREFIX) or name == "lm_head.weight":
            new = "model." + name[len(VL_PREFIX):] if name.startswith(VL_PREFIX) else name
            out[new] = LazyTensor(ckpt.shape(name), lambda n=name: ckpt.get(n))
    return out


def _save_dtype(ckpt: Checkpoint, names) -> str:
    """bfloat16 when every text tensor is stored BF16 (the builder then loads what the guide's builder loads), else float32."""
    return "bfloat16" if all(ckpt.dtype(n) == "BF16" for n in names) else "float32"


def qwen3_text_checkpoint(hf_dir: str | Path, out: str | Path) -> Path:
    """The text part of a Qwen3-VL checkpoint saved as a Qwen3ForCausalLM checkpoint (same sizes, same tying).

    `rope_theta` sits at the config's root (the guide adds it there by hand: the builder reads it
    there). The tokenizer and generation config come along, so the builder writes the real
    tokenizer.json and the eos ids [im_end, endoftext]. Weights keep their stored precision (bf16 stays
    bf16, exactly); anything else is written float32."""
    hf_dir, out = Path(hf_dir), Path(out)
    vl = _vl_config(hf_dir)
    t = vl["text_config"]
    theta = (t.get("rope_parameters") or {}).get("rope_theta", t.get("rope_theta"))
    ckpt = Checkpoint.open(hf_dir)
    weights = text_weights(ckpt)
    sources = [n for n in ckpt.names() if n.startswith(VL_PREFIX) or n == "lm_head.weight"]
    dtype = _save_dtype(ckpt, sources)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **{k: t[k] for k in TEXT_KEYS if k in t},
              "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
              "tie_word_embeddings": vl.get("tie_word_embeddings", False), "dtype": dtype}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_checkpoint_weights(out, weights, dtype=dtype, max_shard_bytes=4 << 30)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    return out


def _weights_bytes(hf_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(hf_dir).glob("*.safetensors"))


def genai_build(hf_dir: str | Path, out: str | Path, precision: str, extra: dict[str, str] | None = None,
                separate_process: bool | None = None) -> Path:
    """`python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu --extra_options ...`.

    separate_process: run that command in a child process (its output goes to this process's stdout and
    stderr) rather than in this one. Default: for checkpoints over SEPARATE_PROCESS_BYTES, because the
    builder keeps the float32 model in memory while it quantizes (a 2B build peaks near 18 GB in one process)
    and a child returns all of it before the next build starts; small ones build in process (no second ~7 s
    import of torch and transformers)."""
    hf_dir, out = Path(hf_dir), Path(out)
    cache = out.parent / f".{out.name}-cache"
    extra = {**(extra or {}), "hf_remote": "false"}  # its trust_remote_code for transformers: never on
    options = [f"{k}={v}" for k, v in extra.items()]
    if separate_process is None:
        separate_process = _weights_bytes(hf_dir) > SEPARATE_PROCESS_BYTES
    if separate_process:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise UserError(f"building the guide's export needs onnxruntime-genai's builder; {GENAI_EXTRA}")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache)] + (["--extra_options", *options] if options else [])
        code = subprocess.run(cmd).returncode
        shutil.rmtree(cache, ignore_errors=True)
        if code != 0:
            raise UserError(f"onnxruntime-genai's builder failed on {hf_dir} (exit code {code}; its output above "
                            "says why); check the checkpoint, or the builder's version (0.18.0)")
        return out
    try:  # heavy optional dependency (imports torch and transformers): only building a foreign export pays it
        from onnxruntime_genai.models import builder  # noqa: PLC0415 (the optional [genai] extra)
    except ImportError as e:
        raise UserError(f"building the guide's export needs onnxruntime-genai's builder ({e.name or e} is missing); "
                        f"{GENAI_EXTRA}") from None
    prepared = builder.parse_extra_options(None, str(hf_dir), str(out), precision, "cpu", str(cache), options)
    builder.create_model(None, str(hf_dir), str(out), precision, "cpu", str(cache), **prepared)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def write_gather_embedding(hf_dir: str | Path, path: str | Path) -> Path:
    """The guide's embedding model: input_ids (B, S) int64 -> inputs_embeds (B, S, H) f32, one Gather, opset 17.

    (The guide makes it with torch.onnx.export of embed_tokens; the graph is this one Gather.)"""
    table = Checkpoint.open(hf_dir).get(VL_PREFIX + "embed_tokens.weight")  # (V, H) float32
    hidden = table.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], name="/embed_tokens/Gather")],
        "embed_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden])],
        [onnx.numpy_helper.from_array(table.astype(np.float32, copy=False), "embed_tokens.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch",
                              ir_version=8)  # what torch.onnx.export writes for opset 17
    path = Path(path)
    large = table.nbytes > 1 << 30  # a protobuf holds at most 2 GB: big tables go to a .data file beside it
    if not large:
        onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{path.name}.data")
    return path


def set_genai_type(folder: Path, model_type: str) -> None:
    """Edit genai_config.json's model.type (the guide's step 6 does this by hand)."""
    path = Path(folder) / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["type"] = model_type
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass a new --output_dir (nothing of yours is overwritten)")


def _check_apart(out: Path, hf_dir: Path) -> None:
    """The export is built beside `out` and copies the checkpoint into pytorch/: an `out` inside the checkpoint
    would copy its own staging folder into itself (and write into the user's checkpoint)."""
    o, h = out.resolve(), hf_dir.resolve()
    if o == h or h in o.parents or o in h.parents:
        raise UserError(f"--output_dir {out} and --hf_dir {hf_dir} overlap (one is inside the other); pass an "
                        "--output_dir outside the checkpoint folder")


def _build(hf_dir: Path, tmp: Path) -> None:
    text_ckpt = qwen3_text_checkpoint(hf_dir, tmp / ".qwen3-text")
    fp32 = genai_build(text_ckpt, tmp / "cpu-fp32", "fp32", {"exclude_embeds": "true"})
    int4 = genai_build(text_ckpt, tmp / "cpu-int4", "int4", {"exclude_embeds": "true", **GUIDE_INT4_OPTIONS})
    shutil.rmtree(text_ckpt)
    for folder in (fp32, int4):
        set_genai_type(folder, "qwen3")
    write_gather_embedding(hf_dir, fp32 / GUIDE_EMBEDDING)
    shutil.copytree(hf_dir, tmp / "pytorch")


def make_guide_export(hf_dir: str | Path, out: str | Path) -> Path:
    """MODEL/cpu-fp32/{qwen3vl-embedding.onnx, model.onnx(+.data), genai_config.json, tokenizer files},
    MODEL/cpu-int4/{model.onnx(+.data), genai_config.json, tokenizer files}, MODEL/pytorch/ (the HF folder).

    The decoder: onnxruntime-genai's builder on the text part saved as a Qwen3 checkpoint, with
    exclude_embeds=true; INT4 with the guide's recipe. model.type is "qwen3" (the guide's hand edit).
    Built in a hidden staging folder beside `out` (removed on any error or signal), then moved into place;
    an `out` that exists and is not empty is refused."""
    hf_dir = existing_dir(hf_dir, "--hf_dir", fix="pass a Qwen3-VL checkpoint folder (config.json + safetensors)")
    out = checked_output_dir(out, "--output_dir")
    _vl_config(hf_dir)
    refuse_custom_code(hf_dir)  # onnxruntime-genai's builder loads its config and tokenizer with transformers
    _check_output(out)
    _check_apart(out, hf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = _weights_bytes(hf_dir)  # bf16: the Qwen3 copy ~1x, fp32 decoder ~2x, int4 ~0.3x, pytorch/ 1x
    with staging_folder(out.parent, f".{out.name}.tmp-", shown=out, need=weights, estimate=5 * weights) as tmp:
        _build(hf_dir, tmp / "guide")
        _check_output(out)  # still free after the build?
        replace_folder(tmp / "guide", out, what="the original guide's export (make-guide-export)")
    return out


__all__ = ["GUIDE_EMBEDDING", "GUIDE_INT4_OPTIONS", "genai_build", "make_guide_export", "qwen3_text_checkpoint",
           "set_genai_type", "write_gather_embedding"]
