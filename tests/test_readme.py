"""The README and the docs tell the truth: the README is one short screen whose commands are what CI runs, its
main job prints what it shows, the Python examples of every page run, and the reading order has no forward
references."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image
from test_import_direction import NAME, module_graph

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
READING = ROOT / "docs" / "reading-the-code.md"


def section(title: str, text: str | None = None) -> str:
    """The body of the README's `## title` section."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[str]:
    """The shell commands of a section's bash blocks, one per line."""
    return [line.strip() for block in blocks(text, "bash") for line in block.splitlines() if line.strip()]


# -- the first screen ---------------------------------------------------------------------------
def test_readme_is_one_short_screen_with_one_command_each():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for title in ("Set-up", "The main job", "The tests"):
        assert len(commands(section(title))) == 1, f"README '{title}' is one command"
    assert re.search(r"!\[[^\]]*\]\((docs/figures/[\w.-]+\.png)\)", text), "one picture"


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run: the optional apt Chromium, then the README's set-up command and its test command, nothing else."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    body = script.split("\nfi\n", 1)[1]  # after the optional apt-get block
    run = [line.strip() for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert run == commands(section("Set-up")) + commands(section("The tests"))


def test_readme_and_docs_links_point_at_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path = (page.parent / target).resolve()
            generated = path.parent == ROOT / "docs" / "notebooks"  # executed copies, made by the tests / docs build
            assert path.exists() or (generated and (ROOT / "notebooks" / path.name).is_file()), f"{page}: {target}"


def test_the_main_job_prints_what_the_readme_shows(lab_cache, tmp_path, capsys, monkeypatch):
    """`qwen3vl-lab demo` as the README types it, in an empty folder: every line of the README's text block is a
    line it printed (answers, truth, the step view), and it saves the picture the README names."""
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(lab_cache))
    monkeypatch.chdir(tmp_path)
    (command,) = commands(section("The main job"))
    argv = shlex.split(command)
    assert argv[0] == "qwen3vl-lab"
    code, out, err = run_cli(capsys, *argv[1:])
    assert code == 0, err
    printed = set(out.splitlines())
    (shown,) = blocks(section("The main job"), "text")
    for line in shown.splitlines():
        assert not line.strip() or line in printed, f"the README shows a line the demo did not print: {line!r}"
    assert (tmp_path / "qwen3vl-lab-demo.png").is_file() and (tmp_path / "qwen3vl-lab-demo-scene.png").is_file()


# -- the pages' Python examples -----------------------------------------------------------------
def python_blocks() -> list[tuple[str, int, str]]:
    return [(page.relative_to(ROOT).as_posix(), i, code) for page in PAGES
            for i, code in enumerate(blocks(page.read_text(encoding="utf-8"), "python"))]


@pytest.fixture
def example_folder(tiny_onnx_dir, lab_cache, tmp_path, monkeypatch):
    """A working folder with what the examples name: models/tiny-onnx, models/shapes-outliers-onnx (the repair
    guide's outlier model, exported fp32 and INT4 as its commands make it) and a few pictures."""
    from qwen3vl_lab.apps import notebook

    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(lab_cache))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-onnx").symlink_to(tiny_onnx_dir, target_is_directory=True)
    (tmp_path / "models" / "shapes-outliers-onnx").symlink_to(notebook.outliers_model_dir(), target_is_directory=True)
    rng = np.random.default_rng(0)
    for name in ("photo.jpg", "a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def test_the_docs_have_python_examples():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("page, index, code", python_blocks(), ids=lambda v: v if isinstance(v, str) and
                         v.endswith(".md") else None)
def test_python_example_runs(page, index, code, example_folder, monkeypatch):
    monkeypatch.chdir(example_folder)
    code = code.replace("max_new_tokens=30", "max_new_tokens=3").replace("max_new_tokens=50", "max_new_tokens=3")
    exec(compile(code, f"{page} python block {index + 1}", "exec"), {"__name__": "readme"})
    assert os.getcwd() == str(example_folder)


# -- reading the code ---------------------------------------------------------------------------
def reading_order() -> list[str]:
    """The module names of the numbered list of docs/reading-the-code.md, in order."""
    paths = re.findall(r"^\d+\. `([\w/]+)\.py`", READING.read_text(encoding="utf-8"), flags=re.M)
    return [p.replace("/", ".") for p in paths]


def test_reading_order_has_no_forward_references():
    order = reading_order()
    assert len(order) >= 15 and order[0] == f"{NAME}.errors"
    graph = module_graph()
    assert set(order) <= set(graph), set(order) - set(graph)  # every file named exists
    runtime = {m for m in graph if m.count(".") == 1 and m.split(".")[1] not in
               ("export", "debug", "viz", "shapes", "apps", "__main__")}
    assert runtime <= set(order), f"runtime modules missing from the reading path: {sorted(runtime - set(order))}"
    seen: set[str] = set()
    for module in order:
        later = {m for m in graph[module] if m in order and m not in seen}
        assert not later, f"{module} uses {sorted(later)}, which the reading path lists after it"
        seen.add(module)


def test_every_notebook_is_in_the_see_guide():
    see = (ROOT / "docs" / "guides" / "see.md").read_text(encoding="utf-8")
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"](../notebooks/{notebook.name})" in see, f"docs/guides/see.md does not link {notebook.name}"
