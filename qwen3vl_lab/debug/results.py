"""Finished results, cached on disk by what they were computed from: a sweep resumes where it stopped.

    cache = ResultCache("sweep-out")                  # sweep-out/.results/
    key = result_key(kind="sweep", source=fingerprint, recipe=recipe.to_dict(), prompts=digest)
    cache.get(key)                                    # the record (a JSON dict), or None
    cache.put(key, record)                            # written to a temporary file, then renamed into place

A key is a hash of everything the result depends on (the fp32 export's content hash, the recipe, the
code that built the variant, the prompt set or held-out scenes, this module's RESULT_VERSION), so a
changed input is a miss, never a stale hit. A record is small (metrics and per-step arrays, no weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..export.files import staging_file

RESULTS_FOLDER = ".results"
RESULT_VERSION = 1  # bump when a record's fields or the scoring change


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


class ResultCache:
    """root/.results/<key>.json, one finished result each."""

    def __init__(self, root: str | Path):
        self.folder = Path(root) / RESULTS_FOLDER

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The cached record, or None (missing, or unreadable: then it is computed again)."""
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, record: dict) -> None:
        write_json_atomic(self.path(key), record)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


__all__ = ["RESULTS_FOLDER", "RESULT_VERSION", "ResultCache", "result_key", "write_json_atomic"]
