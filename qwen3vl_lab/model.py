"""Loading an exported folder: the ONNX Runtime sessions, the config and the tokenizer.

    model = load_model("models/tiny-onnx", text_precision="fp32")
    model.embedding, model.decoder, model.vision      # onnxruntime.InferenceSession (vision loads on first use)
    model.fast_decoder                                # model-fast.onnx (fast.py), opened on first use
    model.config                                      # ModelConfig (from genai_config.json)
    model.tokenizer                                   # transformers tokenizer

Sessions load once per `Model`; everything that runs them lives in `steps.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import onnxruntime as ort

from .config import ModelConfig
from .errors import UserError
from .graph_check import check_graph
from .layout import DECODER_FILE, EMBEDDING_FILE, FAST_DECODER_FILE, GENAI_CONFIG, VISION_FILE
from .limits import check_threads
from .paths import existing_dir, readable_file


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime session settings. threads=None uses onnxruntime's default (one per core).

    The defaults suit decoding on a CPU: all graph optimisations (fusions, constant folding, weight
    prepacking), the memory arena (decode steps reuse the same buffers), and worker threads that
    sleep between ops instead of spinning. Spinning (onnxruntime's own default) only pays on cores
    nobody else wants: on the shared 2-core VM this was measured on, with other processes running,
    decode steps took 1.6x (2B dims, INT4) to 2x (tiny model) longer with spinning, in alternating
    runs of two processes. Set allow_spinning=True on a machine of your own to try it."""

    threads: int | None = None
    graph_optimization: str = "all"  # "disable", "basic", "extended", "all"
    memory_arena: bool = True
    allow_spinning: bool = False
    log_severity: int = 3  # errors only: onnxruntime's warnings are noise for users

    def __post_init__(self):
        check_threads(self.threads, "threads")  # more threads than cores: refused here (limits.py)

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if self.graph_optimization not in levels:
            raise UserError(f"graph_optimization {self.graph_optimization!r} is unknown; choose from {', '.join(levels)}")
        so.graph_optimization_level = levels[self.graph_optimization]
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.enable_cpu_mem_arena = self.memory_arena
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        so.log_severity_level = self.log_severity
        return so


def open_session(path: Path, options: RuntimeOptions, config: ModelConfig | None = None,
                 kind: str | None = None) -> ort.InferenceSession:
    """An InferenceSession, or a one-line UserError when the file is missing, unreadable or not a valid model;
    with `config` and `kind`, the graph's dimensions are checked against the config (graph_check.py)."""
    if not path.is_file():
        raise UserError(f"{path} is missing; re-run `qwen3vl-lab export` for this folder")
    for file in (path, path.with_name(path.name + ".data")):  # onnxruntime reports these as "SystemError: 13"
        if file.exists():
            readable_file(file)
    session = _open_session(path, options)
    if config is not None and kind is not None:
        check_graph(session, path, config, kind)
    return session


def _open_session(path: Path, options: RuntimeOptions) -> ort.InferenceSession:
    session_options = options.session_options()
    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several types for corrupt files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} could not be loaded by onnxruntime ({reason}); re-export it with `qwen3vl-lab export`") from None


def resolve_folder(model_dir: str | Path, precision: str) -> Path:
    """model_dir is an export root (with cpu-<precision>/ inside) or one precision folder itself."""
    root = existing_dir(model_dir, "--model_dir", fix="export a checkpoint with `qwen3vl-lab export` first")
    if (root / GENAI_CONFIG).is_file():
        return root
    folder = root / f"cpu-{precision}"
    if not folder.is_dir():
        found = sorted(p.name for p in root.glob("cpu-*") if (p / GENAI_CONFIG).is_file())
        if found:
            hint = f"found {', '.join(found)}; pass --text_precision {found[0][4:]} or export with --precision {precision}"
        else:
            hint = "export a checkpoint into it with `qwen3vl-lab export --hf_dir DIR --output_dir " f"{root}`"
        raise UserError(f"{root} has no cpu-{precision} folder ({hint})")
    existing_dir(folder, "the precision folder", fix="re-run `qwen3vl-lab export`")
    if not (folder / GENAI_CONFIG).is_file():
        raise UserError(f"{folder} has no {GENAI_CONFIG}; re-run `qwen3vl-lab export`")
    return folder


@dataclass
class Model:
    """Everything the step functions need: three sessions, the config and the tokenizer."""

    folder: Path
    genai: dict
    config: ModelConfig
    embedding: ort.InferenceSession
    decoder_session: ort.InferenceSession | None = None  # None: model.onnx is opened on first use of .decoder
    options: RuntimeOptions = field(default_factory=RuntimeOptions)

    @property
    def decoder(self) -> ort.InferenceSession:
        """The teaching decoder (model.onnx): every step inspectable, the cache a plain array."""
        if self.decoder_session is None:
            self.decoder_session = open_session(self.folder / DECODER_FILE, self.options, self.config, "decoder")
        return self.decoder_session

    def fast_decoder_file(self) -> Path:
        """model-fast.onnx, the fused decoder (same weights) that `fast.py` runs; a UserError if it is missing.

        `qwen3vl-lab export` writes it beside every model.onnx; the runtime only reads it (it never
        imports the builder). A folder without it (an export older than the fast path, or a
        `quantize_folder` / sweep variant) gets a one-line error."""
        path = self.folder / FAST_DECODER_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing (the fused decoder that --fast runs); re-run `qwen3vl-lab export` "
                            "for this folder, or run without --fast")
        return path

    @cached_property
    def fast_decoder(self) -> ort.InferenceSession:
        """The fused decoder's session (`fast_decoder_file`), opened on first use."""
        return open_session(self.fast_decoder_file(), self.options, self.config, "decoder")

    @property
    def precision(self) -> str:
        return self.genai["qwen3vl_lab"]["precision"]

    @property
    def root(self) -> Path:
        return self.folder.parent if self.folder.name.startswith("cpu-") else self.folder

    @property
    def context_length(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def has_vision(self) -> bool:
        return "vision" in self.genai["model"] and (self.folder / VISION_FILE).is_file()

    @cached_property
    def vision(self) -> ort.InferenceSession:
        if not self.has_vision:
            raise UserError(f"{self.folder} has no vision model ({VISION_FILE}); re-export the checkpoint "
                            "with `qwen3vl-lab export` to use images")
        return open_session(self.folder / VISION_FILE, self.options, self.config, "vision")

    @cached_property
    def tokenizer(self):
        from .tokenizer import load_tokenizer  # noqa: PLC0415 (transformers import is slow; load on use)

        pytorch = self.root / "pytorch"
        return load_tokenizer(pytorch if pytorch.is_dir() else None)

    @cached_property
    def decoder_inputs(self) -> frozenset[str]:
        """Input names, with the optional ones (initializers that may be overridden, e.g. logits_to_keep)."""
        optional = (i.name for i in self.decoder.get_overridable_initializers())
        return frozenset(i.name for i in self.decoder.get_inputs()).union(optional)

    @cached_property
    def decoder_outputs(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.decoder.get_outputs())


def load_model(model_dir: str | Path, text_precision: str = "fp32", options: RuntimeOptions | None = None,
               *, open_decoder: bool = True) -> Model:
    """open_decoder=False defers model.onnx until `.decoder` is used (the fast path needs only model-fast.onnx)."""
    options = options or RuntimeOptions()
    folder = resolve_folder(model_dir, text_precision)
    readable_file(folder / GENAI_CONFIG)
    try:
        genai = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
        config = ModelConfig.from_dict(genai["qwen3vl_lab"]["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / GENAI_CONFIG} is not a qwen3vl-lab config ({type(e).__name__}: {e}); "
                        "re-run `qwen3vl-lab export`") from None
    embedding = open_session(folder / EMBEDDING_FILE, options, config, "embedding")
    decoder = open_session(folder / DECODER_FILE, options, config, "decoder") if open_decoder else None
    return Model(folder=folder, genai=genai, config=config, embedding=embedding, decoder_session=decoder,
                 options=options)


def default_threads() -> int:
    return os.cpu_count() or 1
