"""MkDocs hooks (mkdocs.yml `hooks:`): every notebooks/NN_*.ipynb is a page of the site, with its outputs.

- on_config: a "Notebooks" section in the nav, one page per notebook (whatever notebooks exist).
- on_pre_build: docs/notebooks/NN.ipynb is the executed copy tests/test_notebooks.py (or make_figures.py) saved,
  when its cells are the committed notebook's; otherwise (none yet, or the notebook changed since) the committed
  notebook without outputs, with a note at the top saying so and how to render them. Nothing is executed here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "docs" / "notebooks"
NOTE = ("!!! note \"Shown without outputs\"\n    This page is the committed notebook: no current executed copy was found. "
        "`pytest tests/test_notebooks.py` (or `python notebooks/make_figures.py`) runs the notebooks and saves "
        "them for the site.")
log = logging.getLogger("mkdocs.hooks.notebooks")


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def inputs(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def is_current(executed: Path, committed) -> bool:
    """An executed copy of exactly the committed cells, with outputs."""
    if not executed.is_file():
        return False
    nb = nbformat.read(executed, as_version=4)
    return inputs(nb) == inputs(committed) and any(c.get("outputs") for c in nb.cells)


def unexecuted(committed) -> str:
    nb = nbformat.from_dict(committed)
    note = nbformat.v4.new_markdown_cell(NOTE)
    note["id"] = "site-note"
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, note)  # under the title
    return nbformat.writes(nb)


def on_config(config, **kwargs):
    pages = [f"notebooks/{p.name}" for p in notebooks()]
    nav = [item for item in config["nav"] if not (isinstance(item, dict) and "Notebooks" in item)]
    at = next((i + 1 for i, item in enumerate(nav) if isinstance(item, dict) and "Reading the code" in item), len(nav))
    nav.insert(at, {"Notebooks": pages})
    config["nav"] = nav
    return config


def on_pre_build(config, **kwargs):
    EXECUTED.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in notebooks()}
    for old in EXECUTED.glob("*.ipynb"):
        if old.name not in names:  # a notebook that no longer exists
            old.unlink()
    for path in notebooks():
        committed = nbformat.read(path, as_version=4)
        target = EXECUTED / path.name
        if is_current(target, committed):
            continue
        text = unexecuted(committed)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:  # unchanged: no rebuild loop under serve
            target.write_text(text, encoding="utf-8")
        log.info("%s: no current executed copy; the site shows it without outputs", path.name)
