"""`qwen3vl-lab export`: a Hugging Face Qwen3-VL checkpoint folder -> the ONNX layout the runtime reads.

    OUT/cpu-fp32/qwen3vl-embedding.onnx  (+ .data)   input_ids -> inputs_embeds
    OUT/cpu-fp32/qwen3vl-vision.onnx     (+ .data)   pixel patches -> image features + DeepStack features
    OUT/cpu-fp32/model.onnx              (+ .data)   the text decoder with KV cache and 3-D positions
    OUT/cpu-fp32/model-fast.onnx                     the same decoder with fused onnxruntime ops, reading
                                                     model.onnx.data (decoder_fast.py; every precision)
    OUT/cpu-fp32/genai_config.json                   onnxruntime-genai's schema only: og.Model(OUT/cpu-fp32) loads it
    OUT/cpu-fp32/qwen3vl_lab.json                    our settings (model config, precision, recipe; genai_config.py)
    OUT/cpu-fp32/qwen3vl-embedding-genai.onnx        the embedding onnxruntime-genai runs (same weights)
    OUT/cpu-fp32/tokenizer.json, tokenizer_config.json, chat_template.jinja   where onnxruntime-genai looks
    OUT/cpu-int4/...                                 with --precision int4: the decoder's MatMuls as MatMulNBits
                                                     (quantize.py), quantization.json, and the fp32
                                                     embedding/vision files (hard links to cpu-fp32's where
                                                     the filesystem allows, else copies)
    OUT/pytorch/                                     config, tokenizer and preprocessor files

Weights are read one tensor at a time and streamed into the external-data files, and everything
is written into a staging folder that is moved into place only when complete: a failed or
interrupted (Ctrl-C, SIGTERM, SIGHUP) export leaves OUT as it was. Before anything is written, every
tensor's shape is checked against config.json, and every folder the export would replace must be one
it wrote earlier (export/files.py): a user's files are never deleted. Weights holding NaN or infinity
are exported with a warning naming the first such tensor.
"""

from __future__ import annotations

import errno
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig, load_hf_config
from ..errors import PROG, UserError
from ..layout import DECODER_FILE, EMBEDDING_FILE, GENAI_TOKENIZER_FILES, VISION_FILE
from ..paths import output_dir as checked_output_dir
from ..tokenizer import load_tokenizer, shipped_tokenizer_dir
from . import genai_config as gc
from .checkpoint import Checkpoint
from .decoder import PREFIX, build_decoder, build_embedding, lm_head_weight
from .decoder_fast import write_fast_decoder
from .files import check_replaceable, has_genai_marker, legacy_precision_patterns, replace_folder, staging_folder
from .quantize import Int4Recipe, quantize_folder
from .tiny import expected_parameter_shapes
from .vision import build_vision, vision_genai_section

PYTORCH_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer.json",
    "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
PRECISIONS = ("fp32", "int4")  # int4: the fp32 decoder quantized by onnxruntime (export/quantize.py)
INT4_SOURCE = ".fp32-source"  # staging folder of the fp32 graphs an int4-only export quantizes


def precision_dir(precision: str) -> str:
    return f"cpu-{precision}"


VISION_PREFIX = "model.visual."


def _check_checkpoint(cfg: ModelConfig, ckpt: Checkpoint, hf_dir: Path) -> None:
    """Every tensor the export reads exists with the shape config.json implies; the first mismatch is named.

    Reads headers only. The vision tensors are checked when the checkpoint has a vision tower."""
    vision = f"{VISION_PREFIX}patch_embed.proj.weight" in ckpt
    for name, shape in expected_parameter_shapes(cfg).items():
        if name.startswith(VISION_PREFIX) and not vision:
            continue
        if name not in ckpt:
            raise UserError(f"{hf_dir} has no tensor {name!r}, so it is not a complete Qwen3-VL checkpoint for its "
                            "config.json; pass the folder of a Qwen3VLForConditionalGeneration checkpoint")
        found = tuple(ckpt.shape(name))
        if found != tuple(shape):
            raise UserError(f"{hf_dir}/config.json does not match the weights: {name} is {list(found)} but the config "
                            f"implies {list(shape)}; restore the checkpoint's own config.json")


class _CheckedWeights:
    """`ckpt.get`, warning once (on stderr) about the first tensor that holds NaN or infinity."""

    def __init__(self, ckpt: Checkpoint, warn: Callable[[str], None]):
        self.ckpt, self.warn, self.first_bad = ckpt, warn, None

    def __call__(self, name: str) -> np.ndarray:
        w = self.ckpt.get(name)
        if self.first_bad is None and not np.isfinite(w).all():
            self.first_bad = name
            bad = int(w.size - np.isfinite(w).sum())
            self.warn(f"tensor {name} holds {bad} NaN/infinite values of {w.size}: the exported model will compute "
                      "garbage (e.g. '!!!'); check the checkpoint (re-download it, or re-train without overflow)")
        return w


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _legacy_patterns(folder: Path) -> tuple[str, ...]:
    """What an export part written before folders were stamped holds: recognised by our genai_config.json
    (for pytorch/: beside a cpu-* folder that has one). Anything else in such a folder is the user's."""
    if folder.name == "pytorch":
        names = (*PYTORCH_FILES, *(f.name for f in shipped_tokenizer_dir().iterdir()))
        return names if any(has_genai_marker(c) for c in folder.parent.glob("cpu-*")) else ()
    return legacy_precision_patterns(folder)


def estimate_bytes(cfg: ModelConfig, ckpt: Checkpoint, precisions: Sequence[str]) -> tuple[int, int]:
    """(bytes certainly needed, bytes about needed) on disk: the fp32 graphs (always built, in staging) and,
    with int4, a second embedding/vision copy plus a decoder of about a fifth of the fp32 one."""
    sizes = {n: math.prod(ckpt.shape(n)) * 4 for n in ckpt.names()}
    embed = sizes.get(f"{PREFIX}.embed_tokens.weight", 0)
    vision = sum(v for n, v in sizes.items() if n.startswith(VISION_PREFIX))
    decoder = sum(v for n, v in sizes.items() if not n.startswith(VISION_PREFIX)) - embed
    decoder += embed if cfg.tie_word_embeddings or "lm_head.weight" not in sizes else 0  # the head's own copy
    fp32 = embed + vision + decoder
    int4 = embed + vision + decoder // 5 if "int4" in precisions else 0
    return fp32, fp32 + int4


def copy_pytorch_files(hf_dir: Path, dst: Path) -> None:
    """Config, tokenizer and preprocessor files; the shipped tokenizer when the checkpoint has none."""
    dst.mkdir(parents=True)
    for name in PYTORCH_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, dst / name)
    if not any((hf_dir / n).is_file() for n in TOKENIZER_FILES):
        for f in shipped_tokenizer_dir().iterdir():
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def write_tokenizer_files(hf_dir: Path, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja into a precision folder, where
    onnxruntime-genai reads them: transformers' `save_pretrained` of the checkpoint's tokenizer (the
    shipped one when the checkpoint has none), which writes tokenizer.json from vocab.json + merges.txt."""
    tok = load_tokenizer(hf_dir)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=folder) as tmp:
        try:
            tok.save_pretrained(tmp)
        except Exception as e:  # the Rust tokenizers library reports a full disk as a plain Exception
            if "os error 28" in str(e) or "No space left" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", tmp) from None
            raise
        for name in GENAI_TOKENIZER_FILES:
            if (Path(tmp) / name).is_file():
                shutil.move(str(Path(tmp) / name), folder / name)


def export_precision(cfg: ModelConfig, ckpt: Checkpoint, folder: Path, precision: str, *,
                     with_attentions: bool = False, source: dict | None = None, progress: bool = True,
                     weights: Callable[[str], np.ndarray] | None = None) -> None:
    """Write embedding, vision (when the checkpoint has one) and decoder graphs for one precision."""
    folder.mkdir(parents=True)
    weights = weights or ckpt.get
    steps = cfg.text.num_hidden_layers + 2
    with tqdm(total=steps, desc=f"export {precision}", unit="part", disable=not progress) as bar:
        build_embedding(cfg, weights, folder / (EMBEDDING_FILE + ".data")).save(folder / EMBEDDING_FILE)
        gc.write_genai_embedding(folder, cfg)  # onnxruntime-genai's view of the same table
        bar.update(1)
        vision = None
        if has_vision(ckpt):
            build_vision(cfg, weights, folder / (VISION_FILE + ".data")).save(folder / VISION_FILE)
            vision = vision_genai_section(cfg)
        bar.update(1)
        head = lm_head_weight(cfg, weights, set(ckpt.names()))
        build_decoder(cfg, weights, folder / (DECODER_FILE + ".data"), with_attentions=with_attentions,
                      lm_head=head, progress=bar).save(folder / DECODER_FILE)
    write_fast_decoder(folder, cfg)  # model-fast.onnx: the fused graph over the same weights (fast.py)
    config = gc.make_genai_config(cfg, precision, vision=vision, with_attentions=with_attentions, source=source)
    gc.write_genai_config(folder, config)


def has_vision(ckpt: Checkpoint) -> bool:
    try:
        from . import vision  # noqa: F401, PLC0415
    except ImportError:
        return False
    return "model.visual.patch_embed.proj.weight" in ckpt


def export(hf_dir: str | Path, output_dir: str | Path, precisions: Sequence[str] = ("fp32",), *,
           with_attentions: bool = False, progress: bool = True, recipe: Int4Recipe | None = None,
           log: Callable[[str], None] = print, warn: Callable[[str], None] = _warn) -> Path:
    """Export a checkpoint; returns the output folder. Raises UserError on bad input, writing nothing.

    "int4" quantizes the fp32 decoder with `recipe` (default: the GenAI builder's, `Int4Recipe()`).
    Folders already in `output_dir` are replaced only when an earlier export wrote them (export/files.py)."""
    precisions = list(dict.fromkeys(precisions))  # keep order, drop repeats
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UserError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    if not precisions:
        raise UserError(f"no precision given; choose from {', '.join(PRECISIONS)}")
    recipe = (recipe or Int4Recipe()).validate()
    out = checked_output_dir(output_dir, "--output_dir")
    cfg = load_hf_config(hf_dir)
    hf_dir = Path(hf_dir)
    ckpt = Checkpoint.open(hf_dir)
    _check_checkpoint(cfg, ckpt, hf_dir)
    parts = [precision_dir(p) for p in precisions] + ["pytorch"]
    for part in parts:
        check_replaceable(out / part, legacy=_legacy_patterns(out / part))
    need, estimate = estimate_bytes(cfg, ckpt, precisions)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    def remove_created() -> None:
        if created:
            shutil.rmtree(out, ignore_errors=True)

    weights = _CheckedWeights(ckpt, warn)
    t0 = time.perf_counter()
    with staging_folder(out, ".export-", need=need, estimate=estimate, on_error=remove_created) as staging:
        source = {"hf_dir_name": hf_dir.resolve().name}
        fp32_dir = staging / (precision_dir("fp32") if "fp32" in precisions else INT4_SOURCE)
        export_precision(cfg, ckpt, fp32_dir, "fp32", with_attentions=with_attentions, source=source,
                         progress=progress, weights=weights)
        write_tokenizer_files(hf_dir, fp32_dir)  # quantize_folder copies them into cpu-int4
        if "int4" in precisions:
            # embedding/vision: hard links to the fp32 files where the filesystem allows (no second copy)
            quantize_folder(fp32_dir, staging / precision_dir("int4"), recipe, progress=progress, link=True)
            write_fast_decoder(staging / precision_dir("int4"), cfg)  # over the quantized weights
            if "fp32" not in precisions:
                shutil.rmtree(fp32_dir)
        copy_pytorch_files(hf_dir, staging / "pytorch")
        for part in sorted(staging.iterdir()):
            replace_folder(part, out / part.name, legacy=_legacy_patterns(out / part.name))
    log(f"exported {', '.join(precisions)} to {out} in {time.perf_counter() - t0:.1f} s")
    return out
