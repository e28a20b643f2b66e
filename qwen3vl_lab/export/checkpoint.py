"""Read and write Hugging Face safetensors checkpoints with NumPy only (no torch).

The safetensors format is simple enough to handle by hand:

    [8 bytes: N, little-endian u64][N bytes: JSON header, space-padded][raw little-endian tensor data]

The header maps each tensor name to `{"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}`
(offsets relative to the start of the data) plus an optional `"__metadata__"` dict of strings.
A large model is split into shards `model-00001-of-0000N.safetensors` listed by
`model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {name: shard_file}}`).

Reading memory-maps the file and converts ONE tensor at a time to float32, so a 4B bf16 checkpoint
can be read on a machine with less RAM than its float32 size. NumPy has no bfloat16: a BF16 value
is the top 16 bits of a float32, so `uint16 << 16` viewed as float32 is exact. Writing rounds
float32 to bf16 to nearest-even, as torch does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..paths import inside
from .files import staging_file

SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = "model-{index:05d}-of-{count:05d}.safetensors"  # transformers' shard names

# safetensors dtype -> little-endian storage dtype that NumPy can map (BF16 is read as raw bits).
_STORAGE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# save dtype name -> safetensors dtype
SAVE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CHUNK_ELEMENTS = 1 << 24  # convert and write at most 16M elements at a time (64 MB of float32)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid safetensors file ({why}); re-download or re-export that file")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the header of one `.safetensors` file: ({name: TensorInfo}, metadata). Reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the path of a .safetensors file or re-download the checkpoint")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n < 2 or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[... 200,000 deep
        raise _corrupt(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    infos = {name: _tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()}
    return infos, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    """Validate one header entry and turn it into a TensorInfo."""
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (TypeError, KeyError, ValueError) as e:
        raise _corrupt(path, f"bad header entry for {name!r}: {e!r}") from None
    if not 0 <= begin <= end <= data_size:
        raise _corrupt(path, f"tensor {name!r} bytes [{begin}, {end}) lie outside the {data_size}-byte data area")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise _corrupt(path, f"tensor {name!r} has shape {list(shape)} {dtype} but {end - begin} bytes")
    return TensorInfo(file=path, dtype=dtype, shape=shape, start=data_start + begin, nbytes=end - begin)


def _read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a `model.safetensors.index.json`."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as e:
        raise UserError(
            f"{index_path} is not a valid safetensors index ({e!r}); re-download it or delete it to use {SAFETENSORS_NAME}"
        ) from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path}: weight_map is not a JSON object; re-download the index file")
    return weight_map


class Checkpoint:
    """The tensors of a Hugging Face safetensors checkpoint, read lazily, one at a time, as float32.

    >>> ckpt = Checkpoint.open("path/to/Qwen3-VL-2B-Instruct")
    >>> w = ckpt.get("model.language_model.norm.weight")    # np.ndarray float32
    """

    def __init__(self, root: Path, infos: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.root = root
        self._infos = infos
        self.metadata = metadata or {}

    @classmethod
    def open(cls, hf_dir: str | Path) -> "Checkpoint":
        """Open a folder holding `model.safetensors` or a sharded set, or one `.safetensors` file.

        Like transformers, a single `model.safetensors` wins over an index when both exist.
        """
        path = Path(hf_dir)
        if path.is_file():
            infos, metadata = read_safetensors_header(path)
            return cls(path, infos, metadata)
        if not path.is_dir():
            raise UserError(f"{path} does not exist; pass the folder of a Hugging Face safetensors checkpoint")
        if (path / SAFETENSORS_NAME).is_file():
            infos, metadata = read_safetensors_header(inside(path, SAFETENSORS_NAME, f"{path} (its {SAFETENSORS_NAME})"))
            return cls(path, infos, metadata)
        if (path / INDEX_NAME).is_file():
            return cls._open_sharded(path)
        raise UserError(
            f"{path} has no {SAFETENSORS_NAME} or {INDEX_NAME}; pass the folder of a Hugging Face safetensors "
            "checkpoint (or write a test one with qwen3vl_lab.export.tiny.make_tiny)"
        )

    @classmethod
    def _open_sharded(cls, root: Path) -> "Checkpoint":
        index_path = root / INDEX_NAME
        weight_map = _read_index(index_path)
        for name, shard in weight_map.items():  # every shard name a file inside root, before any is opened
            inside(root, shard, f"{index_path} weight_map[{name!r}]")
        headers: dict[str, dict[str, TensorInfo]] = {}
        metadata: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):  # strings, each a file inside root (checked above)
            if not (root / shard).is_file():
                raise UserError(f"{root / shard} is missing but {index_path.name} lists it; download every shard")
            headers[shard], meta = read_safetensors_header(root / shard)
            metadata = metadata or meta
        infos = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise UserError(f"{index_path} puts {name!r} in {shard}, which lacks it; re-download the checkpoint")
            infos[name] = headers[shard][name]
        return cls(root, infos, metadata)

    # -- queries -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, in sorted order."""
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self):
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, {len(self)} tensors)"

    def info(self, name: str) -> TensorInfo:
        """File, dtype, shape and byte range of one tensor; UserError when it is absent."""
        try:
            return self._infos[name]
        except KeyError:
            raise UserError(
                f"tensor {name!r} is not in checkpoint {self.root} ({len(self)} tensors); "
                "check the name against Checkpoint.names()"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype: "BF16", "F16", "F32", ..."""
        return self.info(name).dtype

    def files(self) -> list[Path]:
        """The .safetensors files holding the tensors."""
        return sorted({i.file for i in self._infos.values()})

    # -- data --------------------------------------------------------------------------------

    def get(self, name: str) -> np.ndarray:
        """One tensor as a new float32 array (BF16/F16/F32/F64 on disk); memory-mapped, so only it is read."""
        info = self.info(name)
        storage = _STORAGE.get(info.dtype)
        if storage is None:
            raise UserError(
                f"tensor {name!r} in {info.file} is {info.dtype}; only F32, F16, BF16 and F64 tensors can be read as float32"
            )
        if info.numel == 0:
            return np.zeros(info.shape, np.float32)
        raw = np.memmap(info.file, dtype=storage, mode="r", offset=info.start, shape=(info.numel,))
        try:
            return _to_float32(raw, info.dtype).reshape(info.shape)
        finally:
            del raw  # drop the mapping now rather than at garbage collection


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Convert raw stored values to a fresh float32 array."""
    if dtype == "BF16":
        bits = np.empty(raw.shape, np.uint32)
        bits[...] = raw
        bits <<= 16
        return bits.view(np.float32)
    return np.array(raw, dtype=np.float32)  # F32 (copied out of the map), F16, F64; a plain ndarray


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its shape now and made only when it is written (for bounded-memory writes).

    `make()` must return an array of exactly `shape`; any float dtype is accepted.
    """

    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


TensorLike = np.ndarray | LazyTensor


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of float32 values, rounded to nearest-even exactly like torch.

    Values that round past the largest bf16 become inf. NaN becomes the quiet NaN 0x7FC0, as torch's
    scalar `c10::BFloat16` does (torch's vectorised tensor cast writes 0xFFFF, also a NaN).
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bf16 bit patterns (uint16); exact."""
    return _to_float32(np.asarray(bits, dtype=np.uint16), "BF16")


def _check_dtype(dtype: str) -> str:
    if dtype not in SAVE_DTYPES:
        raise UserError(f"dtype {dtype!r} cannot be written; use one of {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[dtype]


def _nbytes(t: TensorLike, st_dtype: str) -> int:
    return math.prod(t.shape) * _ITEMSIZE[st_dtype]


def _encode_chunk(chunk: np.ndarray, st_dtype: str) -> np.ndarray:
    """Convert a 1-D chunk to the little-endian bytes of the stored dtype."""
    if st_dtype == "BF16":
        return float32_to_bfloat16_bits(chunk.astype(np.float32, copy=False)).astype("<u2", copy=False)
    with np.errstate(over="ignore"):  # float16 overflows to inf, as torch's cast does
        return chunk.astype(_STORAGE[st_dtype], copy=False)


def _write_tensor(f, name: str, t: TensorLike, st_dtype: str) -> None:
    """Materialise (if lazy), convert in chunks and append one tensor's bytes."""
    arr = t.make() if isinstance(t, LazyTensor) else t
    arr = np.asarray(arr)
    if tuple(arr.shape) != tuple(t.shape):
        raise ValueError(f"LazyTensor {name!r} declared shape {t.shape} but made {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UserError(f"tensor {name!r} has dtype {arr.dtype}; pass float arrays to save_safetensors")
    flat = arr.reshape(-1)
    for i in range(0, flat.size, _CHUNK_ELEMENTS):
        f.write(np.ascontiguousarray(_encode_chunk(flat[i : i + _CHUNK_ELEMENTS], st_dtype)).data)


def _header_bytes(tensors: Mapping[str, TensorLike], st_dtype: str, metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix + JSON header, space-padded to a multiple of 8 like the reference writer."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise UserError(f"safetensors metadata must map str to str; fix the entries {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in tensors.items():
        size = _nbytes(t, st_dtype)
        header[name] = {"dtype": st_dtype, "shape": [int(d) for d in t.shape], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_atomically(path: Path, write: Callable[[object], None]) -> None:
    """Run `write(file)` into a temporary file next to `path`, then rename it into place."""
    with staging_file(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_safetensors(
    path: str | Path,
    tensors: Mapping[str, TensorLike],
    dtype: str = "float32",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `tensors` to one `.safetensors` file, every tensor stored as `dtype`.

    dtype: "float32", "bfloat16" (round-to-nearest-even from float32, as torch) or "float16".
    metadata defaults to {"format": "pt"}, what transformers writes. Values may be `LazyTensor`s,
    made one at a time while writing. The file is written under a temporary name, then renamed.
    """
    path = Path(path)
    st_dtype = _check_dtype(dtype)
    metadata = {"format": "pt"} if metadata is None else metadata
    header = _header_bytes(tensors, st_dtype, metadata)
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist; create it before saving {path.name}")

    def write(f) -> None:
        f.write(header)
        for name, t in tensors.items():
            _write_tensor(f, name, t, st_dtype)

    _write_atomically(path, write)
    return path


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int | None) -> list[list[str]]:
    """Group tensor names into shards exactly as huggingface_hub's `split_state_dict_into_shards_factory`.

    Greedy in order; a tensor larger than the limit gets a shard of its own, inserted where it was met.
    """
    sizes = list(sizes)
    if max_shard_bytes is None:
        return [[name for name, _ in sizes]] if sizes else [[]]
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current_size + size > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards or [[]]


def _remove_stale_weights(out_dir: Path, keep: set[str]) -> None:
    """Delete weight files of an earlier save that this save does not replace (as transformers does)."""
    for p in out_dir.iterdir():
        stale = p.name == SAFETENSORS_NAME or p.name == INDEX_NAME or (
            p.name.startswith("model-") and p.name.endswith(".safetensors") and "-of-" in p.name
        )
        if stale and p.name not in keep:
            p.unlink()


def save_checkpoint_weights(
    out_dir: str | Path,
    tensors: Mapping[str, TensorLike],
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write the weights of a checkpoint folder as transformers' `save_pretrained` does.

    One `model.safetensors`, or, when the tensors exceed `max_shard_bytes`, shards
    `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json` (metadata total_size and
    total_parameters, weight_map sorted). Shards are written one at a time; `LazyTensor` values are
    made one at a time. Returns the written files (index last).
    """
    out_dir = Path(out_dir)
    st_dtype = _check_dtype(dtype)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}; pass None for one file")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(((n, _nbytes(t, st_dtype)) for n, t in tensors.items()), max_shard_bytes)
    if len(shards) == 1:
        _remove_stale_weights(out_dir, keep={SAFETENSORS_NAME})
        return [save_safetensors(out_dir / SAFETENSORS_NAME, tensors, dtype)]

    names = [SHARD_PATTERN.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
    _remove_stale_weights(out_dir, keep=set(names) | {INDEX_NAME})
    written, weight_map = [], {}
    for file_name, shard in zip(names, shards):
        written.append(save_safetensors(out_dir / file_name, {n: tensors[n] for n in shard}, dtype))
        weight_map.update({n: file_name for n in shard})
    index = {
        "metadata": {
            "total_parameters": sum(math.prod(t.shape) for t in tensors.values()),
            "total_size": sum(_nbytes(t, st_dtype) for t in tensors.values()),
        },
        "weight_map": weight_map,
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    _write_atomically(out_dir / INDEX_NAME, lambda f: f.write(text.encode("utf-8")))
    written.append(out_dir / INDEX_NAME)
    return written
