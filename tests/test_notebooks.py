"""Every teaching notebook runs top to bottom after the plain install and asserts what it teaches; its executed copy
is what the documentation site shows.

The notebooks are executed as users run them (a fresh python3 kernel, nbclient, cells in order);
their own `assert`s are the checks, and each ends by printing "<name>: all checks passed". They run
with a fresh cache folder (QWEN3VL_LAB_CACHE) and without MODEL_DIR / HF_DIR, so a developer's real
model is never picked up, and with torch and onnxruntime-genai unimportable in the kernel (what `pip install -e .`
gives: the dev extra's test tools are not the notebooks' dependencies). A notebook that takes another path when
an extra of the README's set-up is importable (WITH_EXTRA) runs a second time with it.
`pytest --nbmake notebooks/` and `jupyter execute` run them the same way.

Each executed notebook is saved to docs/notebooks/ (not committed), where `mkdocs build` renders it with its
outputs; the last test here builds the site with `--strict` (a broken link or a missing page fails).

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
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))  # any notebooks/NN_*.ipynb
# Notebooks that take another path when a package of the README's set-up (the dev extra) is importable: they run
# once on the plain install (like every notebook) and once with that package.
WITH_EXTRA = {"07_doctor_your_export": "onnxruntime_genai"}  # with it, 07 doctors the guide's export (its builder)
NOT_INSTALLED = ("torch", "onnxruntime_genai")  # absent from `pip install -e .`; made unimportable in the kernel


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"notebooks_{name}", NOTEBOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_figures = _load("make_figures")


def plain_install_path(folder: Path, extra: str | None = None) -> str:
    """A PYTHONPATH whose sitecustomize.py hides NOT_INSTALLED (but `extra`) from the kernel: with sys.modules[name]
    None, `import name` raises ModuleNotFoundError and importlib.util.find_spec(name) is None, as when not installed."""
    hidden = [m for m in NOT_INSTALLED if m != extra]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in hidden), encoding="utf-8")
    return os.pathsep.join([str(folder), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory, lab_cache) -> dict:
    """The kernel's environment: a private cache folder (the tiny and the shapes model made once, here, for every
    notebook), no real model, torch and onnxruntime-genai not installed."""
    from qwen3vl_lab.apps import notebook

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3VL_LAB_CACHE", str(lab_cache))
        notebook.tiny_model_dir()
        notebook.shapes_model_dir()  # notebooks 04 and 06 default to the trained shapes model
        notebook.outliers_model_dir()  # notebook 08 breaks and repairs it
        notebook.shapes_int4_dir()  # notebook 07 doctors it on the plain install
        if importlib.util.find_spec("onnxruntime_genai") is not None:
            notebook.guide_shapes_dir()  # and the guide's export of the shapes model with onnxruntime-genai
    paths = tmp_path_factory.mktemp("plain-install")
    return {"QWEN3VL_LAB_CACHE": str(lab_cache), "MODEL_DIR": None, "HF_DIR": None, "MPLBACKEND": None,
            "PYTHONPATH": plain_install_path(paths)}


def test_the_kernel_sees_the_plain_install(notebook_env, tmp_path):
    """What the notebooks run with: torch and onnxruntime-genai absent, the package (this checkout) present."""
    probe = ("import importlib.util as u, qwen3vl_lab; print([u.find_spec(m) is None for m in "
             f"{NOT_INSTALLED!r}], qwen3vl_lab.__file__); import torch")
    env = {k: v for k, v in {**os.environ, **notebook_env}.items() if v is not None}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False)
    assert done.stdout.startswith("[True, True] " + str(ROOT)), done.stdout + done.stderr
    assert "ModuleNotFoundError" in done.stderr


def _cells(nb) -> list[tuple]:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


def test_every_notebook_is_paired_with_its_source():
    """jupytext pairs notebooks/NN.ipynb with notebooks/src/NN.py (notebooks/jupytext.toml), and each pair agrees."""
    sources = sorted(p.stem for p in (NOTEBOOKS / "src").glob("[0-9][0-9]_*.py"))
    assert sources == NAMES and NAMES, f"notebooks {NAMES} and sources {sources} differ"
    from jupytext.config import load_jupytext_config
    from jupytext.paired_paths import paired_paths

    for name in NAMES:
        ipynb = NOTEBOOKS / f"{name}.ipynb"
        formats = load_jupytext_config(str(ipynb)).default_formats(str(ipynb))
        paired = [Path(path) for path, _ in paired_paths(str(ipynb), "ipynb", formats)]
        assert NOTEBOOKS / "src" / f"{name}.py" in paired, paired
        source = jupytext.read(NOTEBOOKS / "src" / f"{name}.py")
        assert _cells(source) == _cells(jupytext.read(ipynb)), f"run `jupytext --sync notebooks/src/{name}.py`"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean(name):
    """Committed without outputs or execution counts; exactly one main figure cell."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("main-figure" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert sum("assert " in c.source for c in code) >= 3, "a notebook asserts the claims it teaches"


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


def _run_and_check(name: str, env: dict) -> tuple:
    """Run a notebook as a user does; its own asserts pass, it ends with its line, nothing waited for nothing."""
    t0 = time.perf_counter()
    cell_seconds: list = []
    nb, seconds = make_figures.run_notebook(NOTEBOOKS / f"{name}.ipynb", timeout=CELL_TIMEOUT, env=env,
                                            cell_seconds=cell_seconds)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    last = nb.cells[-1].outputs
    assert any(f"{name}: all checks passed" in o.get("text", "") for o in last), last
    assert not _idle_waits(nb, cell_seconds), "the runner waited for nothing"
    png = make_figures.main_figure(nb)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    print(f"{name}: {seconds:.1f} s (kernel start included; {time.perf_counter() - t0:.1f} s in the test)")
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, notebook_env):
    nb = _run_and_check(name, notebook_env)
    make_figures.save_executed(nb, name)  # what the documentation site shows


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WITH_EXTRA))
def test_notebook_runs_with_the_dev_extra(name, notebook_env, tmp_path):
    """The README's set-up installs the dev extra: where a notebook uses one of its packages, that path runs too
    (a missing package fails here, never skips)."""
    assert importlib.util.find_spec(WITH_EXTRA[name]) is not None, f"{WITH_EXTRA[name]} is missing: pip install -e \".[dev]\""
    env = {**notebook_env, "PYTHONPATH": plain_install_path(tmp_path / "plain-install", extra=WITH_EXTRA[name])}
    _run_and_check(name, env)


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


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page or a docstring the reference cannot render fails. Runs
    after the notebooks above (same file), so the site shows this run's executed copies where they exist."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert "No module named mkdocs" not in done.stderr, "the docs tools are missing: pip install -e \".[dev]\""
    assert done.returncode == 0, done.stderr[-4000:]
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for name in NAMES:
        assert f"notebooks/{name}/index.html" in pages
    for page in ("index.html", "guides/run/index.html", "reading-the-code/index.html", "reference/runtime/index.html"):
        assert page in pages
    assert "class=\"doc doc-heading\"" in (site / "reference" / "runtime" / "index.html").read_text(encoding="utf-8")
