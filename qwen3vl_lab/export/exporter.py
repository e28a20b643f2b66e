"""`qwen3vl-lab export`: a Hugging Face Qwen3-VL checkpoint folder -> the ONNX layout the runtime reads.

    OUT/cpu-fp32/qwen3vl-embedding.onnx  (+ .data)   input_ids -> inputs_embeds
    OUT/cpu-fp32/qwen3vl-vision.onnx     (+ .data)   pixel patches -> image features + DeepStack features
    OUT/cpu-fp32/model.onnx              (+ .data)   the text decoder with KV cache and 3-D positions
    OUT/cpu-fp32/model-fast.onnx                     the same decoder with fused onnxruntime ops, reading
                                                     model.onnx.data (decoder_fast.py; every precision)
    OUT/cpu-fp32/genai_config.json
    OUT/cpu-int4/...                                 with --precision int4: the decoder's MatMuls as MatMulNBits
                                                     (quantize.py), quantization.json, and the fp32
                                                     embedding/vision files (hard links to cpu-fp32's where
                                                     the filesystem allows, else copies)
    OUT/pytorch/                                     config, tokenizer and preprocessor files

Weights are read one tensor at a time and streamed into the external-data files, and everything
is written into a staging folder that is moved into place only when complete: a failed or
interrupted export leaves OUT as it was.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..checkpoint import Checkpoint
from ..config import ModelConfig, load_hf_config
from ..errors import UserError
from ..files import replace_folder
from ..layout import DECODER_FILE, EMBEDDING_FILE, VISION_FILE
from ..tokenizer import shipped_tokenizer_dir
from . import genai_config as gc
from .decoder import PREFIX, build_decoder, build_embedding, lm_head_weight
from .decoder_fast import write_fast_decoder
from .quantize import Int4Recipe, quantize_folder

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


def _check_checkpoint(cfg: ModelConfig, ckpt: Checkpoint, hf_dir: Path) -> None:
    needed = [f"{PREFIX}.embed_tokens.weight", f"{PREFIX}.norm.weight",
              f"{PREFIX}.layers.{cfg.text.num_hidden_layers - 1}.mlp.down_proj.weight"]
    if not cfg.tie_word_embeddings:
        needed.append("lm_head.weight")
    for name in needed:
        if name not in ckpt:
            raise UserError(f"{hf_dir} has no tensor {name!r}, so it is not a complete Qwen3-VL checkpoint; "
                            "pass the folder of a Qwen3VLForConditionalGeneration checkpoint")


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


def export_precision(cfg: ModelConfig, ckpt: Checkpoint, folder: Path, precision: str, *,
                     with_attentions: bool = False, source: dict | None = None, progress: bool = True) -> None:
    """Write embedding, vision (when the checkpoint has one) and decoder graphs for one precision."""
    folder.mkdir(parents=True)
    weights = ckpt.get
    steps = cfg.text.num_hidden_layers + 2
    with tqdm(total=steps, desc=f"export {precision}", unit="part", disable=not progress) as bar:
        build_embedding(cfg, weights, folder / (EMBEDDING_FILE + ".data")).save(folder / EMBEDDING_FILE)
        bar.update(1)
        vision = None
        if has_vision(ckpt):
            from .vision import build_vision, vision_genai_section  # noqa: PLC0415 (optional part)

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
           log: Callable[[str], None] = print) -> Path:
    """Export a checkpoint; returns the output folder. Raises UserError on bad input, writing nothing.

    "int4" quantizes the fp32 decoder with `recipe` (default: the GenAI builder's, `Int4Recipe()`)."""
    hf_dir, out = Path(hf_dir), Path(output_dir)
    precisions = list(dict.fromkeys(precisions))  # keep order, drop repeats
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UserError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    if not precisions:
        raise UserError(f"no precision given; choose from {', '.join(PRECISIONS)}")
    recipe = (recipe or Int4Recipe()).validate()
    cfg = load_hf_config(hf_dir)
    ckpt = Checkpoint.open(hf_dir)
    _check_checkpoint(cfg, ckpt, hf_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a folder path")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    t0 = time.perf_counter()
    try:
        source = {"hf_dir_name": hf_dir.resolve().name}
        fp32_dir = staging / (precision_dir("fp32") if "fp32" in precisions else INT4_SOURCE)
        export_precision(cfg, ckpt, fp32_dir, "fp32", with_attentions=with_attentions, source=source,
                         progress=progress)
        if "int4" in precisions:
            # embedding/vision: hard links to the fp32 files where the filesystem allows (no second copy)
            quantize_folder(fp32_dir, staging / precision_dir("int4"), recipe, progress=progress, link=True)
            write_fast_decoder(staging / precision_dir("int4"), cfg)  # over the quantized weights
            if "fp32" not in precisions:
                shutil.rmtree(fp32_dir)
        copy_pytorch_files(hf_dir, staging / "pytorch")
        for part in sorted(staging.iterdir()):
            replace_folder(part, out / part.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log(f"exported {', '.join(precisions)} to {out} in {time.perf_counter() - t0:.1f} s")
    return out
