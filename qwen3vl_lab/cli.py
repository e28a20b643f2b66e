"""`qwen3vl-lab` (also `python -m qwen3vl_lab`): make-tiny, export, generate.

Every user mistake ends in one line on stderr, `qwen3vl-lab: error: <problem>; <fix>`, and exit
code 2 — no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError

PROG = "qwen3vl-lab"


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line naming the fix, exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


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
threads_t = _number(int, "--threads", lambda v: v >= 1, "an integer >= 1")
image_size_t = _number(int, "--image_size", lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32 (e.g. 384)")
video_fps_t = _number(float, "--video_fps", lambda v: v > 0, "a number > 0 (frames per second of the given frames)")


# -- make-tiny ---------------------------------------------------------------------------------
def add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random-weight Qwen3-VL checkpoint (Hugging Face layout)")
    p.add_argument("--output_dir", required=True, help="folder to create")
    p.add_argument("--seed", type=seed_t, default=0)
    p.add_argument("--preset", default=None,
                   help="tiny (default), tiny-deep, shapes or 2b (real 2B dimensions, random weights)")
    p.add_argument("--trained", action="store_true",
                   help="the shipped model trained on the shapes task (preset shapes, bf16): it answers correctly")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype on disk (default: float32; bfloat16 for the 2b preset)")
    p.add_argument("--config_style", default="v5", choices=["v5", "legacy"],
                   help="config.json as transformers 5.x writes it, or the Hub's 4.57 style")
    p.add_argument("--untied", action="store_true", help="write a separate lm_head.weight")
    p.add_argument("--max_shard_mb", type=float, default=None, help="split weights into shards of this size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.set_defaults(run=run_make_tiny)


def run_make_tiny(a) -> int:
    from .export.tiny import make_tiny  # noqa: PLC0415

    t0 = time.perf_counter()
    preset = a.preset or ("shapes" if a.trained else "tiny")
    out = make_tiny(a.output_dir, seed=a.seed, preset=preset, dtype=a.dtype, config_style=a.config_style,
                    tie_word_embeddings=not a.untied, overwrite=a.overwrite, trained=a.trained,
                    max_shard_bytes=int(a.max_shard_mb * 2**20) if a.max_shard_mb else None)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    what = "trained shapes" if a.trained else preset
    print(f"wrote {what} checkpoint to {out} ({size / 2**20:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


# -- export ------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a Hugging Face Qwen3-VL checkpoint to ONNX")
    p.add_argument("--hf_dir", required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--output_dir", required=True, help="where cpu-<precision>/ and pytorch/ are written")
    p.add_argument("--precision", nargs="+", default=["fp32"], help="fp32 (one or more precisions)")
    p.add_argument("--with_attentions", action="store_true",
                   help="add attention-probability outputs to the decoder (teaching/debugging variant)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_export)


def run_export(a) -> int:
    from .export.exporter import export  # noqa: PLC0415

    export(a.hf_dir, a.output_dir, a.precision, with_attentions=a.with_attentions, progress=not a.quiet)
    return 0


# -- generate ----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an exported model")
    p.add_argument("--model_dir", required=True, help="an export folder (with cpu-fp32/ or cpu-int4/)")
    p.add_argument("--text_precision", default="fp32", choices=["fp32", "int4"])
    p.add_argument("--prompt", help="one user turn (through the chat template unless --raw)")
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
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the user turn (repeatable; images come before the text, in the order given)")
    p.add_argument("--video", action="append", nargs="+", default=[], metavar="FRAMES",
                   help="one video as a folder of frames or a list of frame files (repeatable; video files "
                        "must be split into frames first, e.g. with ffmpeg)")
    p.add_argument("--video_fps", type=video_fps_t, default=2.0,
                   help="frames per second the --video frames were taken at, for their timestamps (default 2)")
    p.add_argument("--image_size", type=image_size_t, default=None, metavar="N",
                   help="resize every image/frame to N x N (multiple of 32, e.g. 384) instead of the native size")
    p.set_defaults(run=run_generate)


def _sampling_kwargs(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                no_sample=a.no_sample, seed=a.seed, repetition_penalty=a.repetition_penalty)


def _video_arg(frames: list[str]):
    """`--video DIR` -> the folder; `--video f1.png f2.png ...` -> the list of frames."""
    return frames[0] if len(frames) == 1 else list(frames)


def run_generate(a) -> int:
    from .generate import check_has_vision  # noqa: PLC0415
    from .model import RuntimeOptions  # noqa: PLC0415
    from .pipeline import Qwen3VLPipeline  # noqa: PLC0415

    if a.prompt is None and not a.interactive:
        raise UserError("nothing to do: pass --prompt TEXT or --interactive")
    pipe = Qwen3VLPipeline(a.model_dir, a.text_precision, RuntimeOptions(threads=a.threads))
    if a.image or a.video:
        check_has_vision(pipe.model)
    a.videos = [_video_arg(v) for v in a.video]
    if a.interactive:
        return interactive(pipe, a)
    box: dict = {}
    t0 = time.perf_counter()
    stream = pipe.stream(a.prompt, raw=a.raw, result=box, images=a.image, videos=a.videos,
                         image_size=a.image_size, video_fps=a.video_fps, **_sampling_kwargs(a))
    for piece in stream:
        if not a.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = box["result"]
    if a.json:
        result.extra["seconds"] = round(time.perf_counter() - t0, 4)
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def _image_command(line: str, pending: list, image_size) -> None:
    """`/image PATH`: check the file now (one-line error, the chat goes on) and attach it to the next turn."""
    from .image import ImageProcessorConfig, load_image, target_size  # noqa: PLC0415

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
    images of earlier turns stay in the history; the pipeline encodes each one only once.
    """
    from .tokenizer import format_chat  # noqa: PLC0415

    messages: list[dict] = []
    images, videos = [], []  # every image / video of the chat so far, in order
    pending, pending_videos = list(a.image), list(a.videos)
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
        if line.strip().lower() in ("quit", "exit"):
            return 0
        if not line.strip():
            continue
        if line.strip().startswith("/image"):
            try:
                _image_command(line, pending, a.image_size)
            except UserError as e:
                print(f"{PROG}: error: {e}", file=sys.stderr)
            continue
        content = ([{"type": "image"} for _ in pending] + [{"type": "video"} for _ in pending_videos]
                   + [{"type": "text", "text": line}])
        messages.append({"role": "user", "content": content})
        text = format_chat(pipe.tokenizer, messages)
        pieces = []
        try:
            for piece in pipe.stream(text, raw=True, images=images + pending, videos=videos + pending_videos,
                                     image_size=a.image_size, video_fps=a.video_fps, **_sampling_kwargs(a)):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
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


# -- shapes task -------------------------------------------------------------------------------
n_scenes_t = _number(int, "--n", lambda v: v >= 1, "an integer >= 1")


def add_eval_shapes(sub) -> None:
    p = sub.add_parser("eval-shapes", help="accuracy of an exported model on fresh held-out shapes scenes (ONNX only)")
    p.add_argument("--model_dir", required=True, help="an export of the shapes model (make-tiny --trained, then export)")
    p.add_argument("--text_precision", default="fp32", choices=["fp32", "int4"])
    p.add_argument("--n", type=n_scenes_t, default=200, help="held-out scenes; every question of each (default 200)")
    p.add_argument("--seed", type=seed_t, default=0, help="held-out stream (default 0)")
    p.add_argument("--threads", type=threads_t, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the accuracy table as one JSON object (last line)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval_shapes)


def run_eval_shapes(a) -> int:
    from .model import RuntimeOptions, load_model  # noqa: PLC0415
    from .shapes import format_table  # noqa: PLC0415
    from .shapes_eval import evaluate_shapes  # noqa: PLC0415

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
        from .train.train_shapes import add_arguments  # noqa: PLC0415 (no torch at import)
    except ImportError:
        return
    add_arguments(p)


def run_train_shapes(a) -> int:
    from .train.train_shapes import run  # noqa: PLC0415

    return run(a)


# -- main --------------------------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Run, see and fix Qwen3-VL on ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    add_make_tiny(sub)
    add_export(sub)
    add_generate(sub)
    add_eval_shapes(sub)
    add_train_shapes(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
