"""The reference's side of a comparison, recorded once: its greedy tokens and its logits at every step.

    rec = record_prompt(fp32, "Write a haiku about the sea.", n_steps=16)   # rec.tokens (T,), rec.logits (T, V)
    recs = record_reference("OUT/cpu-fp32", prompts, 16)    # loads fp32, records every prompt, releases it
    save_records(recs, "sweep/.reference/ab12")              # a folder: record.json + logits.npy
    load_records("sweep/.reference/ab12")                     # the same records (logits read one prompt at a time)

Teacher forcing feeds both models the reference's greedy tokens, so the reference can run alone
first: one greedy run (`generate.generate_tokens`, with a sampler that keeps each step's logits)
gives the tokens both models are fed, the reference's distribution at every step, and its free
greedy run. Then the reference is released and the test model runs against the record
(compare.py): two large decoders are never loaded at once. What is kept is small next to a decoder:
T x vocab float32 logits per prompt (16 steps x 151936 = 9.7 MB).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..generate import Prompt, generate_tokens
from ..model import Model
from .inputs import PromptLike, PromptSpec, as_model, as_specs, label_of, prepare

RECORD_FILE = "record.json"
LOGITS_FILE = "logits.npy"


@dataclass
class RecordedPrompt:
    """One prompt run greedily by the reference."""

    label: str
    input_ids: np.ndarray  # (1, S) the prompt's ids: the test model must tokenize it the same way
    tokens: np.ndarray  # (T,) the reference's greedy tokens (fed to the test model when teacher forcing)
    logits: np.ndarray  # (T, V) float32: the reference's logits before each of those tokens
    text: str = ""  # the tokens decoded

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[1])


def release(model: Model) -> None:
    """Close a Model's sessions that hold weights (decoder, fused decoder, vision) and free their memory.

    Only for models the caller loaded itself: the Model stays usable (each session reopens on first use)."""
    model.decoder_session = None
    for name in ("fast_decoder", "vision"):  # cached_property values live in the instance dict
        model.__dict__.pop(name, None)
    gc.collect()


def record_prompt(ref: Model, prompt: PromptLike | Prompt, n_steps: int = 16, *, stop_at_eos: bool = True,
                  decode_text: bool = True) -> RecordedPrompt:
    """The reference's greedy run on one prompt, with its logits at every step."""
    spec = as_specs(prompt)[0]
    p = prepare(ref, spec)
    kept: list[np.ndarray] = []

    def greedy_keeping_logits(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        kept.append(np.array(logits[0], np.float32))  # (V,)
        return np.argmax(logits, axis=-1)  # (1,)

    eos = None if stop_at_eos else []
    tokens = np.array(list(generate_tokens(ref, p, greedy_keeping_logits, n_steps, eos_token_ids=eos)), np.int64)
    logits = np.stack(kept) if kept else np.zeros((0, ref.config.text.vocab_size), np.float32)  # (T, V)
    text = ref.tokenizer.decode(tokens.tolist(), skip_special_tokens=True) if decode_text else ""
    return RecordedPrompt(label_of(spec), np.asarray(p.input_ids, np.int64), tokens, logits, text)


def record_reference(ref: Model | str | Path, prompts: Sequence[PromptLike] | PromptLike | None, n_steps: int = 16,
                     *, stop_at_eos: bool = True, progress: bool = False) -> list[RecordedPrompt]:
    """`record_prompt` for every prompt. A folder is loaded, recorded and released before this returns."""
    owned = not isinstance(ref, Model)
    model = as_model(ref)
    specs = as_specs(prompts)
    try:
        return [record_prompt(model, s, n_steps, stop_at_eos=stop_at_eos)
                for s in tqdm(specs, desc="reference", unit="prompt", disable=not progress)]
    finally:
        if owned:
            release(model)
            del model
            gc.collect()


# -- on disk (sweeps: recorded once, read by every variant, on this machine or a worker) ----------
def prompt_digest(specs: Sequence[PromptSpec | Prompt], n_steps: int) -> str:
    """A content hash of a prompt set (texts, image files or arrays, image sizes) and the step count."""
    h = hashlib.sha256(f"n_steps={n_steps}".encode())
    for s in specs:
        if isinstance(s, Prompt):
            h.update(np.ascontiguousarray(s.input_ids).tobytes())
            h.update(np.ascontiguousarray(s.inputs_embeds).tobytes())
            continue
        h.update(json.dumps([s.text, s.image_size]).encode())
        h.update(_image_digest(s.image).encode())
    return h.hexdigest()[:16]


def _image_digest(image) -> str:
    if image is None:
        return "-"
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} does not exist; pass an image file (jpg, png, ...)")
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    arr = np.asarray(image)  # a PIL image or an array
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()


def save_records(records: Sequence[RecordedPrompt], folder: str | Path, meta: dict | None = None) -> Path:
    """Write `records` into `folder` (record.json + logits.npy), through a temporary folder renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700: workers running as another user read it too
    try:
        logits = np.concatenate([r.logits for r in records]) if records else np.zeros((0, 0), np.float32)
        np.save(staging / LOGITS_FILE, logits.astype(np.float32, copy=False))
        rows = [{"label": r.label, "input_ids": r.input_ids[0].tolist(), "tokens": r.tokens.tolist(), "text": r.text}
                for r in records]
        (staging / RECORD_FILE).write_text(json.dumps({"meta": meta or {}, "prompts": rows}) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_meta(folder: str | Path) -> dict | None:
    """The `meta` a record folder was saved with, or None when the folder is missing or incomplete."""
    try:
        return json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))["meta"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


class RecordFolder:
    """A saved record: `len(rf)` prompts, `rf[i]` reads prompt i's logits from disk (a memory map, closed after)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            data = json.loads((self.folder / RECORD_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.folder} is not a readable reference record ({type(e).__name__}); put the "
                            "sweep's --out_dir on a filesystem every worker mounts, or delete it to record again") from None
        self.meta = data["meta"]
        self.prompts = data["prompts"]
        lengths = [len(p["tokens"]) for p in self.prompts]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> RecordedPrompt:
        p = self.prompts[i]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        mapped = np.load(self.folder / LOGITS_FILE, mmap_mode="r")
        logits = np.array(mapped[a:b], np.float32)  # a copy: the map is closed when `mapped` goes
        del mapped
        return RecordedPrompt(p["label"], np.array([p["input_ids"]], np.int64), np.array(p["tokens"], np.int64),
                              logits, p["text"])


def load_records(folder: str | Path) -> list[RecordedPrompt]:
    """Every prompt of a saved record, logits included (see `RecordFolder` to read one prompt at a time)."""
    rf = RecordFolder(folder)
    return [rf[i] for i in range(len(rf))]


__all__ = ["RecordFolder", "RecordedPrompt", "load_records", "prompt_digest", "read_meta", "record_prompt",
           "record_reference", "release", "save_records"]
