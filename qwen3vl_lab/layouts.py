"""Which kind of Qwen3-VL ONNX export a path holds, and where its files are.

    layout = find_layout("models/theirs", "int4")     # a folder root, a precision folder or a decoder .onnx
    layout.kind            "qwen3vl-lab" | "guide" | "genai" | "onnx-community" | "single-decoder"
    layout.decoder         the text decoder graph; layout.embedding / layout.vision (or None)
    layout.genai_config    genai_config.json (or None); read_genai_config(path) -> GenaiInfo
    read_export_config(folder)  one of our folders' genai_config.json + qwen3vl_lab.json, as one dict
    layout.tokenizer_dir   where the tokenizer is (None: the package's copy; layout.notices says so)

The kinds, as they are found on disk:

    qwen3vl-lab      OUT/cpu-<p>/{model.onnx, qwen3vl-embedding.onnx, [qwen3vl-vision.onnx], genai_config.json,
                     qwen3vl_lab.json (older exports: a "qwen3vl_lab" section in genai_config.json)}, OUT/pytorch/
    guide            the original guide's builder: MODEL/cpu-fp32/{model.onnx, qwen3vl-embedding.onnx,
                     genai_config.json, tokenizer.json, ...}, MODEL/cpu-int4/{model.onnx, genai_config.json, ...}
                     (its embedding lives in cpu-fp32 only), MODEL/pytorch/ (the Hugging Face checkpoint)
    genai            onnxruntime-genai's builder: one folder, genai_config.json + the decoder it names
                     (input_ids, or inputs_embeds with exclude_embeds), plus the embedding/vision its config names
    onnx-community   the transformers.js split: ROOT/onnx/{decoder_model_merged,embed_tokens,vision_encoder}<suffix>.onnx,
                     suffix "" fp32, "_fp16", "_q4", "_q4f16", "_quantized" (q8), ...; tokenizer.json at ROOT
    single-decoder   one decoder .onnx (named, or the only candidate in a folder of graphs)

Nothing here opens an onnxruntime session: only file names, genai_config.json and (to tell the
precision of a folder whose name does not say it) the decoder's graph without its weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import UserError
from .jsonfile import read_json
from .layout import DECODER_FILE, EMBEDDING_FILE, GENAI_CONFIG, LOGITS, OWN_CONFIG, OWN_SECTION, TOKENIZER_FILE, VISION_FILE
from .paths import external_data, inside

KINDS = ("qwen3vl-lab", "guide", "genai", "onnx-community", "single-decoder")
PYTORCH_DIR = "pytorch"  # the Hugging Face folder beside the precision folders (ours: config + tokenizer only)
COMMUNITY_DIR = "onnx"
COMMUNITY_DECODERS = ("decoder_model_merged", "model")  # the VLM split's decoder; a text-only repository's
COMMUNITY_EMBEDDING = "embed_tokens"
COMMUNITY_VISION = "vision_encoder"
# transformers.js dtype -> file suffix (its DEFAULT_DTYPE_SUFFIX_MAPPING), under our precision names
COMMUNITY_SUFFIXES = {"fp32": "", "fp16": "_fp16", "int4": "_q4", "q4f16": "_q4f16", "int8": "_quantized",
                      "int8s": "_int8", "uint8": "_uint8", "bnb4": "_bnb4"}
GENAI_TYPES = ("qwen3", "qwen3_vl_text", "qwen3_vl", "qwen3vl")  # what Qwen3-VL exports write as model.type
NOT_DECODERS = ("embed", "vision", "visual")  # graph names that are not a decoder, in a folder of graphs
PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8", "int4")
EXPORT_PRECISIONS = ("fp32", "int4")  # what `qwen3vl-lab export --precision` offers


# ---------------------------------------------------------------------------------------------------
# genai_config.json
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenaiInfo:
    """The numbers of a genai_config.json that a runtime needs (None where the file does not say)."""

    path: Path
    type: str | None
    num_layers: int | None
    num_attention_heads: int | None
    kv_heads: int | None
    head_size: int | None
    hidden_size: int | None
    vocab_size: int | None
    context_length: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    decoder_file: str | None
    decoder_inputs: dict = field(default_factory=dict)  # role -> graph name ("past_key_names": "past_key_values.%d.key")
    decoder_outputs: dict = field(default_factory=dict)
    embedding_file: str | None = None
    vision_file: str | None = None
    has_own_section: bool = False  # an older qwen3vl-lab export: our settings inside genai_config.json

    @property
    def is_qwen3(self) -> bool:
        return self.type in GENAI_TYPES


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ids(value) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(int(v) for v in values if _int_or_none(v) is not None)


def _section(d: dict, key: str) -> dict:
    value = d.get(key)
    return value if isinstance(value, dict) else {}


def _load_json(path: Path) -> dict:
    try:
        return read_json(path, fix="restore the file or re-export")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass the folder of an export that has one") from None


def read_genai_config(path: str | Path) -> GenaiInfo:
    """Read any Qwen3(-VL) genai_config.json (ours, the guide's, onnxruntime-genai's builder's).

    `path` is the file or the folder holding it. Missing keys are None; only a file that is not a
    JSON object with a "model" section is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / GENAI_CONFIG
    data = _load_json(path)
    model = data.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{path} has no \"model\" section, so it is not an onnxruntime-genai config; "
                        "pass the folder of an exported model")
    decoder = _section(model, "decoder")
    num = lambda d, k: _int_or_none(d.get(k))  # noqa: E731
    return GenaiInfo(
        path=path,
        type=model.get("type") if isinstance(model.get("type"), str) else None,
        num_layers=num(decoder, "num_hidden_layers"),
        num_attention_heads=num(decoder, "num_attention_heads"),
        kv_heads=num(decoder, "num_key_value_heads"),
        head_size=num(decoder, "head_size"),
        hidden_size=num(decoder, "hidden_size"),
        vocab_size=num(model, "vocab_size"),
        context_length=num(model, "context_length"),
        eos_token_ids=_ids(model.get("eos_token_id")),
        bos_token_id=num(model, "bos_token_id"),
        pad_token_id=num(model, "pad_token_id"),
        decoder_file=decoder.get("filename") if isinstance(decoder.get("filename"), str) else None,
        decoder_inputs=dict(_section(decoder, "inputs")),
        decoder_outputs=dict(_section(decoder, "outputs")),
        embedding_file=_section(model, "embedding").get("filename"),
        vision_file=_section(model, "vision").get("filename"),
        has_own_section=isinstance(data.get(OWN_SECTION), dict),
    )


# ---------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where one export's files are, for one precision."""

    kind: str  # one of KINDS
    root: Path  # the export's top folder (the decoder's folder for a single decoder)
    folder: Path  # the folder holding the decoder
    precision: str  # "fp32", "int4", ... (of the decoder picked)
    decoder: Path
    embedding: Path | None  # None: the decoder takes input_ids (embedding inside), or the export has none
    vision: Path | None
    genai_config: Path | None
    tokenizer_dir: Path | None  # None: no tokenizer found; use the package's copy (see notices)
    hf_dir: Path | None  # the Hugging Face checkpoint shipped with the export (config.json + safetensors)
    precisions: tuple[str, ...]  # the precisions this export has
    notices: tuple[str, ...] = ()  # what was filled in or is missing: say each on stderr / in --json


def find_layout(path: str | Path, precision: str | None = None, *, tokenizer_dir: str | Path | None = None) -> Layout:
    """The layout at `path`: an export's root, one of its precision folders, or a decoder .onnx file.

    precision: which decoder to pick at a root holding several (None: fp32 if present, else the
    first); a precision folder or a decoder file is used as it is. tokenizer_dir: where the
    tokenizer is, overriding the search (needed for a lone decoder file without tokenizer.json beside it).
    Raises UserError (one line: what was found, what is expected) for anything else, and for a graph that
    is a symlink leading out of its folder (`paths.inside`: nothing outside a model folder is read)."""
    given = Path(path).expanduser()
    layout = _find_layout(given, precision, tokenizer_dir)
    graphs = [g for g in (layout.decoder, layout.embedding, layout.vision) if g is not None]
    for graph in graphs:
        if graph != given:  # a decoder file the user names is theirs to link
            inside(graph.parent, graph.name, f"{graph.parent} (its file {graph.name})")
    for folder in {layout.folder, layout.hf_dir, layout.tokenizer_dir, *(g.parent for g in graphs)} - {None, given}:
        if layout.root in folder.parents:  # a folder of the export (pytorch/, the guide's cpu-fp32/): inside it too
            _subfolder(layout.root, folder)
    return layout


def _find_layout(path: Path, precision: str | None, tokenizer_dir: str | Path | None) -> Layout:
    if not path.exists():
        raise UserError(f"{path} does not exist; pass an export folder or a decoder .onnx file")
    explicit_tok = _explicit_tokenizer_dir(tokenizer_dir)
    if path.is_file():
        if path.suffix != ".onnx":
            raise UserError(f"{path} is a file, not an export folder; pass the folder that holds it "
                            "(or a decoder .onnx file)")
        return _single_decoder(path, path.parent, explicit_tok)
    community = _community_dir(path)
    precision_dirs = _precision_dirs(path)
    if community is not None and precision_dirs:
        raise UserError(f"{path} holds two exports ({community.name}/ of onnx-community and "
                        f"{', '.join(d.name for d in precision_dirs.values())}); pass one of them")
    if community is not None:
        return _community(_subfolder(path, community), precision, explicit_tok)
    if (path / GENAI_CONFIG).is_file():
        root = path.parent if _cpu_precision(path.name) else path
        return _precision_folder(path, root, explicit_tok)
    if precision_dirs:
        chosen = _choose_precision(path, precision_dirs, precision)
        return _precision_folder(_subfolder(path, precision_dirs[chosen]), path, explicit_tok)
    candidates = _decoder_candidates(path)
    if len(candidates) == 1:
        return _single_decoder(candidates[0], path, explicit_tok)
    if len(candidates) > 1:
        raise UserError(f"{path} holds {len(candidates)} candidate decoders ({', '.join(c.name for c in candidates)}) "
                        "and no genai_config.json naming one; pass the decoder .onnx file itself")
    raise UserError(f"{path} holds none of the known export layouts (found {_listing(path)}); expected "
                    "cpu-<precision>/genai_config.json (qwen3vl-lab, the guide), genai_config.json + its decoder "
                    "(onnxruntime-genai), onnx/decoder_model_merged*.onnx (onnx-community) or a decoder .onnx file")


# ---------------------------------------------------------------------------------------------------
# The kinds
# ---------------------------------------------------------------------------------------------------


def _precision_folder(folder: Path, root: Path, explicit_tok: Path | None) -> Layout:
    """A folder with genai_config.json: ours, the guide's or onnxruntime-genai's builder's."""
    info = read_genai_config(folder)
    decoder = (inside(folder, info.decoder_file, f"{info.path} model.decoder.filename") if info.decoder_file
               else inside(folder, DECODER_FILE, str(folder)))
    if not decoder.is_file():
        raise UserError(f"{info.path} names the decoder {decoder.name}, which is missing from {folder}; "
                        "copy it back or re-export")
    ours = info.has_own_section or (folder / OWN_CONFIG).is_file()
    notices: list[str] = []
    embedding = vision = None
    if ours:
        kind = "qwen3vl-lab"
        embedding = _file_or_none(folder / EMBEDDING_FILE)
        vision = _file_or_none(folder / VISION_FILE)
    else:
        guide_fp32 = root / "cpu-fp32"  # the guide writes its embedding (and vision) into cpu-fp32 only
        guide_embedding = _first_file(folder / EMBEDDING_FILE, guide_fp32 / EMBEDDING_FILE)
        if guide_embedding is not None:
            kind, embedding = "guide", guide_embedding
            vision = _first_file(folder / VISION_FILE, guide_fp32 / VISION_FILE)
        else:
            kind = "genai"
            embedding = _named_file(folder, info.embedding_file, "embedding", info.path, notices)
            vision = _named_file(folder, info.vision_file, "vision", info.path, notices)
    precision = _cpu_precision(folder.name) or _own_precision(folder) or graph_precision(decoder)
    if _cpu_precision(folder.name) and root != folder:
        precisions = tuple(_precision_dirs(root)) or (precision,)
    else:
        precisions = (precision,)
    tok = _tokenizer_dir(explicit_tok, (folder, root), root / PYTORCH_DIR, notices)
    return Layout(kind=kind, root=root, folder=folder, precision=precision, decoder=decoder, embedding=embedding,
                  vision=vision, genai_config=info.path, tokenizer_dir=tok, hf_dir=_hf_dir(root / PYTORCH_DIR),
                  precisions=precisions, notices=tuple(notices))


def _community(onnx_dir: Path, precision: str | None, explicit_tok: Path | None) -> Layout:
    """ROOT/onnx/{decoder_model_merged,embed_tokens,vision_encoder}<suffix>.onnx."""
    root = onnx_dir.parent
    by_stem = _community_decoders(onnx_dir)  # stem -> precision -> path
    if len(by_stem) > 1:
        names = sorted(p.name for found in by_stem.values() for p in found.values())
        raise UserError(f"{onnx_dir} holds two candidate decoders ({', '.join(names)}); pass the decoder "
                        ".onnx file itself")
    decoders = next(iter(by_stem.values()))
    chosen = _choose_precision(onnx_dir, decoders, precision, community=True)
    suffix = COMMUNITY_SUFFIXES[chosen]
    notices: list[str] = []
    embedding = _community_part(onnx_dir, COMMUNITY_EMBEDDING, suffix, notices)
    vision = _community_part(onnx_dir, COMMUNITY_VISION, suffix, notices)
    tok = _tokenizer_dir(explicit_tok, (root, onnx_dir), root / PYTORCH_DIR, notices)
    hf = _hf_dir(root) or _hf_dir(root / PYTORCH_DIR)
    return Layout(kind="onnx-community", root=root, folder=onnx_dir, precision=chosen, decoder=decoders[chosen],
                  embedding=embedding, vision=vision, genai_config=None, tokenizer_dir=tok, hf_dir=hf,
                  precisions=tuple(decoders), notices=tuple(notices))


def _single_decoder(decoder: Path, folder: Path, explicit_tok: Path | None) -> Layout:
    """One decoder graph; an embedding beside it only when exactly one graph there is named like one."""
    notices: list[str] = []
    embeddings = [p for p in sorted(folder.glob("*.onnx")) if "embed" in p.name.lower() and p != decoder]
    embedding = embeddings[0] if len(embeddings) == 1 else None
    vision = [p for p in sorted(folder.glob("*.onnx")) if ("vision" in p.name.lower() or "visual" in p.name.lower())]
    precision = graph_precision(decoder)
    tok = _tokenizer_dir(explicit_tok, (folder,), None, notices)
    return Layout(kind="single-decoder", root=folder, folder=folder, precision=precision, decoder=decoder,
                  embedding=embedding, vision=vision[0] if len(vision) == 1 else None, genai_config=None,
                  tokenizer_dir=tok, hf_dir=None, precisions=(precision,), notices=tuple(notices))


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _subfolder(root: Path, folder: Path) -> Path:
    """`folder`, a folder of the export at `root` (cpu-int4/, onnx/), checked before anything in it is read:
    it may not be a symlink leading out of the export (`paths.inside`)."""
    if folder != root:
        inside(root, folder.relative_to(root).as_posix(), f"{root} (its folder {folder.name})")
    return folder


def _cpu_precision(name: str) -> str | None:
    """'cpu-int4' -> 'int4'; also the builder's long names ('cpu-int4-rtn-block-32-acc-level-4' -> 'int4')."""
    m = re.match(r"^cpu-(fp32|fp16|bf16|int8|int4)(?:$|[-_])", name)
    return m.group(1) if m else None


def _precision_dirs(root: Path) -> dict[str, Path]:
    """precision -> ROOT/cpu-<precision> for the precision folders holding a genai_config.json."""
    found: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        precision = _cpu_precision(d.name)
        if precision and (d / GENAI_CONFIG).is_file():
            found.setdefault(precision, d)
    return dict(sorted(found.items(), key=lambda kv: _precision_rank(kv[0])))


def _precision_rank(precision: str) -> int:
    return PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)


def _choose_precision(where: Path, available: dict, precision: str | None, community: bool = False) -> str:
    if precision is None:
        return next(iter(available))
    if precision in available:
        return precision
    shown = ", ".join(available)
    if community:
        names = {COMMUNITY_SUFFIXES[p] or "(no suffix)": p for p in available}
        shown = ", ".join(f"{p} ({s})" for s, p in names.items())
    how = f"or export with --precision {precision}" if precision in EXPORT_PRECISIONS else \
        f"(`qwen3vl-lab export` writes {' and '.join(EXPORT_PRECISIONS)} only)"
    raise UserError(f"{where} has no {precision} decoder (found {shown}); pass --text_precision "
                    f"{next(iter(available))} {how}")


def own_settings(folder: str | Path) -> dict | None:
    """Our settings for a qwen3vl-lab precision folder: qwen3vl_lab.json, else (older exports) the
    "qwen3vl_lab" section of genai_config.json; None for a folder that has neither."""
    folder = Path(folder)
    if (folder / OWN_CONFIG).is_file():
        return _load_json(folder / OWN_CONFIG)
    if (folder / GENAI_CONFIG).is_file():
        section = _load_json(folder / GENAI_CONFIG).get(OWN_SECTION)
        return section if isinstance(section, dict) else None
    return None


def read_export_config(folder: str | Path) -> dict:
    """genai_config.json of one of our precision folders, with our settings under "qwen3vl_lab".

    They come from qwen3vl_lab.json beside it; exports older than that file kept them inside
    genai_config.json, which is read as it is. A folder with neither has no "qwen3vl_lab" entry."""
    folder = Path(folder)
    config = _load_json(folder / GENAI_CONFIG)
    if (folder / OWN_CONFIG).is_file():
        config[OWN_SECTION] = _load_json(folder / OWN_CONFIG)
    return config


def _own_precision(folder: Path) -> str | None:
    value = (own_settings(folder) or {}).get("precision")
    return value if isinstance(value, str) else None


def graph_precision(decoder: Path) -> str:
    """'int4' / 'int8' (MatMulNBits bits), 'fp16' (float16 logits) or 'fp32', read from the graph (no weights)."""
    try:
        model = onnx.load(str(decoder), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ... for a file that is not a model
        raise UserError(f"{decoder} is not a readable ONNX model ({type(e).__name__}); re-export or re-download it") from None
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits}"
    logits = next((o for o in model.graph.output if o.name == LOGITS), None)
    if logits is not None and logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


def external_files(model: onnx.ModelProto, graph_file: Path) -> list[Path]:
    """The external-data files `graph_file`'s initializers name (each confined to its folder by `paths.inside`:
    a location outside it is a one-line UserError naming the graph and the tensor), in first-use order."""
    files = (external_data(t, graph_file.parent, str(graph_file))[0] for t in model.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL)
    return list(dict.fromkeys(files))


def _community_dir(path: Path) -> Path | None:
    """ROOT/onnx (given ROOT or ROOT/onnx) when it holds a community decoder file."""
    for d in (path / COMMUNITY_DIR, path):
        if d.is_dir() and d.name == COMMUNITY_DIR and _community_decoders(d):
            return d
    return None


def _community_decoders(onnx_dir: Path) -> dict[str, dict[str, Path]]:
    """decoder stem -> precision -> onnx/<stem><suffix>.onnx, for the suffixes transformers.js knows."""
    precision_of = {s: p for p, s in COMMUNITY_SUFFIXES.items()}
    found: dict[str, dict[str, Path]] = {}
    for f in sorted(onnx_dir.glob("*.onnx")):
        for stem in COMMUNITY_DECODERS:
            if f.stem.startswith(stem) and f.stem[len(stem):] in precision_of:
                found.setdefault(stem, {})[precision_of[f.stem[len(stem):]]] = f
    return {stem: {p: d[p] for p in COMMUNITY_SUFFIXES if p in d} for stem, d in found.items()}


def _community_part(onnx_dir: Path, stem: str, suffix: str, notices: list[str]) -> Path | None:
    own = onnx_dir / f"{stem}{suffix}.onnx"
    if own.is_file():
        return own
    fallback = onnx_dir / f"{stem}.onnx"
    if fallback.is_file():
        notices.append(f"{own.name} is missing; using {fallback.name} (fp32) for that part")
        return fallback
    return None


def _decoder_candidates(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.onnx")) if not any(w in p.name.lower() for w in NOT_DECODERS)]


def _file_or_none(path: Path) -> Path | None:
    return path if path.is_file() else None


def _first_file(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _named_file(folder: Path, name, part: str, config: Path, notices: list[str]) -> Path | None:
    if name is None or name == "":  # not named
        return None
    path = inside(folder, name, f"{config} model.{part}.filename")
    if not path.is_file():
        notices.append(f"{config.name} names the {part} model {name}, which is missing from {folder}")
        return None
    return path


def _has_tokenizer(folder: Path, *, json_only: bool) -> bool:
    if (folder / TOKENIZER_FILE).is_file():
        return True
    return not json_only and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def _explicit_tokenizer_dir(tokenizer_dir: str | Path | None) -> Path | None:
    if tokenizer_dir is None:
        return None
    folder = Path(tokenizer_dir).expanduser()
    if not folder.exists():
        raise UserError(f"--tokenizer_dir {folder} does not exist; pass the folder holding tokenizer.json")
    if not folder.is_dir():
        raise UserError(f"--tokenizer_dir {folder} is a file; pass the folder that holds it")
    if not _has_tokenizer(folder, json_only=False):
        raise UserError(f"--tokenizer_dir {folder} has no tokenizer.json (nor vocab.json + merges.txt); "
                        "pass the folder of a Qwen3-VL tokenizer")
    return folder


def _tokenizer_dir(explicit: Path | None, folders: tuple[Path, ...], pytorch: Path | None,
                   notices: list[str]) -> Path | None:
    """The explicit folder, else the first of `folders` with tokenizer.json, else pytorch/ with any tokenizer files."""
    if explicit is not None:
        return explicit
    for folder in dict.fromkeys(folders):
        if _has_tokenizer(folder, json_only=True):
            return folder
    if pytorch is not None and pytorch.is_dir() and _has_tokenizer(pytorch, json_only=False):
        return pytorch
    notices.append(f"no tokenizer found beside {folders[0]}; using the package's copy of the Qwen3-VL tokenizer "
                   "(pass --tokenizer_dir to use another)")
    return None


def _hf_dir(folder: Path) -> Path | None:
    """The folder when it is a Hugging Face checkpoint: config.json and weights (*.safetensors)."""
    if folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return None


def _listing(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return "nothing: it is empty"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
