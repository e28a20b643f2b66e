"""Writing folders safely: build in a hidden staging folder, then move it into place in one rename.

    with staging_folder(out, ".export-", name="--output_dir", need=bytes_needed) as staging:
        ... write into staging ...
        replace_folder(staging / "cpu-fp32", out / "cpu-fp32")

- A folder is only ever replaced when it is absent, empty, or one qwen3vl-lab wrote: every folder we
  write carries a stamp (`.qwen3vl-lab.json`) listing its files, and a file not in that list (the
  user's) makes the replacement refuse, naming the file. Nothing of the user's is deleted.
- The staging folder is removed on any error, on Ctrl-C, and on SIGTERM / SIGHUP (`signals.py`).
- Disk full and permission errors while writing become one line naming the folder, what is free and
  what is needed (`paths.py`).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import UserError
from ..jsonfile import try_json
from ..layout import GENAI_CONFIG
from ..paths import DISK_FULL, PERMISSION, disk_full_message, size_text
from ..signals import terminate_as_interrupt

STAMP = ".qwen3vl-lab.json"  # in every folder qwen3vl-lab writes: {"written_by": "qwen3vl-lab", "files": [...]}
# what a precision folder (cpu-*, or a sweep variant with its pytorch/ and variant.json) written before stamps holds
PRECISION_FILES = ("*.onnx", "*.onnx.data", GENAI_CONFIG, "quantization.json", "simulation.json", "variant.json",
                   "pytorch/*")


# -- the stamp ---------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    """Every file below `folder` (relative, '/'-separated), the stamp excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() and p.name != STAMP)


def stamp_folder(folder: str | Path, what: str, extra: Sequence[str] = ()) -> None:
    """Mark `folder` as written by qwen3vl-lab, listing the files now in it and the `extra` names about to be
    written (call again after adding files)."""
    folder = Path(folder)
    record = {"written_by": "qwen3vl-lab", "what": what, "files": sorted({*_files(folder), *extra})}
    (folder / STAMP).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def add_to_stamp(folder: str | Path, names: Sequence[str]) -> None:
    """Files our tools add later to a folder they wrote (e.g. write_fast_decoder): listed as ours, if it is stamped."""
    folder = Path(folder)
    listed = _stamped_files(folder)
    if listed is not None:
        record = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        record["files"] = sorted(listed | {n for n in names if (folder / n).exists()})
        (folder / STAMP).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _stamped_files(folder: Path) -> set[str] | None:
    record = try_json(folder / STAMP)
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == "qwen3vl-lab" else None
    return set(files) if isinstance(files, list) else None


def foreign_files(folder: Path, legacy: Sequence[str] = ()) -> list[str]:
    """Files in `folder` that qwen3vl-lab did not write: not in its stamp. A folder without a stamp (written
    before stamps existed) counts the files matching a `legacy` pattern as ours, and nothing else."""
    listed = _stamped_files(folder)
    return [f for f in _files(folder)
            if not (f in listed if listed is not None else any(fnmatch(f, p) for p in legacy))]


def has_genai_marker(folder: Path) -> bool:
    """`folder/genai_config.json` carries our `qwen3vl_lab` section: an export precision folder we wrote."""
    return "qwen3vl_lab" in (try_json(Path(folder) / GENAI_CONFIG) or {})


def legacy_precision_patterns(folder: Path) -> tuple[str, ...]:
    """The files of a precision folder written before folders were stamped (known by its genai_config.json)."""
    return PRECISION_FILES if has_genai_marker(folder) else ()


def check_replaceable(final: Path, *, name: str = "--output_dir", legacy: Sequence[str] = ()) -> None:
    """Refuse (one line) unless `final` is absent, an empty folder, or a folder qwen3vl-lab wrote whose
    every file is still one of ours."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    if final.is_symlink():
        raise UserError(f"{final} is a symbolic link (to {os.readlink(final)}), where {name} needs to write a folder; "
                        f"nothing is written through a link: remove the link (its target stays) or choose another {name}")
    if not final.is_dir():
        raise UserError(f"{final} is a {'file' if final.is_file() else 'device or pipe'}, where {name} needs to write "
                        f"a folder; move it away or choose another {name}")
    try:
        foreign = foreign_files(final, legacy)
    except PermissionError as e:
        raise UserError(f"{e.filename or final} cannot be read (permission denied), so {final} cannot be "
                        f"replaced safely; make it readable or choose another {name}") from None
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{final} holds {foreign[0]}{more}, which qwen3vl-lab did not write; replacing the folder "
                        f"would delete it: choose another {name}, or move those files out of {final}")


def replace_folder(staged: Path, final: Path, *, what: str = "export", name: str = "--output_dir",
                   legacy: Sequence[str] = ()) -> None:
    """Stamp the finished folder `staged` and put it at `final`. An existing `final` must be replaceable
    (`check_replaceable`); it is kept until the new one is in place (and put back if that fails).

    The old folder is moved into a hidden folder made for it here (`mkdir` fails rather than reuse a name
    that exists, and the name is random), so a folder or file another process made beside `final` is never
    a rename's target: nothing of anyone else's is replaced or removed."""
    staged, final = Path(staged), Path(final)
    stamp_folder(staged, what)
    check_replaceable(final, name=name, legacy=legacy)
    if not os.path.lexists(final):
        os.replace(staged, final)
        return
    holder = final.with_name(f".{final.name}.old-{secrets.token_hex(8)}")
    holder.mkdir(mode=0o700)
    try:
        os.replace(final, holder / final.name)
    except BaseException:
        holder.rmdir()
        raise
    try:
        os.replace(staged, final)
    except BaseException:
        os.replace(holder / final.name, final)  # the old folder back where it was
        holder.rmdir()
        raise
    shutil.rmtree(holder, ignore_errors=True)


# -- the staging folder ------------------------------------------------------------------------
@contextmanager
def staging_folder(parent: str | Path, prefix: str, *, name: str = "--output_dir", shown: str | Path | None = None,
                   need: int | None = None, estimate: int | None = None,
                   on_error: Callable[[], None] | None = None, private: bool = False) -> Iterator[Path]:
    """A hidden folder `parent/<prefix><random>` to build into, removed when the block ends (moved-out
    results stay). Every temporary folder qwen3vl-lab writes is made here.

    On any exception, Ctrl-C, SIGTERM or SIGHUP it is removed and `on_error()` runs; a full disk or a
    permission error becomes a one-line UserError naming `parent` (for a full disk: what is free and
    `estimate`, the bytes the job needs). `need` (bytes certainly needed) is checked against the free
    space up front. Messages name `shown` (default: `parent`), the folder the user asked for.

    The path is chosen before the folder exists, so an interruption landing at any bytecode (a cancelled
    Ray task gets its KeyboardInterrupt wherever it happens to be) finds it known and removes it; with
    tempfile.mkdtemp the folder exists a few calls before its caller holds the name. It is made with the
    normal permissions (umask), not mkdtemp's 0700: a worker running as another user reads it too;
    `private=True` makes it 0700, for a folder in a temporary folder every local user can list."""
    estimate = estimate or need
    parent = Path(parent)
    shown = Path(shown) if shown is not None else parent
    with terminate_as_interrupt():
        staging = None
        try:
            if need:
                _check_free_space(parent, need, estimate, name, shown)
            staging = parent / f"{prefix}{secrets.token_hex(8)}"  # 64 random bits: a name nobody holds
            try:
                staging.mkdir(mode=0o700 if private else 0o777)
            except FileExistsError:  # someone else's, however unlikely: never removed
                staging = None
                raise
            yield staging
        except BaseException as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if on_error:
                on_error()
            if isinstance(e, OSError) and (converted := write_error(e, shown, name, estimate)):
                raise converted from None
            raise
        finally:
            if staging is not None:  # after success (what was moved out stays), or a second Ctrl-C above
                shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staging_file(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside `path` to write into; renamed over `path` when the block ends (readers
    never see half a file, and a hard-linked original is replaced, never edited), removed on any error or
    interruption. Every single file qwen3vl-lab writes in place is written here."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder_or_temporary(out_dir: str | Path | None, prefix: str) -> Iterator[Path]:
    """`out_dir` (resolved; kept), or when it is None a private (0700, as tempfile.mkdtemp makes) staging
    folder in the system's temporary folder, removed when the block ends (on errors and interruptions too)."""
    if out_dir is not None:
        yield Path(out_dir).resolve()
        return
    with staging_folder(tempfile.gettempdir(), prefix, name="the temporary folder", private=True) as folder:
        yield folder


def _check_free_space(parent: Path, need: int, estimate: int | None, name: str, shown: Path) -> None:
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(f"the disk holding {name} {shown} has {size_text(free)} free but about "
                        f"{size_text(max(need, estimate or 0))} are needed; free some space or choose a folder "
                        "on another disk")


def write_error(e: OSError, parent: Path, name: str, need: int | None = None) -> UserError | None:
    """A one-line UserError for a full disk, a permission error or a read-only filesystem while writing into
    `parent`; None for other errors."""
    if e.errno in DISK_FULL:
        return UserError(disk_full_message(parent, need, name))
    if e.errno in PERMISSION:
        return UserError(f"cannot write into {name} {parent} (permission denied on {e.filename or parent}); "
                         f"choose a folder you can write to, or make it writable (e.g. chmod u+w {parent})")
    if e.errno == errno.EROFS:
        return UserError(f"{name} {parent} is on a read-only filesystem; choose a folder on a writable disk")
    return None
