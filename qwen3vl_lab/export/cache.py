"""Folders this toolkit derives and keeps: made once, by content, never inside a user's folder.

    cache_dir()                      $QWEN3VL_LAB_CACHE, else $XDG_CACHE_HOME/qwen3vl-lab, else ~/.cache/qwen3vl-lab
    build_once(final, build)         build(tmp) into a private temp folder, then rename it to `final`
    reference_export(hf_dir)         our fp32 export of a checkpoint (the doctor's reference; the vision graph
                                     a foreign export lacks), keyed by the checkpoint's files and our exporter
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .exporter import export
from .files import staging_folder

PACKAGE = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where made-on-first-use models live (created if missing). A setting that names a file, a device
    (/dev/null) or a folder that cannot be made is one line naming the environment variable it came from."""
    if os.environ.get("QWEN3VL_LAB_CACHE"):
        variable, root = "QWEN3VL_LAB_CACHE", Path(os.environ["QWEN3VL_LAB_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        variable, root = "XDG_CACHE_HOME", Path(os.environ["XDG_CACHE_HOME"]) / "qwen3vl-lab"
    else:
        variable, root = "QWEN3VL_LAB_CACHE", Path.home() / ".cache" / "qwen3vl-lab"  # the one to set instead
    fix = "set QWEN3VL_LAB_CACHE to a folder you can write to (e.g. export QWEN3VL_LAB_CACHE=~/qwen3vl-cache)"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"the cache folder {root} (from ${variable}) is a file or a device, not a folder; {fix}") from None
    except NotADirectoryError:
        raise UserError(f"the cache folder {root} (from ${variable}) cannot be made: a file is in its path; {fix}") from None
    except OSError as e:
        raise UserError(f"the cache folder {root} (from ${variable}) cannot be made ({e.strerror}); {fix}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"the cache folder {root} (from ${variable}) is not writable by you; {fix}")
    return root


def exporter_hash(*extra: Path) -> str:
    """A short hash of the source files that decide what make_tiny and export write (and of `extra` files)."""
    files = sorted((PACKAGE / "export").glob("*.py")) + [PACKAGE / "config.py", PACKAGE / "layout.py"] + list(extra)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """Run build(tmp_folder) into a private temp folder, then rename it to `final` (first writer wins)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(final.parent, f".{final.name}.", name="the cache folder", shown=final) as tmp:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: use its folder
            if not final.is_dir():
                raise
    return final


def checkpoint_key(hf_dir: Path) -> str:
    """What identifies a checkpoint's content cheaply: its config and each weight file's name, size and mtime."""
    h = hashlib.sha256()
    for f in sorted(hf_dir.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def reference_export(hf_dir: str | Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """Our fp32 export of the checkpoint at `hf_dir`, made once into the cache (the user's folders are only read)."""
    hf_dir = Path(hf_dir).resolve()
    final = cache_dir() / "reference" / f"{hf_dir.name}-{checkpoint_key(hf_dir)}-{exporter_hash()}"
    if not final.is_dir():
        log(f"building the fp32 reference from {hf_dir} into {final} (once)")
    return build_once(final, lambda tmp: export(hf_dir, tmp, progress=False, log=lambda _: None))
