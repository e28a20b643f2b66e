"""Every path a user gives, checked in one place: each error names the flag (or argument) and the fix.

    existing_dir(value, "--model_dir", fix="export a checkpoint with `qwen3vl-lab export` first")
    existing_file(value, "--image", fix="pass an image file (jpg, png, ...)")
    output_dir(value, "--output_dir")       # may not exist yet; never a file, never ''
    readable_file(path)                     # a file found inside a folder: permission denied -> one line
    os_error_message(e)                     # an OSError (permission, disk full, read-only) -> one line, or None
    inside(folder, name, what)              # a file name a model folder gives -> a path confined to that folder
    external_data(tensor, folder)           # an ONNX initializer's external data: (file inside folder, offset, length)

`name` is what the user typed: a CLI flag (`--model_dir`) or a Python argument (`model_dir`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from .errors import UserError

PERMISSION = (errno.EACCES, errno.EPERM)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def as_path(value, name: str) -> Path:
    """A str / os.PathLike that is not empty -> Path; anything else is a one-line error naming `name`."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UserError(f"{name} must be a path (a str or pathlib.Path), got {type(value).__name__} {shown}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{name} is empty; pass a path")
    if "\0" in text:
        raise UserError(f"{name} {text!r} contains a NUL character; pass a real path")
    return Path(text)


def _kind(path: Path) -> str | None:
    """'folder', 'file', 'device or pipe', or None when nothing is there (a broken link counts as nothing)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except PermissionError:
        raise UserError(f"{path} cannot be reached (permission denied on a folder above it); make the folders "
                        "on its path readable by you (e.g. chmod u+rx) or copy it somewhere you can read") from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return "device or pipe"


def existing_dir(value, name: str, *, fix: str = "pass an existing folder") -> Path:
    """A folder that exists and whose entries can be listed."""
    path = as_path(value, name)
    kind = _kind(path)
    if kind is None:
        raise UserError(f"{name} {path} does not exist; {fix}")
    if kind != "folder":
        raise UserError(f"{name} {path} is a {kind}, not a folder; {fix}")
    try:
        with os.scandir(path):
            pass
    except PermissionError:
        raise UserError(f"{name} {path} cannot be read (permission denied); make it readable by you "
                        f"(e.g. chmod u+rx {path}) or copy it somewhere you can read") from None
    return path


def export_path(value, name: str, *, fix: str = "pass an export folder") -> Path:
    """An export: a folder (checked as `existing_dir`), or one decoder .onnx file (checked as `existing_file`)."""
    path = as_path(value, name)
    if path.suffix == ".onnx" and _kind(path) == "file":
        return existing_file(path, name, fix=fix)
    return existing_dir(path, name, fix=fix)


def existing_file(value, name: str, *, fix: str = "pass an existing file") -> Path:
    """A regular file that exists and can be opened for reading."""
    path = as_path(value, name)
    kind = _kind(path)
    if kind is None:
        raise UserError(f"{name} {path} does not exist; {fix}")
    if kind != "file":
        raise UserError(f"{name} {path} is a {kind}, not a regular file; {fix}")
    return readable_file(path, name)


def readable_file(path: Path, name: str | None = None) -> Path:
    """`path` can be opened for reading; else a one-line permission error naming it."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        label = f"{name} {path}" if name else str(path)
        raise UserError(f"{label} cannot be read (permission denied); make it readable by you "
                        f"(e.g. chmod u+r {path}) or copy it somewhere you can read") from None
    return path


def _roots(folder: Path) -> tuple[Path, ...]:
    """The folders a file of `folder` may resolve into: the folder itself, and for a snapshot of the Hugging
    Face cache (`models--ORG--NAME/snapshots/REV/` or a folder in it, whose files are symlinks into
    `models--ORG--NAME/blobs/`) that blobs folder."""
    real = folder.resolve()
    for d in (real, *real.parents):
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
            return real, d.parent.parent / "blobs"
    return (real,)


def inside(folder: str | Path, name, what: str) -> Path:
    """`folder / name` for a file name that a model folder itself gives (a genai_config.json file name, an
    external-data location, a safetensors shard): the one rule for every such name. It must be a relative
    file name that, with `..` and every symlink resolved, stays inside `folder`; anything else (an absolute
    path, `../x`, a symlink leading out, a non-string) is a one-line UserError naming `what` (the file and
    the key that gave the name) and nothing is opened. onnxruntime applies the same rule to external data
    (it refuses locations outside the model's folder); our own readers apply it here."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\0" in name:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise UserError(f"{what} is {shown}, not a file name; a model folder names its files as relative paths "
                        "inside itself: restore the file or re-download the model")
    path = folder / name
    try:
        real, roots = path.resolve(), _roots(folder)
    except (OSError, RuntimeError):  # a symlink loop
        real, roots = None, ()
    if real is None or os.path.isabs(name) or not any(real == r or real.is_relative_to(r) for r in roots) or real == roots[0]:
        lexical = os.path.normpath(os.path.join(os.path.abspath(folder), name))
        how = ("a symlink loop" if real is None else
               f"which leads outside {folder} through a symlink (to {real})"
               if Path(lexical).is_relative_to(os.path.abspath(folder)) else f"which is outside {folder}")
        raise UserError(f"{what} names {name!r}, {how}; a model folder may only name files inside itself, so "
                        "nothing there is read: fix that entry, or copy the file (not a link to it) into the folder")
    return path


def external_data(tensor, folder: str | Path, graph: str | None = None) -> tuple[Path, int, int | None]:
    """(file, offset, length or None) of an ONNX initializer stored as external data, its `location`
    confined to `folder` (the graph's folder) by `inside`; offset and length must be whole numbers >= 0.
    `tensor` is an onnx.TensorProto (read by attribute: this module does not import onnx)."""
    graph = graph or f"a graph in {folder}"
    info = {e.key: e.value for e in tensor.external_data}
    what = f"{graph}: tensor {tensor.name!r} external_data location"
    path = inside(folder, info.get("location"), what)
    numbers = {}
    for key in ("offset", "length"):
        value = info.get(key)
        if value is not None and not (value.isascii() and value.isdigit()):
            raise UserError(f"{graph}: tensor {tensor.name!r} has external_data {key} {value[:40]!r}, not a whole "
                            "number >= 0; restore the file or re-export")
        numbers[key] = int(value) if value is not None else None
    return path, numbers["offset"] or 0, numbers["length"]


def output_dir(value, name: str) -> Path:
    """A folder to write into: it may not exist yet, but it is not a file and its nearest existing
    folder is writable."""
    path = as_path(value, name)
    kind = _kind(path)
    if kind is not None and kind != "folder":
        raise UserError(f"{name} {path} is a {kind}; pass a folder path (a new one, or an existing folder)")
    existing = path if kind == "folder" else _nearest_existing(path)
    if _kind(existing) != "folder":
        raise UserError(f"{name} {path} cannot be created: {existing} is a file; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path} cannot be written: {existing} is not writable by you (permission denied); "
                        f"choose a folder you can write to, or make it writable (e.g. chmod u+w {existing})")
    return path


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.absolute().parents]:
        if os.path.lexists(parent):
            return parent
    return Path("/")


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing folder); None if unknown."""
    try:
        return shutil.disk_usage(_nearest_existing(Path(path))).free
    except OSError:
        return None


def size_text(n: int | float | None) -> str:
    """Bytes -> '1.0 MB' / '3.2 GB'."""
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_full_message(folder: Path, need: int | None, name: str | None = None) -> str:
    """One line for a full disk: the folder, what is free, what the job needs, the fix."""
    where = f"{name} {folder}" if name else str(folder)
    need_text = f", about {size_text(need)} are needed" if need else ""
    return (f"the disk holding {where} is full ({size_text(free_bytes(folder))} free{need_text}); "
            "free some space or write somewhere else")


def os_error_message(e: OSError) -> str | None:
    """A one-line message for an OSError the user can fix (permission, disk full, read-only, name too long,
    path not a folder), naming the file; None for any other OSError (a bug: let it surface)."""
    where = e.filename if e.filename is not None else "a file"
    if e.errno in PERMISSION:
        return (f"permission denied on {where}; make it readable/writable by you (chmod) or use a path you own")
    if e.errno in DISK_FULL:
        return disk_full_message(Path(e.filename).parent if e.filename else Path("."), None)
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only filesystem; write somewhere else"
    if e.errno == errno.ENAMETOOLONG:
        return f"the path {str(where)[:80]}... is too long for the filesystem; use a shorter path"
    if e.errno in (errno.ENOTDIR, errno.EISDIR) and e.filename is not None:
        return f"{where}: {e.strerror}; check the path"
    return None
