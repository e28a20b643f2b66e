"""Every JSON file read from a folder goes through one reader, bounded in size and depth.

    read_json(path, fix="restore the checkpoint's config.json")           # a dict, or one line naming the fix
    read_json(path, fix=..., kind=list)                                     # a list
    try_json(path)                                                          # the value, or None (caches, stamps)

A model folder is untrusted: a 200,000-deep `[[[[...]]]]` makes Python's json module raise RecursionError,
and a 10 GB "config" would be read into memory whole. The size is checked before reading, the depth after
parsing (and a RecursionError while parsing is the same refusal), so every bad file is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

MAX_BYTES = 64 * 2**20  # a config, a stamp or a cached record is kilobytes; safetensors headers are read elsewhere
MAX_DEPTH = 64  # the deepest of our files (and of every checkpoint config seen) nests 6 levels


class JsonError(UserError):
    """A JSON file that is too big, too deep, not JSON, or not the kind of value expected."""


def _depth(value, limit: int) -> int:
    """Nesting depth of a parsed JSON value (an explicit stack: the value may be deep), stopping past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json(text: str | bytes, where: str, fix: str, *, kind: type | None = dict,
               max_depth: int = MAX_DEPTH):
    """Parse JSON text; `where` names it in the one-line error (too deep, not JSON, not a `kind`)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonError(f"{where} is nested deeper than {max_depth} levels, which no config is; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JsonError(f"{where} is not valid JSON ({e}); {fix}") from None
    if _depth(value, max_depth) > max_depth:
        raise JsonError(f"{where} is nested deeper than {max_depth} levels, which no config is; {fix}")
    if kind is not None and not isinstance(value, kind):
        raise JsonError(f"{where} holds a JSON {type(value).__name__}, not {'an object' if kind is dict else 'a list'}"
                        f"; {fix}")
    return value


def read_json(path: str | Path, *, fix: str, kind: type | None = dict, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH):
    """The JSON value in `path` (a dict unless `kind` says otherwise); bad content is one line ending in `fix`.

    A missing file raises FileNotFoundError (callers say what was expected there); a file that cannot be
    read (permission) is one line."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size > max_bytes:
                raise JsonError(f"{path} is {size / 2**20:.0f} MB, more than the {max_bytes // 2**20} MB any "
                                f"config or record needs; {fix}")
            f.seek(0)
            raw = f.read(max_bytes + 1)  # a file that grows while read is still bounded
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); make it readable by you "
                        f"(e.g. chmod u+r {path}) or copy it somewhere you can read") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a JSON file; {fix}") from None
    if len(raw) > max_bytes:
        raise JsonError(f"{path} is more than the {max_bytes // 2**20} MB any config or record needs; {fix}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from None
    return parse_json(text, str(path), fix, kind=kind, max_depth=max_depth)


def try_json(path: str | Path, *, kind: type | None = dict, max_bytes: int = MAX_BYTES):
    """The JSON value in `path`, or None when it is missing, unreadable or bad in any way (what caches and
    stamps want: a bad entry is a miss, never a crash)."""
    try:
        return read_json(path, fix="", kind=kind, max_bytes=max_bytes)
    except (OSError, UserError):
        return None


__all__ = ["MAX_BYTES", "MAX_DEPTH", "JsonError", "parse_json", "read_json", "try_json"]
