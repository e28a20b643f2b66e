"""The README tells the truth: its Python examples run, and its reading order has no forward references."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_import_direction import NAME, module_graph

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def reading_order() -> list[str]:
    """The module names of the numbered list under '## Reading the code', in order."""
    section = README.read_text(encoding="utf-8").split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"^\d+\. `([\w/]+)\.py`", section, flags=re.M)
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
        assert not later, f"{module} uses {sorted(later)}, which the README lists after it"
        seen.add(module)


@pytest.fixture
def readme_folder(tiny_onnx_dir, tmp_path):
    """A working folder with what the examples name: models/tiny-onnx and a few pictures."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-onnx").symlink_to(tiny_onnx_dir, target_is_directory=True)
    rng = np.random.default_rng(0)
    for name in ("photo.jpg", "a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs(index, readme_folder, monkeypatch):
    monkeypatch.chdir(readme_folder)
    code = python_blocks()[index].replace("max_new_tokens=30", "max_new_tokens=3").replace(
        "max_new_tokens=50", "max_new_tokens=3")
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})
    assert os.getcwd() == str(readme_folder)
