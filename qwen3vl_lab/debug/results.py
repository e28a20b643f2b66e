"""Finished results, cached on disk by what they were computed from: a sweep resumes where it stopped.

    cache = ResultCache("sweep-out")                  # sweep-out/.results/
    key = result_key(kind="sweep", source=fingerprint, recipe=recipe.to_dict(), prompts=digest)
    cache.get(key)                                    # the record (a JSON dict), or None
    cache.put(key, record)                            # written to a temporary file, then renamed into place
    seal_folder(folder, meta) / folder_verifies(folder, meta)   # the same check for a saved reference record

A key is a hash of everything the result depends on (the fp32 export's content hash, the recipe, the
code that built the variant, the prompt set or held-out scenes, this module's RESULT_VERSION), so a
changed input is a miss, never a stale hit. A record is small (metrics and per-step arrays, no weights).

Cached results are verified before they are shown. Each entry carries a seal: an HMAC-SHA256, keyed by a
secret only this user's cache folder holds, over the entry's key and record (a reference record's seal
covers its meta and the SHA-256 of its files). An edited row (mean KL 0, top-1 100 %), two rows swapped,
a row or record copied from elsewhere, random bytes: none verifies, so it is computed again, and said on
stderr; a plain hash would not do, as whoever edits a row can recompute it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Callable

from ..errors import PROG, UserError
from ..export.cache import cache_dir
from ..export.files import staging_file
from ..jsonfile import try_json

RESULTS_FOLDER = ".results"
RESULT_VERSION = 2  # bump when a record's fields or the scoring change (2: sealed entries)
SECRET_FILE = "results-secret"  # in the cache folder, mode 0600: the key of every seal
SEAL_FILE = "seal.json"  # inside a sealed folder
SECRET_BYTES = 32


def result_key(**parts) -> str:
    """A hash of the JSON of `parts` (sorted keys) and RESULT_VERSION."""
    text = json.dumps({"version": RESULT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staging_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


# -- seals ---------------------------------------------------------------------------------------
def _secret() -> bytes:
    """This user's sealing key: made once (first writer wins), private to the user, never in a result folder."""
    path = cache_dir() / SECRET_FILE
    if not path.exists():
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: use theirs
            pass
        finally:
            os.unlink(tmp)
    secret = path.read_bytes() if path.is_file() else b""
    if len(secret) != SECRET_BYTES:
        raise UserError(f"{path} is not a {SECRET_BYTES}-byte key; delete it (cached results are then computed again, "
                        "once)")
    return secret


def seal(*parts) -> str:
    """HMAC-SHA256 of the canonical JSON of `parts` under this user's key."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hmac.new(_secret(), text.encode(), hashlib.sha256).hexdigest()


def _verifies(given, *parts) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given, seal(*parts))


def files_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of `folder` but its seal, by name (read in 1 MB blocks)."""
    digests = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name == SEAL_FILE or not path.is_file():
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(2**20):
                h.update(block)
        digests[path.name] = h.hexdigest()
    return digests


def seal_folder(folder: str | Path, meta: dict) -> None:
    """Seal a finished folder (a reference record): its meta and its files' content."""
    folder = Path(folder)
    write_json_atomic(folder / SEAL_FILE, {"meta": meta, "seal": seal(meta, files_digest(folder))})


def folder_verifies(folder: str | Path, meta: dict, say: Callable[[str], None] = note) -> bool:
    """`folder` is a sealed folder for `meta` whose files are as they were sealed. A folder that exists but does
    not verify is said (it is then made again); a missing folder is silently False."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    entry = try_json(folder / SEAL_FILE)
    if entry is not None and entry.get("meta") == meta and _verifies(entry.get("seal"), meta, files_digest(folder)):
        return True
    say(f"{folder} does not verify (edited, incomplete or made elsewhere); computing it again")
    return False


# -- the cache -----------------------------------------------------------------------------------
class ResultCache:
    """root/.results/<key>.json, one finished result each: {"key", "record", "seal"}."""

    def __init__(self, root: str | Path, say: Callable[[str], None] = note):
        self.folder = Path(root) / RESULTS_FOLDER
        self.say = say

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The cached record, or None: missing, or not verifying (then it is said, and computed again)."""
        path = self.path(key)
        if not path.exists():
            return None
        entry = try_json(path)
        record = entry.get("record") if entry is not None else None
        if entry is not None and entry.get("key") == key and isinstance(record, dict) and \
                _verifies(entry.get("seal"), key, record):
            return record
        self.say(f"the cached result {path} does not verify (edited, swapped, corrupt or written elsewhere); "
                 "computing it again")
        return None

    def put(self, key: str, record: dict) -> None:
        record = json.loads(json.dumps(record))  # sealed exactly as it will be read back
        write_json_atomic(self.path(key), {"key": key, "record": record, "seal": seal(key, record)})

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


__all__ = ["RESULTS_FOLDER", "RESULT_VERSION", "ResultCache", "files_digest", "folder_verifies", "result_key", "seal",
           "seal_folder", "write_json_atomic"]
