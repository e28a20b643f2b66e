"""Build the teaching notebooks (.ipynb, no outputs) from their jupytext-percent sources in src/.

    python notebooks/build.py            # write notebooks/NN_name.ipynb from notebooks/src/NN_name.py
    python notebooks/build.py --check    # exit 1 if an .ipynb differs from its source

Source format (jupytext "percent", so `jupytext --to ipynb` reads it too): cells start with `# %%`;
`# %% [markdown]` cells hold markdown with every line prefixed by `# `; `# %% tags=["a", "b"]`
sets cell tags; magics are commented out (`# %matplotlib inline`). The cell tagged `main-figure` is the picture `make_figures.py` saves for the README.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
HEADER = re.compile(r"^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")
MAGIC = re.compile(r"^# %[a-z]")
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def parse_cells(text: str) -> list[tuple[str, str, list[str]]]:
    """Percent-format text -> [(kind, source, tags)]; text before the first `# %%` is ignored."""
    cells, current = [], None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            if current:
                cells.append(current)
            current = ("markdown" if m["md"] else "code", [], json.loads(m["tags"]) if m["tags"] else [])
            continue
        if current is not None:
            current[1].append(line)
    if current:
        cells.append(current)
    out = []
    for kind, lines, tags in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        else:  # jupytext comments out magics: `# %matplotlib inline` -> `%matplotlib inline`
            lines = [ln[2:] if MAGIC.match(ln) else ln for ln in lines]
        out.append((kind, "\n".join(lines), tags))
    return out


def build_notebook(source: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, text, tags) in enumerate(parse_cells(source.read_text(encoding="utf-8"))):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        cell["id"] = f"{source.stem[:2]}-{i:02d}"  # stable ids: rebuilding gives identical files
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def sources() -> list[Path]:
    return sorted(SRC.glob("[0-9][0-9]_*.py"))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for src in sources():
        target = HERE / f"{src.stem}.ipynb"
        text = render(build_notebook(src))
        if check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python notebooks/build.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
