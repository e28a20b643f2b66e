"""Writing folders safely: build in a staging folder, then move it into place in one rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(staged: Path, final: Path) -> None:
    """Put the finished folder `staged` at `final`; an existing `final` is kept until the new one is in place."""
    staged, final = Path(staged), Path(final)
    if not final.exists():
        os.replace(staged, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
