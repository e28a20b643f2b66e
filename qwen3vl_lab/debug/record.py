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

import ctypes
import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..export.files import staging_folder
from ..generate import Prompt, generate_tokens
from ..jsonfile import read_json, try_json
from ..limits import check_compared_steps
from ..model import Model
from ..signals import interruption_point
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


def release(model: Model, *, keep_vision: bool = False) -> None:
    """Close a Model's sessions that hold weights (decoder, fused decoder, vision unless `keep_vision`) and free
    their memory. Only for models the caller loaded itself: the Model stays usable (each session reopens on
    first use). The teaching decoder and the I/O names read from the session go too: they hold the session."""
    model.decoder_session = None
    names = ["fast_decoder", "teaching_decoder", "decoder_inputs", "decoder_outputs"] + ([] if keep_vision else ["vision"])
    for name in names:
        model.__dict__.pop(name, None)  # cached_property values live in the instance dict
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing). Without it the
    packed weights of a released session (many blocks under glibc's mmap threshold) can stay counted in
    the process's memory while the next model loads: measured 1.3 GiB at 2B dims after the vision tower."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): the allocator keeps its own policy
        pass


@dataclass(frozen=True)
class NodeArg:
    """A graph input's or output's name, shape and type, without the session behind it."""

    name: str
    shape: tuple
    type: str


def _node_args(args) -> list[NodeArg]:
    return [NodeArg(a.name, tuple(a.shape), a.type) for a in args]


class RecordedVision:
    """A vision session that remembers what it returned for each input, and replays it once its weights are gone.

        recorded = RecordedVision(ours.vision); ours.__dict__["vision"] = recorded
        prepare(ours, image_spec)       # runs the vision graph, keeps its outputs (a few MB per image)
        recorded.close()                # the session (and its weights) released
        prepare(other, image_spec)      # the same pixels: the same features, from the record

    How the doctor runs image prompts through three decoders without the vision tower's weights (1.5 GiB
    at 2B dims) beside any of them. An input it never saw is a UserError, never a different answer."""

    def __init__(self, session):
        self._session = session
        # plain copies: onnxruntime's NodeArg objects keep their session (and its weights) alive
        self._inputs, self._outputs = _node_args(session.get_inputs()), _node_args(session.get_outputs())
        self._seen: dict[str, list[np.ndarray]] = {}

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    @staticmethod
    def _key(names, feeds: dict) -> str:
        h = hashlib.sha256(json.dumps(list(names)).encode())
        for k in sorted(feeds):
            a = np.ascontiguousarray(feeds[k])
            h.update(f"{k}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def run(self, names, feeds: dict, run_options=None) -> list[np.ndarray]:
        key = self._key(names, feeds)
        if self._session is not None:
            self._seen[key] = self._session.run(names, feeds, run_options)
        elif key not in self._seen:
            raise UserError("this image was not encoded while the vision graph was loaded; encode every image "
                            "before RecordedVision.close()")
        return self._seen[key]

    def close(self) -> None:
        """Drop the session: from here on only the recorded outputs are returned."""
        self._session = None
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
    check_compared_steps(n_steps)
    owned = not isinstance(ref, Model)
    model = as_model(ref)
    specs = as_specs(prompts)
    try:
        records = []
        for s in tqdm(specs, desc="reference", unit="prompt", disable=not progress):
            interruption_point()  # a cancelled sweep job stops between prompts (signals.py)
            records.append(record_prompt(model, s, n_steps, stop_at_eos=stop_at_eos))
        return records
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
            if s.inputs_embeds is not None:
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
    with staging_folder(folder.parent, f".{folder.name}-", name="the record folder", shown=folder) as staging:
        logits = np.concatenate([r.logits for r in records]) if records else np.zeros((0, 0), np.float32)
        np.save(staging / LOGITS_FILE, logits.astype(np.float32, copy=False))
        rows = [{"label": r.label, "input_ids": r.input_ids[0].tolist(), "tokens": r.tokens.tolist(), "text": r.text}
                for r in records]
        (staging / RECORD_FILE).write_text(json.dumps({"meta": meta or {}, "prompts": rows}) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder


def read_meta(folder: str | Path) -> dict | None:
    """The `meta` a record folder was saved with, or None when the folder is missing or incomplete."""
    meta = (try_json(Path(folder) / RECORD_FILE) or {}).get("meta")
    return meta if isinstance(meta, dict) else None


class RecordFolder:
    """A saved record: `len(rf)` prompts, `rf[i]` reads prompt i's logits from disk (a memory map, closed after)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        fix = (f"delete {self.folder} (the next run records it again), and put the sweep's --out_dir on a filesystem "
               "every worker mounts")
        try:
            data = read_json(self.folder / RECORD_FILE, fix=fix)
            self.meta, self.prompts = data["meta"], data["prompts"]
            lengths = [len(p["tokens"]) for p in self.prompts]
        except OSError as e:
            raise UserError(f"{self.folder} is not a readable reference record ({e.strerror}); {fix}") from None
        except (KeyError, TypeError) as e:
            raise UserError(f"{self.folder} is not a reference record qwen3vl-lab wrote (no {e}); {fix}") from None
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


__all__ = ["RecordFolder", "RecordedPrompt", "RecordedVision", "load_records", "prompt_digest", "read_meta", "record_prompt",
           "record_reference", "release", "save_records"]
