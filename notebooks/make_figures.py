"""Run every teaching notebook, save its main figure (the cell tagged `main-figure`) as a PNG and its executed copy
for the documentation site.

    python notebooks/make_figures.py                    # all notebooks -> docs/figures/NN_name.png + docs/notebooks/
    python notebooks/make_figures.py 01_quickstart      # just one

The pictures in the docs are therefore exactly what the notebooks draw (on the tiny checkpoint or the
shapes model unless MODEL_DIR / HF_DIR is set). tests/test_notebooks.py uses `run_notebook` and
`save_executed` too, so a test run leaves the site's notebooks current. Sources: notebooks/src/*.py, paired
with the .ipynb by jupytext (notebooks/jupytext.toml; `jupytext --sync notebooks/src/*.py`).
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "docs" / "figures"
EXECUTED = HERE.parent / "docs" / "notebooks"  # executed copies the site renders (not committed: .gitignore)
MAIN_FIGURE_TAG = "main-figure"


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def run_notebook(path: Path, timeout: int | None = None, env: dict | None = None,
                 cell_seconds: list | None = None) -> tuple[nbformat.NotebookNode, float]:
    """Execute a copy of the notebook top to bottom in a fresh python3 kernel; (executed notebook, seconds).

    Cells run with the notebook's folder as working directory. timeout: seconds per cell (None = no
    limit, as `jupyter execute`). env: extra environment variables for the kernel (e.g.
    QWEN3VL_LAB_CACHE; a None value removes the variable). cell_seconds: when given, filled with
    (cell index, seconds the runner waited for that cell) per code cell. Raises nbclient's
    CellExecutionError on the first failing cell.
    """
    from nbclient import NotebookClient  # noqa: PLC0415

    nb = nbformat.read(path, as_version=4)
    kernel_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None removes a variable
    started: dict[int, float] = {}

    def on_cell_execute(cell, cell_index):
        started[cell_index] = time.perf_counter()

    def on_cell_executed(cell, cell_index, execute_reply):
        if cell_seconds is not None:
            cell_seconds.append((cell_index, time.perf_counter() - started[cell_index]))

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            on_cell_execute=on_cell_execute, on_cell_executed=on_cell_executed)
    t0 = time.perf_counter()
    client.execute(env=kernel_env)  # passed to jupyter_client's start_kernel
    return nb, time.perf_counter() - t0


def main_figure(nb: nbformat.NotebookNode) -> bytes:
    """The PNG bytes of the first image output of the cell tagged `main-figure`."""
    for cell in nb.cells:
        if MAIN_FIGURE_TAG in cell.get("metadata", {}).get("tags", []):
            for out in cell.get("outputs", []):
                png = out.get("data", {}).get("image/png")
                if png:
                    return base64.b64decode(png)
            raise ValueError(f"the cell tagged {MAIN_FIGURE_TAG!r} drew no image")
    raise ValueError(f"no cell is tagged {MAIN_FIGURE_TAG!r}")


def save_executed(nb: nbformat.NotebookNode, name: str) -> Path:
    """Write an executed notebook where the documentation site picks it up (docs/notebooks/NAME.ipynb)."""
    EXECUTED.mkdir(parents=True, exist_ok=True)
    target = EXECUTED / f"{name}.ipynb"
    tmp = target.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(target)
    return target


def main(argv: list[str]) -> int:
    FIGURES.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in notebooks() if not argv or p.stem in argv]
    for path in chosen:
        nb, seconds = run_notebook(path)
        target = FIGURES / f"{path.stem}.png"
        tmp = target.with_suffix(".png.tmp")
        tmp.write_bytes(main_figure(nb))
        tmp.replace(target)
        executed = save_executed(nb, path.stem)
        print(f"{path.name}: ran in {seconds:.1f} s -> {target.relative_to(HERE.parent)}, "
              f"{executed.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
