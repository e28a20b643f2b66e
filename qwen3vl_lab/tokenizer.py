"""Text side of Qwen3-VL: load the tokenizer, render the chat template, expand vision placeholders, stream text.

transformers is used here for the tokenizer and the chat template only (no torch). The real Qwen3-VL
tokenizer files ship with the package (`qwen3vl_lab/data/tokenizer/`, see PROVENANCE.md there), so
everything works offline; a checkpoint folder's own tokenizer files win when present.

The four steps, in the order a prompt goes through them:

    tok = load_tokenizer(model_dir)                                   # AutoTokenizer, offline, cached
    text = format_chat(tok, "Describe this image.", images=1)         # chat template -> str
    ids = encode_prompt(tok, text, image_grid_thw=[[1, 18, 24]])      # (S,) int64, 108 x <|image_pad|>
    for piece in stream_text(tok, generated_ids): print(piece, end="")  # never a broken character

"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import UserError
from .jsonfile import read_json, try_json
from .limits import address_space_used
from .paths import inside

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_TRIPLE = VISION_START + VIDEO_PAD + VISION_END  # what the chat template writes for one video
REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def shipped_tokenizer_dir() -> Path:
    """The folder of the Qwen3-VL tokenizer files shipped inside the package (package data)."""
    folder = resources.files("qwen3vl_lab") / "data" / "tokenizer"
    path = Path(str(folder))
    if not (path / "tokenizer_config.json").is_file():
        raise UserError(f"the shipped tokenizer files are missing from {path}; reinstall qwen3vl-lab")
    return path


def _has_tokenizer_files(folder: Path) -> bool:
    """True when `folder` holds a loadable tokenizer: tokenizer_config.json + (tokenizer.json or vocab+merges)."""
    if not (folder / "tokenizer_config.json").is_file():
        return False
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def resolve_tokenizer_dir(model_dir: str | Path | None = None) -> Path:
    """The folder `load_tokenizer` reads: model_dir, then model_dir/pytorch, else the shipped files."""
    if model_dir is None:
        return shipped_tokenizer_dir()
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder; pass a checkpoint folder, or None for the shipped tokenizer")
    for folder in (model_dir, model_dir / "pytorch"):
        if _has_tokenizer_files(folder):
            return folder.resolve()
    return shipped_tokenizer_dir()


def _chat_template_from_json(folder: Path) -> str | None:
    """The `chat_template` string of `<folder>/chat_template.json` (the processor's file), if any."""
    path = folder / "chat_template.json"
    if not path.is_file():
        return None
    return read_json(path, fix="restore the folder's chat_template.json").get("chat_template")


def _files_signature(folder: Path) -> tuple:
    """Name, size and modification time of the folder's text files (tokenizer, template, configs): a tokenizer
    cached for a folder whose files have changed since (an edited template, a new folder at a reused path)
    is not handed out again."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return ()
    return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.inode()) for e in entries
                 if e.name.endswith((".json", ".txt", ".jinja", ".model")) and e.is_file())


# The files transformers reads to pick a tokenizer class; an `auto_map` in any of them points at Python code
# in the folder (`"AutoTokenizer": ["tokenization_x.XTokenizer", ...]`) that transformers would import.
CODE_POINTERS = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")
# Every file of a folder that loading a tokenizer from it may read: each must be a file of the folder itself.
TOKENIZER_READS = (*CODE_POINTERS, "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def refuse_custom_code(folder: str | Path) -> None:
    """A model folder never runs code of its own: refuse, in one line, a folder whose config files carry an
    `auto_map` (transformers' pointer to the folder's own .py files), before transformers reads it.

    transformers runs such code only with trust_remote_code=True, and with trust_remote_code unset it asks
    "Do you wish to run the custom code? [y/N]" on stdout and reads the answer from stdin, where our
    `--interactive` chat or a pipe could answer "y". We pass trust_remote_code=False everywhere, which
    never prompts; this check makes the refusal say why, naming the file, instead of transformers' message."""
    for name in CODE_POINTERS:
        path = Path(folder) / name
        data = try_json(path)  # missing, unreadable or not JSON: transformers' own error says so, and runs nothing
        if isinstance(data, dict) and "auto_map" in data:
            raise UserError(f"{path} has an \"auto_map\", which points at Python code in {Path(folder).name}/ that "
                            "qwen3vl-lab never runs (trust_remote_code stays off); remove the \"auto_map\" entry (Qwen3-VL's "
                            "tokenizer and config need no code of their own) or use another copy of the model")


@functools.lru_cache(maxsize=16)
def _load_folder(folder: str, signature: tuple = ()):
    """AutoTokenizer for one resolved folder, loaded once per process and content (~0.2 s, plus ~2 s to import
    transformers); `signature` (`_files_signature`) keys the cache on the files as they are now.
    Never runs code from the folder: `refuse_custom_code`, and trust_remote_code=False (which cannot prompt);
    never reads outside it: none of the files it reads may be a symlink leading out (`paths.inside`)."""
    for name in TOKENIZER_READS if Path(folder) != shipped_tokenizer_dir() else ():  # ours: package data
        if os.path.lexists(Path(folder) / name):
            inside(folder, name, f"{folder} (its {name})")
    refuse_custom_code(folder)
    from transformers import AutoTokenizer  # noqa: PLC0415 (importing transformers takes seconds)

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError/ValueError/... with multi-line messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer in {folder} ({first}); fix or remove its tokenizer files") from None
    if not getattr(tok, "chat_template", None):
        # Older checkpoints keep the template only in the processor's chat_template.json.
        tok.chat_template = _chat_template_from_json(Path(folder)) or _chat_template_from_json(
            shipped_tokenizer_dir()
        )
    return tok


def load_tokenizer(model_dir: str | Path | None = None):
    """Load the Qwen3-VL tokenizer offline: the checkpoint's own files when present, else the shipped ones.

    model_dir: a checkpoint folder (tokenizer files in it or in `model_dir/pytorch`), or None.
    Returns a transformers tokenizer. The object is cached per resolved folder and shared: don't mutate it.
    """
    folder = resolve_tokenizer_dir(model_dir)
    return _load_folder(str(folder), _files_signature(folder))


# ---------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------


def _user_turn(prompt: str, images: int | Sequence) -> list[dict]:
    """One user message: `{"type": "image"}` entries first, in the order given, then the text."""
    n_images = int(images) if isinstance(images, (int, np.integer)) and not isinstance(images, bool) else None
    if n_images is None:
        if not isinstance(images, (list, tuple)):
            raise UserError(f"images must be a count or a list, not {type(images).__name__}; e.g. images=1")
        n_images = len(images)
    if n_images < 0:
        raise UserError(f"images={n_images} is negative; pass the number of images (0 or more) or a list of them")
    content = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def _check_messages(messages) -> list[dict]:
    """A chat is a non-empty list of {"role": ..., "content": ...} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages must be a prompt string or a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"message {i} is {m!r}; each message needs a 'role' and a 'content' key")
    return list(messages)


def format_chat(
    tokenizer,
    messages_or_prompt: str | list[dict],
    *,
    images: int | Sequence = 0,
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
) -> str:
    """Render a prompt through the tokenizer's chat template; returns the text, not ids.

    A str becomes one user turn with `images` image slots before the text (images: a count, or a list
    whose length counts). A list of messages passes through unchanged (put `{"type": "image"}` entries
    in it yourself). Raw prompts without a template are the caller's job.
    """
    if isinstance(messages_or_prompt, str):
        messages = _user_turn(messages_or_prompt, images)
    else:
        if images:  # an empty list or 0 is fine
            raise UserError("images= only applies to a prompt string; add {'type': 'image'} entries to the messages")
        messages = _check_messages(messages_or_prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "this tokenizer has no chat template; add 'chat_template' to tokenizer_config.json or use raw mode"
        )
    return render_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                add_vision_id=add_vision_id)


# A chat template is code from the model folder. transformers runs it in jinja's immutable sandbox (no
# attribute escapes, no file access); what the sandbox does not bound is the work: nested loops that run
# for hours, `'x' * 10**10`, a macro that calls itself. The rendering gets a time budget (a watchdog raises
# in the rendering thread), an address-space budget (RLIMIT_AS, raised back afterwards) and a length bound.
RENDER_SECONDS = 5.0  # Qwen3-VL's template renders a 100-turn chat in ~10 ms
RENDER_MEMORY = 2 * 2**30  # bytes of address space the rendering may add
MAX_RENDERED_CHARS = 8 * 2**20  # far beyond any context the model holds


class _TemplateTimeout(BaseException):
    """Raised inside the rendering thread by the watchdog (a BaseException: the template cannot catch it)."""


def render_chat_template(tokenizer, messages: list[dict], **kwargs) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)`, bounded in time, memory and length;
    every way a template from a folder can fail is one line naming the folder."""
    template = tokenizer.chat_template
    where = f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'}"
    fix = "fix or remove chat_template in its tokenizer_config.json / chat_template.jinja"
    if not isinstance(template, str):
        shown = repr(template) if len(repr(template)) <= 40 else repr(template)[:37] + "..."
        raise UserError(f"{where} is {shown} ({type(template).__name__}), not a string of jinja text; {fix}")
    import jinja2  # noqa: PLC0415 (transformers imports it; so does apply_chat_template)

    try:
        with _memory_budget(RENDER_MEMORY), _time_budget(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except _TemplateTimeout:
        raise UserError(f"{where} did not finish rendering in {RENDER_SECONDS:.0f} s (a loop without end?); {fix}") from None
    except MemoryError:
        raise UserError(f"{where} needs more than {RENDER_MEMORY // 2**30} GB of memory to render; {fix}") from None
    except RecursionError:
        raise UserError(f"{where} calls itself without end (recursion); {fix}") from None
    except jinja2.exceptions.SecurityError as e:
        raise UserError(f"{where} tried something the sandbox refuses ({e}); {fix}") from None
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"{where} is not valid jinja (line {e.lineno}: {e.message}); {fix}") from None
    except jinja2.exceptions.TemplateError as e:  # the template's own raise_exception(...), an undefined call
        raise UserError(f"{where} refused this chat ({_first_line(e)}); {fix}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, ZeroDivisionError) as e:
        raise UserError(f"{where} failed while rendering ({type(e).__name__}: {_first_line(e)}); {fix}") from None
    if not isinstance(text, str) or len(text) > MAX_RENDERED_CHARS:
        size = f"{len(text):,} characters" if isinstance(text, str) else f"a {type(text).__name__}"
        raise UserError(f"{where} rendered {size}, more than any prompt the model can hold; {fix}")
    return text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


@contextlib.contextmanager
def _time_budget(seconds: float):
    """Raise _TemplateTimeout in this thread if the block runs longer than `seconds`: a watchdog thread sets an
    asynchronous exception, delivered at the next Python bytecode (a jinja template is compiled to Python)."""
    tid, lock, state = threading.get_ident(), threading.Lock(), {"running": True, "fired": False}

    def fire():
        with lock:
            if state["running"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_TemplateTimeout))
                state["fired"] = True

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        try:
            with lock:
                state["running"] = False
                if state["fired"]:  # set but maybe not delivered yet: clear it, and say so ourselves
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        except _TemplateTimeout:
            state["fired"] = True
    if state["fired"]:
        raise _TemplateTimeout


@contextlib.contextmanager
def _memory_budget(extra: int):
    """Lower this process's soft RLIMIT_AS to what it uses now + `extra` for the block (a 10 GB string fails with
    MemoryError instead of taking the machine); a no-op where the limit cannot be read."""
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:
        resource = None
    used = address_space_used()
    if resource is None or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    budget = used + extra
    lowered = (soft == resource.RLIM_INFINITY or soft > budget) and (hard == resource.RLIM_INFINITY or hard >= budget)
    if lowered:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (budget, hard))
        except (ValueError, OSError):  # a platform that refuses: the time budget still holds
            lowered = False
    try:
        yield
    finally:
        if lowered:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------------------------------
# Placeholder expansion and tokenization
# ---------------------------------------------------------------------------------------------------


def _as_grids(grid_thw, what: str, merge_size: int) -> np.ndarray:
    """Validate a (N, 3) int grid (t, h, w) per image/video; h and w must be multiples of merge_size."""
    if grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    grids = np.asarray(grid_thw)
    if grids.ndim == 1 and grids.shape == (3,):
        grids = grids[None]
    if grids.ndim != 2 or grids.shape[1] != 3 or not np.issubdtype(grids.dtype, np.integer):
        raise UserError(
            f"{what} must be (N, 3) integers (t, h, w) per item, got shape {grids.shape}; pass the processor's grid"
        )
    grids = grids.astype(np.int64)
    if (grids <= 0).any() or (grids[:, 1:] % merge_size).any():
        raise UserError(
            f"{what} {grids.tolist()} needs positive t, h, w with h, w multiples of merge_size={merge_size}"
        )
    return grids


def image_placeholder(grid_thw: Sequence[int], merge_size: int = 2) -> str:
    """`<|image_pad|>` repeated t*h*w / merge_size**2 times: the text one image's slot expands to."""
    t, h, w = (int(x) for x in grid_thw)
    return IMAGE_PAD * (t * h * w // merge_size**2)


def video_placeholder(grid_thw: Sequence[int], timestamps: Sequence[float], merge_size: int = 2) -> str:
    """One video: per temporal patch `<{ts:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>`."""
    t, h, w = (int(x) for x in grid_thw)
    if len(timestamps) != t:
        raise UserError(f"a video with grid_t={t} temporal patches needs {t} timestamps, got {len(timestamps)}")
    frame = VISION_START + VIDEO_PAD * (h * w // merge_size**2) + VISION_END
    return "".join(f"<{float(ts):.1f} seconds>" + frame for ts in timestamps)


def frame_pair_timestamps(frame_indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds per temporal patch: mean time of its first and last frame (pads by repeating the last frame).

    Same rule as transformers' `Qwen3VLProcessor._calculate_timestamps`: frames [0, 12, 24, 36] at 24 fps
    -> [0.25, 1.25], rendered `<0.2 seconds>`, `<1.2 seconds>`.
    """
    idx = [int(i) for i in frame_indices]
    if not idx or video_fps <= 0:
        raise UserError("frame_pair_timestamps needs at least one frame index and video_fps > 0")
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    secs = [i / video_fps for i in idx]
    return [(secs[i] + secs[i + temporal_patch_size - 1]) / 2 for i in range(0, len(secs), temporal_patch_size)]


def _as_timestamps(video_timestamps, grids: np.ndarray) -> list[list[float]]:
    """One list of grid_t seconds per video; a flat list is accepted when there is a single video."""
    if len(grids) == 0:
        return []
    if video_timestamps is None:
        raise UserError(
            "videos need video_timestamps: one list of grid_t seconds per video (see frame_pair_timestamps)"
        )
    ts = list(video_timestamps)
    if len(grids) == 1 and ts and np.ndim(ts[0]) == 0:
        ts = [ts]
    if len(ts) != len(grids):
        raise UserError(f"got {len(ts)} timestamp lists for {len(grids)} videos; pass one list per video")
    out = []
    for i, (row, grid) in enumerate(zip(ts, grids)):
        row = [float(x) for x in row]
        if len(row) != grid[0]:
            raise UserError(
                f"video {i} has grid_t={grid[0]} temporal patches but {len(row)} timestamps; pass one per patch"
            )
        out.append(row)
    return out


def _expand_images(text: str, grids: np.ndarray, merge_size: int) -> str:
    """Replace the i-th `<|image_pad|>` by image i's run of pads; the counts must match (as in the processor)."""
    found = text.count(IMAGE_PAD)
    if found != len(grids):
        raise UserError(
            f"the prompt has {found} {IMAGE_PAD} placeholders but {len(grids)} images were given; "
            "give one image per placeholder (leave <|image_pad|> out of the prompt text; the chat template adds one "
            "per image)"
        )
    pieces = text.split(IMAGE_PAD)
    return pieces[0] + "".join(image_placeholder(g, merge_size) + p for g, p in zip(grids, pieces[1:]))


_VIDEO_SLOT = re.compile(re.escape(VIDEO_TRIPLE) + "|" + re.escape(VIDEO_PAD))


def _expand_videos(text: str, grids: np.ndarray, timestamps: list[list[float]], merge_size: int) -> str:
    """Replace each video slot, in order, by its timestamped frames.

    Like the Qwen reference and transformers 4.57: the whole `<|vision_start|><|video_pad|><|vision_end|>`
    triple is replaced (no outer pair survives; 5.24 keeps one); a bare `<|video_pad|>`
    is replaced on its own.
    """
    found = text.count(VIDEO_PAD)
    if found != len(grids):
        raise UserError(
            f"the prompt has {found} {VIDEO_PAD} placeholders but {len(grids)} videos were given; "
            "put one {'type': 'video'} entry per video in the messages"
        )
    slots = iter(range(len(grids)))

    def one_video(_match: re.Match) -> str:
        i = next(slots)
        return video_placeholder(grids[i], timestamps[i], merge_size)

    return _VIDEO_SLOT.sub(one_video, text)


def expand_prompt(
    text: str, image_grid_thw=None, video_grid_thw=None, merge_size: int = 2, video_timestamps=None
) -> str:
    """The prompt text with every image/video slot expanded to its full run of placeholder tokens."""
    if not isinstance(text, str):
        raise UserError(f"the prompt must be a str (format_chat's output), not {type(text).__name__}")
    images = _as_grids(image_grid_thw, "image_grid_thw", merge_size)
    videos = _as_grids(video_grid_thw, "video_grid_thw", merge_size)
    timestamps = _as_timestamps(video_timestamps, videos)
    text = _expand_images(text, images, merge_size)
    return _expand_videos(text, videos, timestamps, merge_size)


def encode_prompt(
    tokenizer, text: str, image_grid_thw=None, video_grid_thw=None, merge_size: int = 2, video_timestamps=None
) -> np.ndarray:
    """Token ids (S,) int64 of a formatted prompt, placeholders expanded the way Qwen3VLProcessor does.

    Expansion happens on the text, then the whole text is tokenized once: this matters for videos, whose
    `<t seconds>` text can merge with the characters before it (e.g. `.<` is one token).
    image_grid_thw / video_grid_thw: (N, 3) (t, h, w) per item, in prompt order.
    video_timestamps: per video, grid_t seconds (see `frame_pair_timestamps`).
    """
    expanded = expand_prompt(text, image_grid_thw, video_grid_thw, merge_size, video_timestamps)
    return np.asarray(tokenizer(expanded)["input_ids"], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------------


class TextStreamer:
    """Turn token ids into text pieces as they arrive, never emitting half of a multi-byte character.

    Each `put` decodes the ids since the last line break, emits only the new suffix, and holds it back
    while the text ends in U+FFFD (an incomplete UTF-8 sequence); `end` flushes. Special tokens such as
    <|im_end|> are skipped. The pieces concatenate to `tokenizer.decode(ids, skip_special_tokens=True)`.
    Decoding restarts after each '\\n' so a long answer costs O(line length) per token, not O(answer).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # everything emitted so far
        self._ids: list[int] = []  # ids of the current (uncommitted) line
        self._emitted = 0  # characters of decode(self._ids) already emitted

    def _decode(self) -> str:
        return self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_ids: int | Iterable[int]) -> str:
        """Add one id (or several) and return the text that became final ('' while a character is incomplete)."""
        ids = [token_ids] if np.ndim(token_ids) == 0 else list(np.asarray(token_ids).reshape(-1))
        self._ids.extend(int(i) for i in ids)
        line = self._decode()
        if line.endswith(REPLACEMENT_CHAR):
            return ""
        piece = line[self._emitted :]
        self._emitted = len(line)
        if line.endswith("\n"):  # a character boundary: start decoding afresh from here
            self._ids, self._emitted = [], 0
        self.text += piece
        return piece

    def end(self) -> str:
        """Flush whatever is held back (a genuinely broken sequence stays as U+FFFD, like `decode`)."""
        piece = self._decode()[self._emitted :]
        self._ids, self._emitted = [], 0
        self.text += piece
        return piece


def stream_text(tokenizer, token_iter: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
    """Yield non-empty text pieces for a stream of token ids (a generator over `TextStreamer`)."""
    streamer = TextStreamer(tokenizer, skip_special_tokens=skip_special_tokens)
    for token_id in token_iter:
        piece = streamer.put(token_id)
        if piece:
            yield piece
    piece = streamer.end()
    if piece:
        yield piece
