"""Loading an exported folder: the ONNX Runtime sessions, the config and the tokenizer.

    model = load_model("models/tiny-onnx", text_precision="fp32")
    model.embedding, model.decoder, model.vision      # onnxruntime.InferenceSession (vision loads on first use)
    model.teaching_decoder                            # decoder.OnnxDecoder over model.decoder: prefill / decode
    model.fast_decoder                                # model-fast.onnx's session (fast.py), opened on first use
    model.config                                      # ModelConfig (from qwen3vl_lab.json, or a foreign export's checkpoint/graph)
    model.genai                                       # genai_config.json + {"qwen3vl_lab": qwen3vl_lab.json}
    model.tokenizer                                   # transformers tokenizer

Sessions load once per `Model`; the decoders (decoder.py, fast.py) and the step functions (steps.py) run them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .config import ModelConfig, TextConfig, VisionConfig, load_hf_config
from .decoder import DecoderIO, MissingPiece, OnnxDecoder
from .errors import UserError
from .graph_check import check_graph
from .hugepages import huge_pages
from .layout import (
    DECODER_FILE,
    EMBEDDING_INPUT,
    EMBEDDING_OUTPUT,
    FAST_DECODER_FILE,
    GENAI_CONFIG,
    LOGITS,
    OWN_CONFIG,
    OWN_SECTION,
    VISION_FILE,
)
from .layouts import Layout, external_files, find_layout, read_export_config, read_genai_config
from .limits import check_threads, max_threads, others_busy_cores
from .paths import existing_dir, export_path, readable_file
from .tokenizer import load_tokenizer  # cheap: transformers itself is imported when a tokenizer loads

# Spinning is on when the other processes leave each of our threads a core: busy + threads <= cores + slack.
SPIN_BUSY_SLACK = 0.5


def spinning_pays(threads: int | None, busy: float | None = None, cores: int | None = None) -> bool:
    """Whether onnxruntime's worker threads should spin between ops: only on cores nobody else wants.

    Measured on 2-core VMs with the 2B dimensions in INT4 (alternating runs in one `bench`): on a quiet
    machine spinning made decode 5% (genai, on vs off) to 16-19% (15.4 -> 18.3 tok/s) faster; with other
    processes running, steps took up to 1.8x longer with it (a spinning thread holds a core the others need,
    and is preempted mid-op).
    `busy` (default: `limits.others_busy_cores`, the cores other processes keep busy now, watched for a
    quarter of a second) and `cores` (default: this process's) decide: spin when busy + threads <= cores +
    SPIN_BUSY_SLACK. The 1-minute load average is not used: it counts our own export or weight loading of the
    last minute as load, and chose "off" on a quiet machine right after an export."""
    cores = cores or max_threads()
    if busy is None:
        busy = others_busy_cores()
        if busy is None:  # unknown (not Linux): sleep, the safe choice on a shared machine
            return False
    return busy + (threads or cores) <= cores + SPIN_BUSY_SLACK


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime session settings. threads=None uses onnxruntime's default (one per core).

    The defaults suit decoding on a CPU: all graph optimisations (fusions, constant folding, weight
    prepacking) and the memory arena (decode steps reuse the same buffers). allow_spinning=None
    (the default) decides when sessions are made whether worker threads spin between ops or sleep
    (`spinning_pays`: spin when no other process wants the cores now, sleep when they do); True / False
    force it. huge_pages=True (the default) moves each session's prepacked weights onto 2 MiB pages once it has
    opened (Linux; `hugepages.py`): measured on the 2B dimensions in INT4, 8-15% faster decode for ~1-3 s more
    load (`qwen3vl-lab bench --huge_pages ab`)."""

    threads: int | None = None
    graph_optimization: str = "all"  # "disable", "basic", "extended", "all"
    memory_arena: bool = True
    allow_spinning: bool | None = None  # None: decided from what other processes use now (spinning_pays)
    log_severity: int = 3  # errors only: onnxruntime's warnings are noise for users
    huge_pages: bool = True  # back each session's prepacked weights with 2 MiB pages once it opens (hugepages.py)

    def __post_init__(self):
        check_threads(self.threads, "threads")  # more threads than cores: refused here (limits.py)

    def spinning(self) -> bool:
        """allow_spinning, or when it is None what the other processes' CPU use says now (spinning_pays)."""
        return self.allow_spinning if self.allow_spinning is not None else spinning_pays(self.threads)

    def resolved(self) -> "RuntimeOptions":
        """These options with the spinning decision taken now (so several sessions share one decision)."""
        return replace(self, allow_spinning=self.spinning())

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
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning() else "0")
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
        with huge_pages(options.huge_pages):
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
    embedding: ort.InferenceSession | None  # None: the decoder embeds token ids itself
    decoder_session: ort.InferenceSession | None = None  # None: model.onnx is opened on first use of .decoder
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    accept_missing: bool = False  # run prompts that need a piece the decoder graph lacks (decoder.MissingPiece)
    layout: Layout | None = None  # which kind of export this is and where its files are (layouts.py)

    @property
    def decoder(self) -> ort.InferenceSession:
        """The teaching decoder (model.onnx): every step inspectable, the cache a plain array."""
        if self.decoder_session is None:
            self.decoder_session = open_session(self.decoder_file, self.options, self._checked_config, "decoder")
        return self.decoder_session

    @property
    def _checked_config(self) -> ModelConfig | None:
        """The config our graphs are checked against when a session opens (graph_check.py); None for foreign
        exports, whose config was read from the graph itself."""
        return self.config if self.kind == "qwen3vl-lab" else None

    @property
    def decoder_file(self) -> Path:
        return self.layout.decoder if self.layout else self.folder / DECODER_FILE

    def graph(self) -> onnx.ModelProto:
        """The decoder graph without its weights (for reading nodes, or editing a copy: `edited_session`)."""
        return load_graph(self.decoder_file.parent, self.decoder_file.name)

    @property
    def kind(self) -> str:
        """"qwen3vl-lab" (ours), "guide", "genai", "onnx-community" or "single-decoder"."""
        return self.layout.kind if self.layout else "qwen3vl-lab"

    @property
    def notices(self) -> list[str]:
        """What is filled in or missing, to say on stderr and in --json: the layout's notices, then what the
        decoder graph lacks against ours (3-D positions, DeepStack, an embeddings input)."""
        out = list(self.layout.notices) if self.layout else []
        if self.kind != "qwen3vl-lab":
            missing = self.teaching_decoder.io.missing
            if missing:
                out.append(f"this {self.kind} decoder lacks {'; '.join(missing)}: text prompts run as they "
                           "should; image prompts are refused unless --accept_missing")
            if self.layout and self.layout.vision is not None:
                out.append(f"{self.layout.vision.name} takes other inputs than this toolkit's vision graph; images "
                           "need a qwen3vl-lab export of the checkpoint (`qwen3vl-lab export --hf_dir ...`)")
        return out

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
        own = self.genai.get(OWN_SECTION)
        return own["precision"] if isinstance(own, dict) else self.layout.precision

    @property
    def root(self) -> Path:
        if self.layout:
            return self.layout.root
        return self.folder.parent if self.folder.name.startswith("cpu-") else self.folder

    @property
    def context_length(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def has_vision(self) -> bool:
        """Our vision graph is here, or was borrowed (foreign vision graphs take other inputs: see `notices`)."""
        if "vision" in self.__dict__:
            return True
        return self.kind == "qwen3vl-lab" and "vision" in self.genai.get("model", {}) and (self.folder / VISION_FILE).is_file()

    def borrow_vision(self, other: "Model") -> None:
        """Encode images with `other`'s vision graph (our export of the same checkpoint): how a foreign decoder
        is given image prompts at all. What its decoder lacks (3-D positions, DeepStack) still applies."""
        self.use_vision(other.vision, other.config.vision, other.folder)

    def use_vision(self, session, vision: VisionConfig, source: Path | str) -> None:
        """Encode images with `session` (a vision graph's session, or anything with its `run` and
        `get_outputs`) whose model has the config `vision`; `source` names it in errors."""
        if vision.out_hidden_size != self.config.text.hidden_size:
            raise UserError(f"{source}'s images come out {vision.out_hidden_size} wide but "
                            f"{self.folder}'s decoder takes {self.config.text.hidden_size}; pass the same checkpoint")
        self.__dict__["vision"] = session
        self.config = replace(self.config, vision=vision)

    @cached_property
    def vision(self) -> ort.InferenceSession:
        if not self.has_vision:
            raise UserError(f"{self.folder} has no vision model ({VISION_FILE}); re-export the checkpoint "
                            "with `qwen3vl-lab export` to use images")
        return open_session(self.folder / VISION_FILE, self.options, self.config, "vision")

    @cached_property
    def tokenizer(self):
        if self.layout:
            return load_tokenizer(self.layout.tokenizer_dir)
        pytorch = self.root / "pytorch"
        return load_tokenizer(pytorch if pytorch.is_dir() else None)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """Token ids (B, S) -> embeddings (B, S, H): one row lookup in the embedding graph."""
        if self.embedding is None:
            raise MissingPiece(f"{self.root} has no embedding graph (its decoder takes token ids), so image features "
                               "cannot be merged; use a qwen3vl-lab export for images")
        return self.embedding.run([EMBEDDING_OUTPUT], {EMBEDDING_INPUT: np.asarray(input_ids, np.int64)})[0]

    @cached_property
    def teaching_decoder(self) -> OnnxDecoder:
        """model.onnx behind the Decoder interface: every step inspectable, the cache a plain array."""
        return OnnxDecoder(self.decoder, self.config.text, self.embed,
                           accept_missing=self.accept_missing, where=str(self.folder / DECODER_FILE))

    @cached_property
    def decoder_inputs(self) -> frozenset[str]:
        """Input names, with the optional ones (initializers that may be overridden, e.g. logits_to_keep)."""
        optional = (i.name for i in self.decoder.get_overridable_initializers())
        return frozenset(i.name for i in self.decoder.get_inputs()).union(optional)

    @cached_property
    def decoder_outputs(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.decoder.get_outputs())


def load_graph(folder: Path, name: str = DECODER_FILE) -> onnx.ModelProto:
    """A graph without its weights (initializers still point at the folder's external-data files)."""
    return onnx.load(str(Path(folder) / name), load_external_data=False)


def inspection_options(options: RuntimeOptions, graph: onnx.ModelProto) -> ort.SessionOptions:
    """Session options for a decoder opened to inspect it (the doctor's models, tapped copies): for a graph
    without MatMulNBits (fp32: a reference, a SIMULATED variant) onnxruntime's weight prepacking is off.

    Prepacking copies every fp32 MatMul weight into a packed buffer at load (about a minute and the
    decoder's size again at 2B dimensions); without it the weights stay memory-mapped from the
    external-data file, load in seconds, and the logits move by ~1e-6 (measured on the tiny model:
    2.6e-6 at most). MatMulNBits graphs keep it: their unpacked path is another kernel (the
    accuracy_level 4 int8 path is lost), i.e. not the model the user runs."""
    so = options.session_options()
    if not any(n.op_type == "MatMulNBits" for n in graph.graph.node):
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def edited_session(model: "Model", graph: onnx.ModelProto) -> ort.InferenceSession:
    """A session for an edited in-memory copy of one of `model`'s graphs; weights come from its folder
    (`inspection_options`: an fp32 copy maps them from the file instead of packing a second copy). Every
    external-data location is confined to that folder first (`external_files`), as onnxruntime does for a file."""
    external_files(graph, model.decoder_file)
    so = inspection_options(model.options, graph)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.decoder_file.parent))
    return ort.InferenceSession(graph.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def model_config(layout: Layout, genai: dict, decoder: Callable[[], ort.InferenceSession]) -> ModelConfig:
    """The model's numbers: ours from qwen3vl_lab.json; a foreign export's from the Hugging Face config it
    ships (the guide keeps the whole checkpoint in pytorch/), else from its genai_config.json and graph
    (`decoder()` opens it: only then is a foreign decoder loaded to read its config)."""
    own = genai.get(OWN_SECTION)
    if isinstance(own, dict):
        try:
            return ModelConfig.from_dict(own["config"], str(layout.folder / OWN_CONFIG))
        except (KeyError, TypeError) as e:
            raise UserError(f"{layout.folder / OWN_CONFIG} is not a qwen3vl-lab config ({type(e).__name__}: {e}); "
                            "re-run `qwen3vl-lab export`") from None
    if layout.hf_dir is not None:
        return load_hf_config(layout.hf_dir)
    if layout.tokenizer_dir is not None and (layout.tokenizer_dir / "config.json").is_file():
        return load_hf_config(layout.tokenizer_dir)  # a checkpoint folder passed as --tokenizer_dir
    info = read_genai_config(layout.genai_config) if layout.genai_config else None
    session = decoder()  # opened once, read twice
    io = DecoderIO.read(session)
    logits = next(o for o in session.get_outputs() if o.name == LOGITS)
    numbers = dict(vocab_size=logits.shape[-1] if isinstance(logits.shape[-1], int) else info and info.vocab_size,
                   hidden_size=io.hidden_size or (info and info.hidden_size), num_hidden_layers=io.num_layers,
                   num_key_value_heads=io.kv_heads or (info and info.kv_heads),
                   head_dim=io.head_dim or (info and info.head_size),
                   num_attention_heads=(info and info.num_attention_heads) or io.kv_heads)
    unknown = [k for k, v in numbers.items() if not v]
    if unknown:
        raise UserError(f"{layout.decoder}: the graph and its config do not say the model's {', '.join(unknown)}; "
                        "pass the checkpoint folder (with config.json) as --tokenizer_dir")
    text = TextConfig(**numbers, max_position_embeddings=(info and info.context_length) or TextConfig.max_position_embeddings)
    eos = (info and info.eos_token_ids) or ModelConfig.eos_token_ids
    return ModelConfig(text=text, vision=VisionConfig(deepstack_visual_indexes=()), eos_token_ids=tuple(eos)).checked(
        str(layout.genai_config or layout.decoder), "fix the export's genai_config.json or re-download it")


def load_model(model_dir: str | Path, text_precision: str = "fp32", options: RuntimeOptions | None = None,
               *, open_decoder: bool = True, tokenizer_dir: str | Path | None = None,
               accept_missing: bool = False) -> Model:
    """Open an export: ours (OUT/cpu-<precision>/), the original guide's, onnxruntime-genai's builder's,
    onnx-community's split, or a single decoder .onnx (`layouts.find_layout` says which).

    open_decoder=False defers model.onnx until `.decoder` is used (the fast path needs only model-fast.onnx).
    tokenizer_dir: where the tokenizer is when the export has none. accept_missing: run prompts that need
    a piece the decoder lacks (3-D positions, DeepStack), saying so (`model.notices`, `decoder.missing_used`)."""
    options = (options or RuntimeOptions()).resolved()  # one spinning decision for all its sessions
    path = export_path(model_dir, "--model_dir", fix="pass an export folder or a decoder .onnx file")
    layout = find_layout(path, text_precision, tokenizer_dir=tokenizer_dir)
    if layout.genai_config:
        readable_file(layout.genai_config)
    genai = read_export_config(layout.folder) if layout.genai_config else {}
    ours = layout.kind == "qwen3vl-lab"
    opened: list[ort.InferenceSession] = []  # a foreign decoder opened to read its config is kept, not reopened

    def open_foreign_decoder() -> ort.InferenceSession:
        if not opened:
            opened.append(open_session(layout.decoder, options))
        return opened[0]

    config = model_config(layout, genai, open_foreign_decoder)
    # the embedding table is gathered a few rows a step, never streamed: 2 MiB pages would cost load time for nothing
    embedding = (open_session(layout.embedding, replace(options, huge_pages=False), config, "embedding")
                 if layout.embedding else None)
    decoder = opened[0] if opened else None
    if open_decoder and decoder is None:  # ours are checked against their config when they open (graph_check)
        decoder = open_session(layout.decoder, options, config if ours else None, "decoder")
    return Model(folder=layout.folder, genai=genai, config=config, embedding=embedding, decoder_session=decoder,
                 options=options, accept_missing=accept_missing, layout=layout)


def default_threads() -> int:
    return os.cpu_count() or 1
