"""`qwen3vl-lab` (also `python -m qwen3vl_lab`): make-tiny, export, generate, ..., doctor, sweep, bench.

Every user mistake ends in one line on stderr, `qwen3vl-lab: error: <problem>; <fix>`, and exit
code 2 — no traceback.

Each command imports the modules it needs when it runs (the `noqa: PLC0415 (start-up)` imports below):
onnxruntime, onnx and transformers take seconds to import, and `--help` or a bad flag should answer at once.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import re
import sys
import time
from pathlib import Path

from ..errors import PROG, ArgumentParser, UserError
from ..limits import MAX_COMPARED_STEPS, MAX_HELDOUT, address_space_left, max_threads
from ..paths import existing_dir, existing_file, export_path, os_error_message, output_dir
from ..signals import Terminated, deferred_interrupt, terminate_as_interrupt

Parser = ArgumentParser  # argparse whose errors are one line, exit code 2 (errors.py)


# -- value checks (argparse types) -------------------------------------------------------------
def _number(kind, name: str, ok, rule: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text}")
        return value

    return parse


temperature_t = _number(float, "--temperature", lambda v: v >= 0, "a number >= 0 (0 = greedy)")
top_p_t = _number(float, "--top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 disables)")
top_k_t = _number(int, "--top_k", lambda v: v >= 0, "an integer >= 0 (0 disables)")
max_new_t = _number(int, "--max_new_tokens", lambda v: v >= 1, "an integer >= 1")
penalty_t = _number(float, "--repetition_penalty", lambda v: v > 0, "a number > 0 (1 disables)")
seed_t = _number(int, "--seed", lambda v: v >= 0, "an integer >= 0")
threads_t = _number(int, "--threads", lambda v: 1 <= v <= max_threads(),
                    f"an integer from 1 to {max_threads()} (the cores of this machine)")


def text_t(text: str) -> str:
    """A command-line text (--prompt) that is valid UTF-8: undecodable bytes arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"--prompt is not valid UTF-8 text (undecodable byte at character "
                                         f"{e.start}); type it in UTF-8 or set your terminal to UTF-8") from None
    return text
image_size_t = _number(int, "--image_size", lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32 (e.g. 384)")
video_fps_t = _number(float, "--video_fps", lambda v: v > 0, "a number > 0 (frames per second, e.g. 2)")
batch_size_t = _number(int, "--batch_size", lambda v: v >= 1, "an integer >= 1")
prefill_chunk_t = _number(int, "--prefill_chunk", lambda v: v >= 1, "an integer >= 1 (e.g. 1024)")


# -- make-tiny ---------------------------------------------------------------------------------
def add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random-weight Qwen3-VL checkpoint (Hugging Face layout)")
    p.add_argument("--output_dir", required=True, help="folder to create")
    p.add_argument("--seed", type=seed_t, default=0)
    p.add_argument("--preset", default=None,
                   help="tiny (default), tiny-deep, shapes, 2b or 4b (real 2B / 4B dimensions, random weights)")
    p.add_argument("--trained", action="store_true",
                   help="the shipped model trained on the shapes task (preset shapes, bf16): it answers correctly")
    p.add_argument("--outliers", action="store_true",
                   help="with --trained: plant activation outliers (function-preserving; outliers.json says where): "
                        "fp32 answers as before, the default INT4 recipe breaks (the `repair` command's teaching model)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype on disk (default: float32; bfloat16 for the 2b and 4b presets)")
    p.add_argument("--config_style", default="v5", choices=["v5", "legacy"],
                   help="config.json as transformers 5.x writes it, or the Hub's 4.57 style")
    p.add_argument("--untied", action="store_true", help="write a separate lm_head.weight")
    p.add_argument("--max_shard_mb", type=float, default=None, help="split weights into shards of this size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.set_defaults(run=run_make_tiny)


def run_make_tiny(a) -> int:
    from ..export.tiny import make_tiny  # noqa: PLC0415 (start-up)
    t0 = time.perf_counter()
    preset = a.preset or ("shapes" if a.trained else "tiny")
    out = make_tiny(a.output_dir, seed=a.seed, preset=preset, dtype=a.dtype, config_style=a.config_style,
                    tie_word_embeddings=not a.untied, overwrite=a.overwrite, trained=a.trained, outliers=a.outliers,
                    max_shard_bytes=int(a.max_shard_mb * 2**20) if a.max_shard_mb else None)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    what = ("trained shapes (outliers planted: outliers.json)" if a.outliers else "trained shapes") if a.trained else preset
    print(f"wrote {what} checkpoint to {out} ({size / 2**20:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


# -- make-guide-export -------------------------------------------------------------------------
def add_make_guide_export(sub) -> None:
    p = sub.add_parser("make-guide-export",
                       help="build the original guide's export of a checkpoint (plain-Qwen3 decoder: no 3-D positions, "
                            "no DeepStack), to compare with ours; needs the genai extra")
    p.add_argument("--hf_dir", required=True, metavar="CKPT", help="Qwen3-VL checkpoint folder (config.json + safetensors)")
    p.add_argument("--output_dir", required=True,
                   help="folder to create: cpu-fp32/, cpu-int4/, pytorch/ (refused if it exists and is not empty)")
    p.set_defaults(run=run_make_guide_export)


def run_make_guide_export(a) -> int:
    from ..export.guide import make_guide_export  # noqa: PLC0415 (start-up: the builder imports torch on use)

    t0 = time.perf_counter()
    out = make_guide_export(a.hf_dir, a.output_dir)
    print(f"wrote the guide's export of {a.hf_dir} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


# -- export ------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a Hugging Face Qwen3-VL checkpoint to ONNX")
    p.add_argument("--hf_dir", required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--output_dir", required=True, help="where cpu-<precision>/ and pytorch/ are written")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int4"],
                   help="fp32 and/or int4 (int4: the fp32 decoder quantized by onnxruntime's MatMulNBitsQuantizer)")
    p.add_argument("--with_attentions", action="store_true",
                   help="add attention-probability outputs to the decoder (teaching/debugging variant)")
    add_int4_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_export)


def add_int4_options(p) -> None:
    """INT4 recipe options; defaults are the onnxruntime-genai builder's (block 32, symmetric, level 4, int4 head)."""
    g = p.add_argument_group("int4 options (with --precision int4)")
    g.add_argument("--block_size", type=int, default=None, choices=[16, 32, 64, 128, 256],
                   help="weights per scale (default 32)")
    g.add_argument("--asymmetric", action="store_const", const=True, default=None,
                   help="uint4 with zero points (default: symmetric int4)")
    g.add_argument("--accuracy_level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (default 4)")
    g.add_argument("--lm_head", default=None, choices=["int4", "int8", "fp32"], help="lm_head precision (default int4)")
    g.add_argument("--algorithm", default=None, choices=["default", "rtn", "hqq", "k_quant"],
                   help="onnxruntime weight-only algorithm (default: default, the C++ RTN quantizer; hqq needs torch)")


INT4_OPTIONS = ("block_size", "asymmetric", "accuracy_level", "lm_head", "algorithm")


def int4_recipe(a):
    """The Int4Recipe the options ask for (unset options keep the builder defaults)."""
    from ..export.quantize import Int4Recipe  # noqa: PLC0415 (start-up)
    base = Int4Recipe()
    return Int4Recipe(block_size=a.block_size or base.block_size,
                      symmetric=not a.asymmetric if a.asymmetric is not None else base.symmetric,
                      accuracy_level=base.accuracy_level if a.accuracy_level is None else a.accuracy_level,
                      lm_head=a.lm_head or base.lm_head, algorithm=a.algorithm or base.algorithm).validate()


def run_export(a) -> int:
    from ..export.exporter import export  # noqa: PLC0415 (start-up)
    given = [f"--{o}" for o in INT4_OPTIONS if getattr(a, o) is not None]
    if given and "int4" not in a.precision:
        raise UserError(f"{', '.join(given)}: INT4 options need --precision int4 (e.g. --precision fp32 int4)")
    export(a.hf_dir, a.output_dir, a.precision, with_attentions=a.with_attentions, progress=not a.quiet,
           recipe=int4_recipe(a))
    return 0


# -- generate ----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an exported model")
    p.add_argument("--model_dir", default=None,
                   help="an export folder (with cpu-fp32/ or cpu-int4/); default: the trained shapes model (see demo)")
    p.add_argument("--text_precision", default="fp32", choices=["fp32", "int4"])
    p.add_argument("--prompt", type=text_t, help="one user turn (through the chat template unless --raw)")
    p.add_argument("--max_new_tokens", type=max_new_t, default=100)
    p.add_argument("--temperature", type=temperature_t, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top_k", type=top_k_t, default=20, help="0 disables (default 20)")
    p.add_argument("--top_p", type=top_p_t, default=0.8, help="1.0 disables (default 0.8)")
    p.add_argument("--no_sample", action="store_true", help="greedy decoding")
    p.add_argument("--repetition_penalty", type=penalty_t, default=1.0)
    p.add_argument("--seed", type=seed_t, default=None, help="make sampling reproducible")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (token_ids, text, ...) as the last line")
    p.add_argument("--interactive", action="store_true", help="a multi-turn chat; quit/exit/EOF leave")
    p.add_argument("--threads", type=threads_t, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--huge_pages", default="on", choices=["on", "off"],
                   help="the prepacked weights on 2 MiB pages (Linux; default on): 1-3 s more to load a 2B INT4 model, "
                        "8-15%% faster per token (`bench --huge_pages ab` measures it)")
    p.add_argument("--fast", action="store_true",
                   help="decode with the fused decoder and preallocated KV buffers (same tokens, faster)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the user turn (repeatable; images come before the text, in the order given)")
    p.add_argument("--video", action="append", nargs="+", default=[], metavar="VIDEO",
                   help="one video: a video file (mp4, mkv, webm, ...), a folder of frames or a list of frame files "
                        "(repeatable)")
    p.add_argument("--video_fps", type=video_fps_t, default=2.0,
                   help="frames per second to sample from a video file, as transformers does; for a folder or list "
                        "of frames, the rate they were taken at, for their timestamps (default 2)")
    p.add_argument("--image_size", type=image_size_t, default=None, metavar="N",
                   help="resize every image/frame to N x N (multiple of 32, e.g. 384) instead of the native size")
    p.add_argument("--prompts_file", default=None, metavar="FILE",
                   help="many prompts (- reads standard input): one per line, or JSONL lines {\"prompt\": ..., \"images\": [paths]} (image "
                        "paths relative to the current folder or the file's); answers come out in input order")
    p.add_argument("--batch_size", type=batch_size_t, default=8,
                   help="prompts of --prompts_file run together as one left-padded batch (default 8)")
    p.add_argument("--prefill_chunk", type=prefill_chunk_t, default=None, metavar="N",
                   help="run the prompt through the decoder N tokens at a time: same result, less memory on long prompts")
    add_foreign_flags(p)
    p.set_defaults(run=run_generate)


def add_foreign_flags(p) -> None:
    """Flags for exports other tools made (the original guide's, onnxruntime-genai's, onnx-community's)."""
    p.add_argument("--tokenizer_dir", default=None, metavar="DIR",
                   help="where the tokenizer is, when the export has none (default: the export's, else the package's)")
    p.add_argument("--accept_missing", action="store_true",
                   help="run image prompts on a decoder that lacks 3-D positions or DeepStack: the answer differs "
                        "from the model's, and stderr and --json say what was missing")


def borrow_reference_vision(model, accept_missing: bool) -> None:
    """A foreign export with the checkpoint beside it (the guide's pytorch/) and --accept_missing: encode images
    with our vision graph of that checkpoint (built once into the cache), so its decoder can be tried on them."""
    from ..export.cache import reference_export  # noqa: PLC0415 (start-up)
    from ..model import load_model  # noqa: PLC0415 (start-up)

    layout = model.layout
    if model.has_vision or not accept_missing or layout is None or layout.hf_dir is None:
        return
    ref = load_model(reference_export(layout.hf_dir, log=lambda m: say_notices([m])), open_decoder=False)
    model.borrow_vision(ref)
    say_notices([f"images are encoded by our vision graph of {layout.hf_dir} (cached in {ref.root})"])


def say_notices(notices: list[str]) -> None:
    for note in notices:
        print(f"{PROG}: note: {note}", file=sys.stderr)


def _sampling_kwargs(a) -> dict:
    """Sampling settings plus prefill_chunk: everything pipe.stream / iter_results take from the flags."""
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                no_sample=a.no_sample, seed=a.seed, repetition_penalty=a.repetition_penalty,
                prefill_chunk=a.prefill_chunk)


def _video_arg(frames: list[str]):
    """`--video clip.mp4` / `--video DIR` -> the file / folder; `--video f1.png f2.png ...` -> the list of frames."""
    return frames[0] if len(frames) == 1 else list(frames)


MODEL_DIR_FIX = "export a checkpoint with `qwen3vl-lab export` first"
IMAGE_FIX = "check the path, or pass an image file (jpg, png, ...)"


def _check_media_paths(images: list[str], videos: list[list[str]]) -> None:
    """--image files and --video folders / frame files: there and readable, before the model loads."""
    for path in images:
        existing_file(path, "--image", fix=IMAGE_FIX)
    for frames in videos:
        if len(frames) == 1 and Path(frames[0]).is_dir():
            existing_dir(frames[0], "--video", fix="pass a folder of frames or a list of frame files")
            continue
        for path in frames:
            existing_file(path, "--video", fix="pass a folder of frames or a list of frame files")


def run_generate(a) -> int:
    from ..generate import check_has_vision  # noqa: PLC0415 (start-up)
    from ..model import RuntimeOptions  # noqa: PLC0415 (start-up)
    from ..pipeline import Qwen3VLPipeline  # noqa: PLC0415 (start-up)
    defaulted = a.model_dir is None
    if not defaulted:
        export_path(a.model_dir, "--model_dir", fix=MODEL_DIR_FIX)
    _check_media_paths(a.image, a.video)
    items = None
    if a.prompts_file is not None:
        if a.prompt is not None or a.interactive or a.image or a.video:
            raise UserError("--prompts_file runs every prompt of the file; leave out --prompt, --interactive, --image "
                            "and --video (put images per prompt in JSONL lines: {\"prompt\": ..., \"images\": [...]})")
        items = read_prompts_file(a.prompts_file)  # all checked before the model loads
    elif a.prompt is None and not a.interactive:
        raise UserError("nothing to do: pass --prompt TEXT, --prompts_file FILE or --interactive")
    if defaulted:
        a.model_dir = default_model_dir(a)
    pipe = Qwen3VLPipeline(a.model_dir, a.text_precision, RuntimeOptions(threads=a.threads, huge_pages=a.huge_pages == "on"),
                           fast=a.fast,
                           tokenizer_dir=a.tokenizer_dir, accept_missing=a.accept_missing)
    notices = [DEFAULT_MODEL_NOTICE] * defaulted + pipe.notices
    say_notices(notices)
    if items is not None:
        if any(it["images"] or it["videos"] for it in items):
            borrow_reference_vision(pipe.model, a.accept_missing)
        return run_prompts_file(pipe, items, a)
    if a.image or a.video:
        borrow_reference_vision(pipe.model, a.accept_missing)
        check_has_vision(pipe.model)
    a.videos = [_video_arg(v) for v in a.video]
    if a.interactive:
        return interactive(pipe, a)
    box: dict = {}
    t0 = time.perf_counter()
    stream = pipe.stream(a.prompt, raw=a.raw, result=box, images=a.image, videos=a.videos,
                         image_size=a.image_size, video_fps=a.video_fps, **_sampling_kwargs(a))
    with deferred_interrupt() as stop:  # Ctrl-C ends the answer between steps, never inside onnxruntime
        for piece in stream:
            if not a.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
            if stop:
                stream.close()
                raise KeyboardInterrupt
    result = box["result"]
    for missing in result.extra.get("missing", []):
        print(f"{PROG}: note: this answer ran without {missing}", file=sys.stderr)
    if a.json:
        result.extra["seconds"] = round(time.perf_counter() - t0, 4)
        result.extra["notices"] = notices
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


DEFAULT_MODEL_NOTICE = ("no --model_dir: answering with the trained shapes model, which knows only questions about "
                        "shapes scenes (try `qwen3vl-lab demo`); pass --model_dir for your own export")


def default_model_dir(a) -> str:
    """generate without --model_dir: the shipped trained shapes model's export (made into the cache on first use)."""
    from .notebook import shapes_model_dir  # noqa: PLC0415 (start-up)
    if a.text_precision != "fp32":
        raise UserError(f"the default model is exported fp32 only; leave out --text_precision {a.text_precision}, "
                        "or pass --model_dir with an INT4 export")
    return str(shapes_model_dir(progress=True, log=lambda m: say_notices([m])))


PROMPT_KEYS = ("prompt", "images", "videos", "id")


def read_prompts_file(path: str) -> list[dict]:
    """--prompts_file -> [{"prompt", "images", "videos", "id"}, ...]; every line checked, errors name the line.

    A file ending in .jsonl, or whose first prompt line starts with "{", is JSONL; otherwise each
    non-empty line is one prompt. Image/video paths: as given, else relative to the file's folder.
    """
    if path == "-":  # standard input; image paths relative to the current folder
        file, data = Path("<stdin>"), sys.stdin.buffer.read()
    else:
        file = existing_file(path, "--prompts_file", fix="pass a text file with one prompt per line, or JSONL "
                                                        "(- reads standard input)")
        data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts_file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"--prompts_file {path} holds no prompts; write one prompt per line")
    if file.suffix.lower() != ".jsonl" and not lines[0][1].lstrip().startswith("{"):
        return [{"prompt": line, "images": None, "videos": None, "id": None} for _, line in lines]
    return [_jsonl_prompt(file, n, line) for n, line in lines]


def _jsonl_prompt(file: Path, n: int, line: str) -> dict:
    where = f"{file}:{n}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}); write one object per line, e.g. "
                        '{"prompt": "Describe it.", "images": ["a.png"]}') from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise UserError(f'{where} needs a "prompt" string, e.g. {{"prompt": "Describe it.", "images": ["a.png"]}}')
    unknown = sorted(set(item) - set(PROMPT_KEYS))
    if unknown:
        raise UserError(f"{where} has unknown keys {unknown}; use {', '.join(PROMPT_KEYS)}")
    out = {"prompt": item["prompt"], "id": item.get("id")}
    for key in ("images", "videos"):
        paths = item.get(key) or []
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
            raise UserError(f'{where}: "{key}" must be a list of paths, e.g. ["a.png"]')
        out[key] = [_existing_path(where, file, x, key) for x in paths] or None
    return out


def _existing_path(where: str, file: Path, path: str, key: str) -> str:
    for candidate in (Path(path), file.parent / path) if file.name != "<stdin>" else (Path(path),):
        if candidate.exists():
            return str(candidate)
    raise UserError(f"{where}: {key[:-1]} {path} does not exist (looked in the current folder and in {file.parent}); "
                    "check the path")


def run_prompts_file(pipe, items: list[dict], a) -> int:
    """Every prompt of the file, `--batch_size` at a time; one answer (or JSON line) per prompt, in order."""
    from tqdm import tqdm  # noqa: PLC0415 (start-up)
    results = pipe.iter_results([it["prompt"] for it in items], images=[it["images"] for it in items],
                                videos=[it["videos"] for it in items], batch_size=a.batch_size, raw=a.raw,
                                image_size=a.image_size, video_fps=a.video_fps, **_sampling_kwargs(a))
    with tqdm(total=len(items), desc="generate", unit="prompt", file=sys.stderr) as bar:
        for i, (item, result) in enumerate(zip(items, results)):
            if a.json:
                head = {"index": i, **({"id": item["id"]} if item["id"] is not None else {}), "prompt": item["prompt"]}
                bar.write(json.dumps({**head, **result.to_json()}, ensure_ascii=False), file=sys.stdout)
            else:
                bar.write(f"[{i + 1}] {result.text}", file=sys.stdout)
            bar.update(1)
    return 0


def _image_command(line: str, pending: list, image_size) -> None:
    """`/image PATH`: check the file now (one-line error, the chat goes on) and attach it to the next turn."""
    from ..image import ImageProcessorConfig, load_image, target_size  # noqa: PLC0415 (start-up)
    path = line.strip()[len("/image"):].strip()
    if not path:
        raise UserError("/image needs a path, e.g. /image photo.jpg")
    rgb = load_image(path)  # missing / corrupt / zero-size files fail here
    target_size(rgb.shape[0], rgb.shape[1], ImageProcessorConfig(), image_size)  # extreme aspect ratios too
    pending.append(path)
    print(f"[image {path} attached to your next message]", file=sys.stderr)


def interactive(pipe, a) -> int:
    """A chat: the whole history goes through the chat template each turn; Ctrl-C stops an answer.

    `/image PATH` attaches an image to the next message (--image/--video attach to the first). The
    images of earlier turns stay in the history; the pipeline encodes each one only once. When the
    history no longer fits the model's context, the oldest turns are dropped (with a notice).
    """
    from ..generate import ContextOverflow  # noqa: PLC0415 (start-up)
    from ..tokenizer import format_chat  # noqa: PLC0415 (start-up)
    messages: list[dict] = []
    images, videos = [], []  # every image / video of the chat so far, in order
    pending, pending_videos = list(a.image), list(a.videos)
    pipe.tokenizer  # noqa: B018 (load it now: a Ctrl-C must not land in the middle of its import)
    print("Type a message; /image PATH attaches an image; quit, exit or Ctrl-D to leave; Ctrl-C stops an answer.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError as e:
            print(f"{PROG}: error: that message is not valid UTF-8 text (byte {e.start}); type it in UTF-8",
                  file=sys.stderr)
            continue
        if line.strip().lower() in ("quit", "exit"):
            return 0
        if not line.strip():
            continue
        if line.strip().startswith("/image"):
            try:
                borrow_reference_vision(pipe.model, a.accept_missing)
                _image_command(line, pending, a.image_size)
            except UserError as e:
                print(f"{PROG}: error: {e}", file=sys.stderr)
            continue
        content = ([{"type": "image"} for _ in pending] + [{"type": "video"} for _ in pending_videos]
                   + [{"type": "text", "text": line}])
        messages.append({"role": "user", "content": content})
        pieces = []
        try:
            while True:
                try:
                    _answer(pipe, format_chat(pipe.tokenizer, messages), images + pending, videos + pending_videos,
                            a, pieces)
                    break
                except ContextOverflow as e:
                    if len(messages) < 3:  # only this message left: it alone is too long
                        raise
                    images, videos = _drop_oldest_turn(messages, images, videos)
                    print(f"[the chat needs {e.prompt_tokens} tokens but the context holds {e.limit}: "
                          "dropped the oldest turn]", file=sys.stderr)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except UserError as e:  # e.g. the history no longer fits the context: say so, keep the chat going
            print(f"{PROG}: error: {e} (this message and its new images were dropped)", file=sys.stderr)
            messages.pop()
            pending, pending_videos = [], []
            continue
        sys.stdout.write("\n")
        images, videos = images + pending, videos + pending_videos
        pending, pending_videos = [], []
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "".join(pieces)}]})


def _answer(pipe, prompt: str, images: list, videos: list, a, pieces: list) -> None:
    """Stream one answer into `pieces` and stdout. Ctrl-C sets a flag that stops it between decode steps
    (KeyboardInterrupt from here), so onnxruntime is never interrupted mid-run and the chat goes on."""
    with deferred_interrupt() as stop:
        stream = pipe.stream(prompt, raw=True, images=images, videos=videos, image_size=a.image_size,
                             video_fps=a.video_fps, **_sampling_kwargs(a))
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
            if stop:
                break
        stream.close()
        if stop:
            raise KeyboardInterrupt


def _drop_oldest_turn(messages: list[dict], images: list, videos: list) -> tuple[list, list]:
    """Remove the first user message and its answer (in place) and that message's images and videos."""
    first = [c.get("type") for c in messages[0]["content"] if isinstance(c, dict)]
    del messages[:2]
    return images[first.count("image"):], videos[first.count("video"):]


# -- shapes task -------------------------------------------------------------------------------
n_scenes_t = _number(int, "--n", lambda v: 1 <= v <= MAX_HELDOUT, f"an integer from 1 to {MAX_HELDOUT:,} (held-out scenes)")
workers_t = _number(int, "--workers", lambda v: v >= 1, "an integer >= 1")
task_cpus_t = _number(int, "--task_cpus", lambda v: v >= 1, "an integer >= 1")


def add_backend_options(p) -> None:
    """Where a sweep's variant jobs run (debug/cluster.py)."""
    g = p.add_argument_group("where the variants run (default: here, one after another)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run each variant (build, score, clean up) as a Ray task: on the cluster at ADDRESS "
                        "(HOST:PORT or ray://HOST:10001), or RAY_ADDRESS's, or a new local one (needs the ray extra); "
                        "the export and --out_dir must be on a filesystem every node mounts")
    g.add_argument("--workers", type=workers_t, default=1, help="run the variants in N local processes (default 1)")
    g.add_argument("--task_cpus", type=task_cpus_t, default=1,
                   help="CPUs each Ray task declares and its onnxruntime threads (default 1)")
    g.add_argument("--keep_variants", action="store_true",
                   help="with --ray or --workers: keep each built variant in --out_dir (default: removed once scored)")


def backend_of(a):
    from ..debug.cluster import Backend  # noqa: PLC0415 (commands import their modules when they run)

    if a.ray is not None and a.workers > 1:
        raise UserError("--ray and --workers both choose where the variants run; pass one of them")
    if a.ray is None and a.task_cpus != 1:
        raise UserError("--task_cpus is what each Ray task declares; pass --ray too, or leave it out")
    return Backend(workers=a.workers, ray=a.ray is not None, address=a.ray or None, task_cpus=a.task_cpus).validate()


def keep_variants_of(a) -> bool | None:
    return True if a.keep_variants else None



RECIPES_HELP = ("fp32, onnxruntime recipes (e.g. default-b32-sym-acc4-head_int4, "
                "default-2bit-b16-asym-acc4-head_int4), SIMULATED ones (sim-int3-per-tensor, sim-int2-b16-asym-mse: sim-intBITS-bBLOCK|per-tensor[-asym][-mse]"
                "[-head_fp32]), or `contrast` for the built-in fp32 / 4 / 3 / 2-bit list")


def add_eval_shapes(sub) -> None:
    p = sub.add_parser("eval-shapes", help="accuracy of an exported model on fresh held-out shapes scenes (ONNX only)")
    p.add_argument("--model_dir", required=True, help="an export of the shapes model (make-tiny --trained, then export)")
    p.add_argument("--text_precision", default=None, choices=["fp32", "int4"],
                   help="the folder to score (default fp32)")
    p.add_argument("--recipes", nargs="+", default=None, metavar="NAME",
                   help="instead, build these variants from the fp32 export and score each: " + RECIPES_HELP)
    p.add_argument("--out_dir", default=None, help="with --recipes: keep the variants here and reuse them next time "
                                                   "(default: a temporary folder)")
    p.add_argument("--n", type=n_scenes_t, default=200, help="held-out scenes; every question of each (default 200)")
    p.add_argument("--seed", type=seed_t, default=0, help="held-out stream (default 0)")
    p.add_argument("--threads", type=threads_t, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the accuracy table as one JSON object (last line)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_options(p)
    p.set_defaults(run=run_eval_shapes)


def _parse_recipes(names, *, fp32: bool = True):
    """Recipe names from the command line ("contrast" = the built-in list) -> recipes, checked before any work."""
    from ..shapes.accuracy import FP32, contrast_recipes, parse_recipe  # noqa: PLC0415 (start-up)
    recipes = []
    for name in names:
        recipes += contrast_recipes() if name == "contrast" else [parse_recipe(name)]
    if not fp32:
        if FP32 in names:
            raise UserError("fp32 is the sweep's reference, not a recipe to rank; leave it out of --recipes")
        recipes = [r for r in recipes if r != FP32]
    return recipes


def _recipe_accuracy(model_dir, recipes, n: int, seed: int, out_dir, threads, *, quiet: bool, backend=None,
                     keep_variants=None):
    from ..model import RuntimeOptions  # noqa: PLC0415 (start-up)
    from ..shapes.accuracy import recipe_accuracy  # noqa: PLC0415 (start-up)
    return recipe_accuracy(model_dir, recipes, n=n, seed=seed, out_dir=out_dir, options=RuntimeOptions(threads=threads),
                           progress=not quiet, backend=backend, keep_variants=keep_variants)


def _print_recipe_accuracy(result, seconds: float) -> None:
    print(result.table())
    print(f"\nthe same questions, every recipe ({seconds:.1f} s in all):")
    print(result.examples_table())


def run_eval_shapes(a) -> int:
    from ..model import RuntimeOptions, load_model  # noqa: PLC0415 (start-up)
    from ..shapes.evaluate import evaluate_shapes  # noqa: PLC0415 (start-up)
    from ..shapes.task import format_table  # noqa: PLC0415 (start-up)
    existing_dir(a.model_dir, "--model_dir", fix=MODEL_DIR_FIX)
    if a.out_dir is not None:
        output_dir(a.out_dir, "--out_dir")
    backend = backend_of(a)
    if a.recipes:
        if a.text_precision is not None:
            raise UserError("--recipes builds its variants from the fp32 export; leave out --text_precision")
        t0 = time.perf_counter()
        result = _recipe_accuracy(a.model_dir, _parse_recipes(a.recipes), a.n, a.seed, a.out_dir, a.threads,
                                  quiet=a.quiet, backend=backend, keep_variants=keep_variants_of(a))
        _print_recipe_accuracy(result, time.perf_counter() - t0)
        if a.json:
            print(json.dumps(result.to_json()))
        _refuse_failed(result.rows, "computes")
        return 0
    if a.out_dir is not None:
        raise UserError("--out_dir keeps the variants of --recipes; pass --recipes too, or leave out --out_dir")
    if not backend.local or a.keep_variants:
        raise UserError("--ray, --workers and --keep_variants run the variants of --recipes; pass --recipes too")
    a.text_precision = a.text_precision or "fp32"
    model = load_model(a.model_dir, a.text_precision, RuntimeOptions(threads=a.threads))
    t0 = time.perf_counter()
    result = evaluate_shapes(model, n=a.n, seed=a.seed, progress=not a.quiet)
    seconds = time.perf_counter() - t0
    print(f"exact-match accuracy, {a.text_precision}, {a.n} held-out scenes (seed {a.seed}), "
          f"{len(result.predictions)} questions, {seconds:.1f} s:")
    print(format_table(result.table))
    if a.json:
        print(json.dumps({"precision": a.text_precision, "n": a.n, "seed": a.seed, "accuracy": result.table}))
    return 0


def add_train_shapes(sub) -> None:
    p = sub.add_parser("train-shapes", help="train the shapes-task model from scratch (needs the train extra: torch)")
    p.set_defaults(run=run_train_shapes)
    try:
        from ..shapes.train import add_arguments  # noqa: PLC0415 (no torch at import)
    except ImportError:
        return
    add_arguments(p)


def run_train_shapes(a) -> int:
    from ..shapes.train import run  # noqa: PLC0415 (start-up)
    return run(a)


# -- doctor / sweep ------------------------------------------------------------------------------
n_steps_t = _number(int, "--n_steps", lambda v: 1 <= v <= MAX_COMPARED_STEPS,
                    f"an integer from 1 to {MAX_COMPARED_STEPS} (steps compared per prompt)")


def _add_prompt_options(p) -> None:
    p.add_argument("--prompt", action="append", default=None, type=text_t,
                   help="a user turn to compare on (repeat for several; default: three built-in prompts)")
    p.add_argument("--image", default=None, help="an image file: every prompt is also compared with this image")
    p.add_argument("--image_size", type=image_size_t, default=None, help="resize the image to N x N (default: smart_resize)")
    p.add_argument("--n_steps", type=n_steps_t, default=None, help="generated steps compared per prompt")
    p.add_argument("--report_dir", default=None, help="write the figures (PNG) here")


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what an export holds: layout, files, decoder I/O, INT4 recipe per MatMul, "
                                       "embedding and lm_head precision, what is missing (no weights are loaded)")
    p.add_argument("--model_dir", required=True,
                   help="any export: ours, the original guide's, onnxruntime-genai's, onnx-community's, or a decoder .onnx")
    p.add_argument("--text_precision", default=None, help="which precision folder, where there are several (default: fp32)")
    p.add_argument("--tokenizer_dir", default=None, metavar="DIR", help="where the tokenizer is, if not in the export")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object (last line)")
    p.set_defaults(run=run_inspect)


def run_inspect(a) -> int:
    from ..debug.anatomy import describe_export, to_json_line  # noqa: PLC0415 (start-up)

    anatomy = describe_export(a.model_dir, a.text_precision, tokenizer_dir=a.tokenizer_dir)
    print(to_json_line(anatomy) if a.json else anatomy.render())
    return 0


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="find why an INT4 folder disagrees with fp32: checklist, per-step, "
                                      "per-layer and per-weight comparison")
    p.add_argument("--model_dir", required=True, help="an export folder (with cpu-int4/) or one precision folder")
    p.add_argument("--text_precision", default="int4", choices=["fp32", "int4"], help="the folder to diagnose")
    p.add_argument("--reference", default="fp32",
                   help="fp32 (the cpu-fp32 folder of the same export, default) or the path of an fp32 folder")
    _add_prompt_options(p)
    p.add_argument("--hf_dir", default=None, metavar="CKPT",
                   help="the checkpoint the export was made from: our fp32 export of it (built once into the cache) "
                        "probes images, measures the export's own error and ranks INT4 recipes (default: the "
                        "checkpoint a foreign export ships in pytorch/, if any)")
    p.add_argument("--no_recipes", action="store_true", help="skip ranking INT4 recipes on the checkpoint's export")
    p.add_argument("--sweep", action="store_true", help="also build and rank INT4 recipe variants (see `sweep`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tokenizer_dir", default=None, metavar="DIR",
                   help="where the tokenizer is, when the export has none (default: the export's, else the package's)")
    p.set_defaults(run=run_doctor)


def _check_debug_paths(a) -> None:
    """doctor / sweep: every path flag checked before any model loads."""
    export_path(a.model_dir, "--model_dir", fix=MODEL_DIR_FIX)
    if a.image is not None:
        existing_file(a.image, "--image", fix=IMAGE_FIX)
    if getattr(a, "reference", "fp32") != "fp32":
        existing_dir(a.reference, "--reference", fix="pass an fp32 export folder, or leave out --reference to "
                                                     "compare with the cpu-fp32 folder of the same export")
    for flag in ("report_dir", "out_dir"):
        if getattr(a, flag, None) is not None:
            output_dir(getattr(a, flag), f"--{flag}")
    if getattr(a, "report_dir", None) is not None:
        from ..viz.doctor import check_report_dir  # noqa: PLC0415 (start-up: matplotlib)
        check_report_dir(a.report_dir)  # a figure never replaces a file of the user's: refused before the work


def _image_arg(a):
    return a.image


def run_doctor(a) -> int:
    from ..debug.doctor import diagnose  # noqa: PLC0415 (start-up)
    from ..viz.doctor import write_figures  # noqa: PLC0415 (start-up)
    _check_debug_paths(a)
    image = _image_arg(a)
    report = diagnose(a.model_dir, a.text_precision, a.reference, a.prompt, image=image, image_size=a.image_size,
                      n_steps=a.n_steps or 16, progress=not a.quiet, hf_dir=a.hf_dir,
                      recipes=False if a.no_recipes else None, log=lambda m: say_notices([m]))
    print(report.render())
    result = None
    if a.sweep:
        result = _run_sweep(a.model_dir, a.prompt, image, a.image_size, a.n_steps or 12,
                            Path(a.report_dir) / "sweep" if a.report_dir else None, fast=False, quiet=a.quiet)
    if a.report_dir:
        paths = write_figures(report, a.report_dir, sweep=result)
        print(f"\nwrote {len(paths)} figures to {a.report_dir}: {', '.join(p.name for p in paths)}")
    return 0


shapes_t = _number(int, "--shapes", lambda v: v >= 1, "a number of scenes >= 1")


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="build INT4 recipe variants of an fp32 export and rank them by agreement with fp32")
    p.add_argument("--model_dir", required=True, help="an export folder with cpu-fp32/")
    _add_prompt_options(p)
    p.add_argument("--out_dir", default=None, help="keep the variants here (default: a temporary folder)")
    p.add_argument("--recipes", nargs="+", default=None, metavar="NAME",
                   help="recipes to build, e.g. default-b32-sym-acc4-head_int4 rtn-b64-asym-acc0-head_int8 "
                        "default-2bit-b32-sym-acc4-head_int4 sim-int3-per-tensor (SIMULATED: sim-intBITS-bBLOCK|"
                        "per-tensor[-asym][-mse][-head_fp32]) (default: the built-in list)")
    p.add_argument("--fast", action="store_true", help="skip the slow algorithms (k_quant, hqq) of the built-in list")
    p.add_argument("--shapes", type=shapes_t, default=None, metavar="N",
                   help="also score fp32 and every recipe on N held-out scenes of the shapes task (the trained "
                        "shapes model only: make-tiny --trained, then export)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_options(p)
    p.set_defaults(run=run_sweep)


def _run_sweep(model_dir, prompts, image, image_size, n_steps, out_dir, *, fast: bool, quiet: bool, names=None,
               backend=None, keep_variants=None):
    from ..debug.sweep import default_recipes, sweep  # noqa: PLC0415 (start-up)
    recipes = _parse_recipes(names, fp32=False) if names else default_recipes(include_slow=not fast)
    result = sweep(model_dir, recipes, prompts, out_dir=out_dir, n_steps=n_steps, image=image, image_size=image_size,
                   progress=not quiet, backend=backend, keep_variants=keep_variants)
    print()
    print(result.table())
    return result


def _refuse_failed(rows, what: str) -> None:
    """After the table: failed rows end the command with one line, exit 2 (the finished rows stay cached)."""
    failed = [r for r in rows if r.failed]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} recipe(s) failed ({failed[0].name}: {failed[0].error}); "
                        f"the table above keeps the others, and a rerun with the same --out_dir {what} only the failed ones")


def run_sweep(a) -> int:
    import tempfile  # noqa: PLC0415 (start-up)

    from ..debug.sweep import default_recipes  # noqa: PLC0415 (start-up)
    from ..viz.doctor import write_figures  # noqa: PLC0415 (start-up)
    _check_debug_paths(a)
    image = _image_arg(a)
    backend, keep = backend_of(a), keep_variants_of(a)
    if a.shapes is None:
        result = _run_sweep(a.model_dir, a.prompt, image, a.image_size, a.n_steps or 12, a.out_dir,
                            fast=a.fast, quiet=a.quiet, names=a.recipes, backend=backend, keep_variants=keep)
    else:  # accuracy first (a model that is not the shapes model stops here), then the sweep reuses its variants
        recipes = _parse_recipes(a.recipes, fp32=False) if a.recipes else default_recipes(include_slow=not a.fast)
        with tempfile.TemporaryDirectory(prefix="qwen3vl-sweep-") as tmp:
            out_dir = a.out_dir or tmp
            t0 = time.perf_counter()
            accuracy = _recipe_accuracy(a.model_dir, recipes, a.shapes, 0, out_dir, None, quiet=a.quiet,
                                        backend=backend, keep_variants=keep)
            seconds = time.perf_counter() - t0
            result = _run_sweep(a.model_dir, a.prompt, image, a.image_size, a.n_steps or 12, out_dir,
                                fast=a.fast, quiet=a.quiet, names=[r.name for r in recipes], backend=backend,
                                keep_variants=keep)
            print()
            _print_recipe_accuracy(accuracy, seconds)
    if a.report_dir:
        paths = write_figures(None, a.report_dir, sweep=result)
        print(f"wrote {', '.join(str(p) for p in paths)}")
    _refuse_failed(result.rows, "computes")
    return 0


# -- repair ------------------------------------------------------------------------------------
fraction_t = _number(float, "--min_four_bit/--accuracy_budget", lambda v: 0 <= v <= 1, "a fraction from 0 to 1")
kl_t = _number(float, "--kl_budget", lambda v: v > 0, "a number > 0 (nats)")
scenes_t = _number(int, "--calibration", lambda v: v >= 1, "a number of scenes >= 1")


def add_repair(sub) -> None:
    p = sub.add_parser("repair", help="build INT4 candidate fixes (accuracy level, lm_head, equalisation, mixed "
                                      "precision) from an fp32 export, score them against fp32, write the best")
    p.add_argument("--model_dir", required=True, help="an export folder with cpu-fp32/ (a foreign export: export its "
                                                      "checkpoint with `qwen3vl-lab export` and repair that)")
    p.add_argument("--output_dir", required=True, help="where the repaired export goes (cpu-fp32/, cpu-int4/, pytorch/, "
                                                       "repair.json)")
    p.add_argument("--prompt", action="append", default=None, type=text_t,
                   help="a calibration prompt (repeat for several; default: three built-in prompts)")
    p.add_argument("--image", default=None, help="an image file: every calibration prompt is also run with it")
    p.add_argument("--image_size", type=image_size_t, default=None, help="resize the image to N x N")
    p.add_argument("--shapes", type=shapes_t, default=None, metavar="N",
                   help="the trained shapes model: calibrate on shapes scenes and score every candidate on N held-out "
                        "scenes (a stream the calibration never sees)")
    p.add_argument("--calibration", type=scenes_t, default=6, help="with --shapes: calibration scenes (default 6)")
    p.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                   help="only these: default acc0 head_int8 equalised equalised_acc0 int8 nncf_awq mixed_8bit mixed_fp32")
    p.add_argument("--min_four_bit", type=fraction_t, default=0.9,
                   help="share of the decoder layers' weight MatMuls a winner keeps at 4 bits (default 0.9)")
    p.add_argument("--accuracy_budget", type=fraction_t, default=0.03,
                   help="with --shapes: a winner scores at least fp32's accuracy minus this (default 0.03)")
    p.add_argument("--kl_budget", type=kl_t, default=0.05, help="without --shapes: a winner's mean KL (default 0.05)")
    p.add_argument("--work_dir", default=None, help="keep the candidates here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    p.set_defaults(run=run_repair)


def run_repair(a) -> int:
    from ..debug.repair import repair  # noqa: PLC0415 (start-up)
    export_path(a.model_dir, "--model_dir", fix=MODEL_DIR_FIX)
    output_dir(a.output_dir, "--output_dir")
    if a.work_dir is not None:
        output_dir(a.work_dir, "--work_dir")
    if a.image is not None:
        existing_file(a.image, "--image", fix=IMAGE_FIX)
    prompts, scorer = a.prompt, None
    if a.shapes is not None:
        from ..shapes.calibration import calibration_prompts, heldout_scorer  # noqa: PLC0415 (start-up)
        if a.prompt or a.image:
            raise UserError("--shapes calibrates on shapes scenes; leave out --prompt and --image")
        prompts, scorer = calibration_prompts(a.calibration), heldout_scorer(a.shapes)
    elif a.image is not None:
        from ..debug.inputs import as_specs  # noqa: PLC0415 (start-up)
        prompts = as_specs(a.prompt, a.image, a.image_size)
    log = (lambda _: None) if a.json else (lambda m: print(m, file=sys.stderr))
    report = repair(a.model_dir, a.output_dir, prompts, scorer=scorer, work_dir=a.work_dir,
                    min_four_bit=a.min_four_bit, accuracy_budget=a.accuracy_budget, kl_budget=a.kl_budget,
                    candidates=a.candidates, log=log)
    print(report.table())
    print(report.summary())
    for note in report.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if a.json:
        print(json.dumps(report.to_json()))
    return 0


# -- bench -------------------------------------------------------------------------------------
tokens_t = _number(int, "--prompt_tokens/--new_tokens", lambda v: v >= 1, "an integer >= 1")
runs_t = _number(int, "--runs", lambda v: v >= 1, "an integer >= 1")
batch_t = _number(int, "--batch_size", lambda v: v >= 1, "an integer >= 1")
grid_memory_t = _number(float, "--grid_memory", lambda v: v > 0, "a number of GB > 0")
bench_image_t = _number(int, "--image_size", lambda v: v == 0 or (v >= 32 and v % 32 == 0),
                        "0 (skip) or a positive multiple of 32")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="decode/prefill speed of the fast path vs the bandwidth floor (and genai/torch)")
    p.add_argument("--model_dir", required=True, help="an export folder (with cpu-fp32/ or cpu-int4/)")
    p.add_argument("--text_precision", default="fp32", choices=["fp32", "int4"])
    p.add_argument("--prompt_tokens", type=tokens_t, default=32, help="prompt length (default 32)")
    p.add_argument("--new_tokens", type=tokens_t, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--runs", type=runs_t, default=3, help="timed runs; figures are medians (default 3)")
    p.add_argument("--batch_size", type=batch_t, default=1, help="copies of the prompt decoded together")
    p.add_argument("--vs", choices=["genai", "torch"], default=None,
                   help="also run onnxruntime-genai (its builder's export) or transformers' PyTorch model on "
                        "the same checkpoint, alternating A/B")
    p.add_argument("--hf_dir", default=None, help="the Hugging Face checkpoint the export was made from (for --vs)")
    p.add_argument("--genai_dir", default=None,
                   help="where onnxruntime-genai's export lives / is built (default MODEL_DIR/genai-cpu-PRECISION)")
    p.add_argument("--threads", type=threads_t, default=None, help="intra-op threads for every engine (default: cores)")
    p.add_argument("--image_size", type=bench_image_t, default=448, help="vision timing image, N x N (0 skips)")
    p.add_argument("--spinning", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="our onnxruntime threads spin between ops: auto (default: on when other processes leave "
                        "each thread a core, watched for a quarter of a second), on, off")
    p.add_argument("--kernels", action="store_true",
                   help="instead of timing runs: one MatMulNBits of the model's width per bits / block size "
                        "(4/8 bits, blocks 32-128), timed against the bandwidth probe")
    p.add_argument("--huge_pages", default="on", choices=["on", "off", "ab"],
                   help="our prepacked weights on 2 MiB pages (Linux): on (default, as generate), off, or ab: with "
                        "and without, alternating in one run (a second copy of our model in memory)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing runs: onnxruntime's per-op profile of one decode step (op type -> ms per "
                        "step) of our graph, and of genai's with --vs genai, same threads and spinning")
    p.add_argument("--variants", action="store_true",
                   help="with --profile: also our graph with separate projections, with SiLU as Sigmoid*Mul and "
                        "with RoPE inside GroupQueryAttention")
    p.add_argument("--grid", action="store_true",
                   help="instead of timing runs: decode step time at context 256/2k/8k x batch 1/4/8 of our graph "
                        "(and genai's with --vs genai), steps alternating")
    p.add_argument("--grid_memory", type=grid_memory_t, default=6.0,
                   help="GB the grid's KV buffers may take; larger cells are skipped and said so (default 6)")
    p.add_argument("--plot", default=None, help="with --grid: write the figure to this PNG file")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON object (last line)")
    p.set_defaults(run=run_bench)


def run_bench(a) -> int:
    from .bench import BenchConfig, bench  # noqa: PLC0415 (start-up)
    existing_dir(a.model_dir, "--model_dir", fix=MODEL_DIR_FIX)
    if a.hf_dir is not None:
        existing_dir(a.hf_dir, "--hf_dir", fix="pass the Hugging Face checkpoint the export was made from")
    if a.genai_dir is not None:
        output_dir(a.genai_dir, "--genai_dir")
    cfg = BenchConfig(model_dir=a.model_dir, precision=a.text_precision, prompt_tokens=a.prompt_tokens,
                      new_tokens=a.new_tokens, runs=a.runs, batch_size=a.batch_size, vs=a.vs, hf_dir=a.hf_dir,
                      genai_dir=a.genai_dir, threads=a.threads, image_size=a.image_size,
                      spinning={"auto": None, "on": True, "off": False}[a.spinning],
                      profile=a.profile, variants=a.variants, grid=a.grid, grid_memory_gb=a.grid_memory,
                      plot=a.plot, huge_pages=a.huge_pages, kernels=a.kernels)
    result = bench(cfg)
    if a.json:
        print(json.dumps(result))
    return 0


# -- demo --------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the trained shapes model answers questions about a scene, step by step "
                                    "(start here)")
    p.add_argument("--scene", type=int, default=0,
                   help="which held-out scene (never seen in training; even: one object, odd: two; default 0)")
    p.add_argument("--picture", default="qwen3vl-lab-demo.png", metavar="PNG",
                   help="where to save the picture (default qwen3vl-lab-demo.png; the scene alone beside it as "
                        "NAME-scene.png)")
    p.add_argument("--threads", type=threads_t, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--quiet", action="store_true", help="no progress bar on first use")
    p.set_defaults(run=run_demo)


def run_demo(a) -> int:
    from .demo import DemoConfig, print_demo  # noqa: PLC0415 (start-up)
    from .demo import run_demo as demo  # noqa: PLC0415 (start-up)
    result = demo(DemoConfig(a.scene, a.picture, a.threads, progress=not a.quiet), log=lambda m: say_notices([m]))
    if a.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print_demo(result)
    return 0


# -- main --------------------------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Run, see and fix Qwen3-VL on ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    add_demo(sub)
    add_make_tiny(sub)
    add_make_guide_export(sub)
    add_export(sub)
    add_generate(sub)
    add_eval_shapes(sub)
    add_train_shapes(sub)
    add_inspect(sub)
    add_doctor(sub)
    add_sweep(sub)
    add_repair(sub)
    add_bench(sub)
    return parser


class _Stdout(io.TextIOBase):
    """sys.stdout, but a failed write or flush raises `StdoutError` (so it is told apart from file errors)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


class StdoutError(OSError):
    """Writing to standard output failed: a closed pipe (`| head`) or a full disk (`> /dev/full`)."""


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's exit flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _error(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input, unreadable or unwritable paths, a full disk: one line, exit code 2.
    Ctrl-C: exit 130; SIGTERM / SIGHUP: staging folders removed, exit 128 + signal; stdout closed early
    (`| head`): quiet exit 141, as a process killed by SIGPIPE."""
    args = build_parser().parse_args(argv)
    real_stdout = sys.stdout
    sys.stdout = _Stdout(real_stdout)
    try:
        with terminate_as_interrupt():
            code = args.run(args)
            sys.stdout.flush()
            return code
    except UserError as e:
        return _error(str(e), e.exit_code)
    except StdoutError as e:
        if e.errno == errno.EPIPE:
            _quiet_stdout()
            return 141
        return _error(f"cannot write to standard output ({e.strerror}); free some space where the output goes, "
                      "or send it elsewhere")
    except Terminated as e:
        print(file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OSError as e:
        message = os_error_message(e)
        if message is None:
            raise
        return _error(message)
    except (MemoryError, RuntimeError) as e:  # onnxruntime's Fail is a RuntimeError
        message = out_of_memory_message(e)
        if message is None:
            raise
        return _error(message)
    finally:
        sys.stdout = real_stdout


_ALLOCATION = re.compile(r"Failed to allocate memory for requested buffer of size (\d+)")


def out_of_memory_message(e: BaseException) -> str | None:
    """Python's MemoryError or onnxruntime's "Failed to allocate memory" -> one line naming the two causes (the
    machine's memory, or this process's `ulimit -v`) and the fixes; None for any other error."""
    found = _ALLOCATION.search(str(e))
    if not isinstance(e, MemoryError) and found is None:
        return None
    what = f"a {int(found.group(1)) / 2**20:.0f} MB buffer" if found else "memory"
    limit = " under this process's address-space limit (ulimit -v)" if address_space_left() is not None else ""
    return (f"out of memory: could not allocate {what}{limit}; pass a smaller --image_size (or fewer video frames, "
            "a shorter prompt), free some memory, or raise the limit")


if __name__ == "__main__":
    sys.exit(main())
