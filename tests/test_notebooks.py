"""Every teaching notebook runs top to bottom (04-06 on the trained shapes model, 07 on the guide's export of it) and asserts what it teaches.

The notebooks are executed as users run them (a fresh python3 kernel, nbclient, cells in order);
their own `assert`s are the checks, and each ends by printing "<name>: all checks passed". They run
with a fresh cache folder (QWEN3VL_LAB_CACHE) and without MODEL_DIR / HF_DIR, so a developer's real
model is never picked up. `pytest --nbmake notebooks/` and `jupyter execute` run them the same way.

A runner must not wait for anything but the cells: each cell's wait is checked against the time the
kernel spent on it (an explorer widget once made nbclient wait out its whole timeout after each
cell that showed one, and `jupyter execute`, which has no timeout, for ever).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart", "02_mrope_positions", "03_kv_cache", "04_vision_pipeline", "05_int4_debugging",
         "06_attention", "07_doctor_your_export", "08_int4_gibberish_repaired"]
HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None  # 07 builds the guide's export with its builder


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"notebooks_{name}", NOTEBOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load("build")
make_figures = _load("make_figures")


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory) -> dict:
    """The kernel's environment: a private cache folder, and no real model."""
    from qwen3vl_lab.apps import notebook

    cache = tmp_path_factory.mktemp("nb-cache")
    with pytest.MonkeyPatch.context() as mp:  # make the tiny model once, here, for every notebook
        mp.setenv("QWEN3VL_LAB_CACHE", str(cache))
        notebook.tiny_model_dir()
        notebook.shapes_model_dir()  # notebooks 04 and 06 default to the trained shapes model
        notebook.outliers_model_dir()  # notebook 08 breaks and repairs it
        if HAS_GENAI:
            notebook.guide_shapes_dir()  # notebook 07 doctors the guide's export of it
    return {"QWEN3VL_LAB_CACHE": str(cache), "MODEL_DIR": None, "HF_DIR": None, "MPLBACKEND": None}


def test_every_notebook_is_listed_and_built_from_its_source():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == NAMES
    assert [p.stem for p in build.sources()] == NAMES
    assert build.main(["--check"]) == 0, "run `python notebooks/build.py`"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean(name):
    """Committed without outputs or execution counts; exactly one main figure cell."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("main-figure" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert sum("assert " in c.source for c in code) >= 3, "a notebook asserts the claims it teaches"
    assert nb.metadata.kernelspec.name == "python3"


CELL_TIMEOUT = 600  # seconds: generous; a cell is never expected near it (see _idle_waits)
IDLE_WAIT = 10.0  # seconds a runner may wait for a cell beyond the kernel's own time for it (kernel start, I/O)


def _kernel_seconds(cell) -> float:
    """Seconds the kernel was busy with a cell: its own timestamps (nbclient's record_timing)."""
    t = cell.metadata.get("execution", {})
    busy, idle = t.get("iopub.status.busy"), t.get("iopub.status.idle")
    if not busy or not idle:
        return 0.0
    return (datetime.fromisoformat(idle.replace("Z", "+00:00")) -
            datetime.fromisoformat(busy.replace("Z", "+00:00"))).total_seconds()


def _idle_waits(nb, cell_seconds) -> list[str]:
    """Cells the runner waited for much longer than the kernel worked on them."""
    return [f"cell {i}: waited {waited:.1f} s, kernel busy {_kernel_seconds(nb.cells[i]):.1f} s: "
            f"{nb.cells[i].source.splitlines()[0]!r}"
            for i, waited in cell_seconds if waited - _kernel_seconds(nb.cells[i]) > IDLE_WAIT]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, notebook_env):
    if name == "07_doctor_your_export" and not HAS_GENAI:
        pytest.skip("notebook 07 builds the guide's export with onnxruntime-genai (pip install 'qwen3vl-lab[genai]')")
    t0 = time.perf_counter()
    cell_seconds: list = []
    nb, seconds = make_figures.run_notebook(NOTEBOOKS / f"{name}.ipynb", timeout=CELL_TIMEOUT, env=notebook_env,
                                            cell_seconds=cell_seconds)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    last = nb.cells[-1].outputs
    assert any(f"{name}: all checks passed" in o.get("text", "") for o in last), last
    assert not _idle_waits(nb, cell_seconds), "the runner waited for nothing"
    png = make_figures.main_figure(nb)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    print(f"{name}: {seconds:.1f} s (kernel start included; {time.perf_counter() - t0:.1f} s in the test)")


@pytest.mark.slow
def test_jupyter_execute_runs_a_notebook_with_default_settings(notebook_env, tmp_path):
    """`jupyter execute NOTEBOOK` as a user types it: no --timeout (nbclient then waits without a limit), so a
    cell the runner cannot see finish hangs it; the subprocess timeout only bounds that failure."""
    name = "02_mrope_positions"  # shows a PositionExplorer and moves its slider
    copy = tmp_path / f"{name}.ipynb"
    shutil.copy(NOTEBOOKS / copy.name, copy)
    env = {k: v for k, v in {**os.environ, **notebook_env}.items() if v is not None}
    jupyter = [sys.executable, "-m", "jupyter", "execute", "--inplace", copy.name]  # --inplace: to read the outputs
    try:
        done = subprocess.run(jupyter, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CELL_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`jupyter execute {name}.ipynb` did not finish in {CELL_TIMEOUT} s (its cells take about 15 s)")
    assert done.returncode == 0, done.stderr[-2000:]
    import nbformat

    nb = nbformat.read(copy, as_version=4)
    assert any(f"{name}: all checks passed" in o.get("text", "") for o in nb.cells[-1].outputs)
