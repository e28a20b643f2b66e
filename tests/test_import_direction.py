"""The package's parts import one way, read from the source with `ast` (nothing is imported or run).

    runtime   the top-level modules that load and run an exported folder (config, model, decoder, steps, ...)
    export/   the builder: checkpoint -> ONNX files        may import runtime (config, layout, rope, ...)
    debug/    the INT4 doctor, generic tools               may import export and runtime
    viz/      plots and widgets                            may import runtime and debug
    shapes/   the shapes task: scenes, training, eval      may import runtime, export and debug
    apps/     CLI, bench, notebook helpers; __main__.py    may import anything

So a runtime module never imports export/ (the file and graph I/O names they share live in
`layout.py`, the rotary frequencies in `rope.py`), nor debug/, viz/, shapes/ or apps/; a viz module
never imports export/, shapes/ or apps/; debug/ computes and never draws (no viz/) and knows no task
(no shapes/). Every import counts: absolute or relative, at the top of the file or inside a function,
and `importlib.import_module` with a literal name. And no two modules import each other, directly or
around a longer loop (`test_no_import_cycles`): a cycle hidden by a function-local import is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qwen3vl_lab

PACKAGE = Path(qwen3vl_lab.__file__).resolve().parent
NAME = PACKAGE.name  # "qwen3vl_lab"
SUBPACKAGES = ("export", "debug", "viz", "shapes", "apps")
FORBIDDEN = {  # part -> the parts it must not import
    "runtime": ("export", "debug", "viz", "shapes", "apps"),
    "export": ("debug", "viz", "shapes", "apps"),
    "debug": ("viz", "shapes", "apps"),
    "viz": ("export", "shapes", "apps"),
    "shapes": ("viz", "apps"),
}


def part_of(module: str) -> str | None:
    """'runtime', 'export', 'debug', 'viz', 'shapes' or 'apps' for a dotted name; None outside the package."""
    parts = module.split(".")
    if parts[0] != NAME:
        return None
    if len(parts) == 1:
        return "runtime"  # the package root (`qwen3vl_lab/__init__.py`)
    if parts[1] in SUBPACKAGES:
        return parts[1]
    if parts[1] == "__main__":
        return "apps"
    return "runtime"


def module_name(path: Path) -> str:
    """qwen3vl_lab/viz/positions.py -> 'qwen3vl_lab.viz.positions'; a package's __init__.py -> the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str | None, level: int, package: str) -> str:
    """The absolute module of `from <'.' * level><name> import ...` written inside `package`."""
    if level == 0:
        return name or ""
    base = package.split(".")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_import_call(node: ast.Call) -> str | None:
    """The string argument of `import_module("...")` / `importlib.import_module(...)` / `__import__(...)`."""
    func = node.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`, at any depth.

    `from a import b` yields both 'a' and 'a.b' (b may be a submodule, as in `from .. import export`)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module, node.level, package)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and (name := _literal_import_call(node)) is not None:
            level = len(name) - len(name.lstrip("."))  # import_module(".x", __name__): relative to this package
            found.append((node.lineno, resolve(name[level:] or None, level, package)))
    return found


def violations(source: str, module: str, where: str, is_package: bool = False) -> list[str]:
    """One line per forbidden import: 'file:line: <part> module imports <name> (<part> must not import <part>)'."""
    part = part_of(module)
    out: dict[tuple[int, str], str] = {}  # one message per line and forbidden part
    for line, target in imports(source, module, is_package):
        target_part = part_of(target)
        if target_part in FORBIDDEN.get(part, ()) and (line, target_part) not in out:
            out[line, target_part] = f"{where}:{line}: {part} module {module} imports {target} " \
                                     f"({part} must not import {target_part})"
    return list(out.values())


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_parts_import_one_way():
    problems = []
    for path in package_files():
        where = path.relative_to(PACKAGE.parent).as_posix()
        problems += violations(path.read_text(encoding="utf-8"), module_name(path), where,
                               is_package=path.name == "__init__.py")
    assert not problems, "imports against the one-way direction:\n" + "\n".join(problems)


def test_the_scan_sees_every_part():
    """The check is only as good as its file list: every part has modules, and the known ones are classified."""
    parts = {}
    for path in package_files():
        parts.setdefault(part_of(module_name(path)), []).append(module_name(path))
    assert {"runtime", "export", "debug", "viz", "shapes", "apps"} <= set(parts)
    assert {f"{NAME}.model", f"{NAME}.fast", f"{NAME}.vision", f"{NAME}.layout", f"{NAME}.rope"} <= set(parts["runtime"])
    assert {f"{NAME}.apps.cli", f"{NAME}.apps.bench", f"{NAME}.apps.notebook", f"{NAME}.__main__"} <= set(parts["apps"])
    assert {f"{NAME}.export.checkpoint", f"{NAME}.export.files"} <= set(parts["export"])
    assert {f"{NAME}.shapes.task", f"{NAME}.shapes.train", f"{NAME}.shapes.evaluate"} <= set(parts["shapes"])
    assert f"{NAME}.viz.positions" in parts["viz"]


def module_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (any depth; a name that is not a module is dropped)."""
    files = {module_name(p): p for p in package_files()}
    graph = {}
    for name, path in files.items():
        found = imports(path.read_text(encoding="utf-8"), name, is_package=path.name == "__init__.py")
        graph[name] = {target for _, target in found if target in files and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package's __init__ that lazily re-exports its own modules is not a cycle of logic: leave packages out
    graph = {m: {t for t in ts if not (PACKAGE / t.replace(".", "/")[len(NAME) + 1:] / "__init__.py").is_file()}
             for m, ts in module_graph().items()}
    assert cycles(graph) == []


def test_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# -- the checker itself catches every spelling of the import (so a clean run means something) ----------
RUNTIME, VIZ, EXPORT = f"{NAME}.model", f"{NAME}.viz.positions", f"{NAME}.export.decoder_fast"
CAUGHT = [
    (RUNTIME, "from .export.genai_config import DECODER_FILE", 1),
    (RUNTIME, "def f():\n    from .export.decoder_fast import write_fast_decoder  # noqa\n", 2),
    (RUNTIME, "from . import export", 1),
    (RUNTIME, f"import {NAME}.export.exporter", 1),
    (RUNTIME, f"from {NAME}.export import tiny", 1),
    (RUNTIME, f"from {NAME} import export as builder", 1),
    (RUNTIME, "class A:\n    def f(self):\n        if True:\n            from .export import quantize\n", 4),
    (RUNTIME, "import importlib\nm = importlib.import_module('.export.vision', __package__)", 2),
    (RUNTIME, f"from importlib import import_module\nm = import_module('{NAME}.export')", 2),
    (RUNTIME, "from .debug.compare import compare", 1),
    (RUNTIME, "from .viz import plot_top_k", 1),
    (f"{NAME}", "def __getattr__(name):\n    from .export.exporter import export\n", 2),  # the package root
    (VIZ, "from ..export.decoder import mrope_inv_freq_by_axis", 1),
    (VIZ, f"from {NAME}.export.decoder import PREFIX", 1),
    (VIZ, "from .. import export", 1),
    (f"{NAME}.debug.doctor", "def f():\n    from ..viz.int4 import plot_step_divergence\n", 2),
    (f"{NAME}.debug.sweep", "from ..shapes.accuracy import recipe_accuracy", 1),
    (f"{NAME}.export.tiny", "from ..shapes.task import Scene", 1),
    (f"{NAME}.export.quantize", "from ..debug.weights import dequantize", 1),
    (RUNTIME, "from .apps.cli import main", 1),
]
ALLOWED = [
    (RUNTIME, "from .config import ModelConfig\nfrom .layout import DECODER_FILE\nimport onnx"),
    (RUNTIME, "from .exports_table import x\nimport exporter"),  # names that merely start with 'export'
    (VIZ, "from ..rope import mrope_inv_freq_by_axis\nfrom ..debug.compare import Comparison\nfrom .figure import COLORS"),
    (EXPORT, "from ..layout import FAST_DECODER_FILE\nfrom ..config import ModelConfig\nfrom .decoder import PREFIX"),
    (f"{NAME}.debug.sweep", "from ..export.quantize import quantize_folder"),
    (f"{NAME}.apps.cli", "from ..export.exporter import export\nfrom ..shapes.train import run"),
    (f"{NAME}.apps.bench_workers", "from ..export.tiny import make_tiny"),
    (f"{NAME}.shapes.accuracy", "from ..debug.variants import build_variant\nfrom ..export.quantize import Int4Recipe"),
]


@pytest.mark.parametrize("module, source, line", CAUGHT)
def test_checker_catches_forbidden_imports(module, source, line):
    found = violations(source, module, "x.py", is_package=module == NAME)
    assert len(found) == 1 and found[0].startswith(f"x.py:{line}: "), found


@pytest.mark.parametrize("module, source", ALLOWED)
def test_checker_allows_the_permitted_directions(module, source):
    assert violations(source, module, "x.py") == []
