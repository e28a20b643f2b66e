"""environment.yml (conda) and pyproject.toml describe the same environment."""

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return req.replace(" ", "").lower().replace("_", "-")


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}


def conda_pip_requirements() -> tuple[str, set[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return python, {_norm(r) for r in pip}


def test_environment_yml_matches_pyproject():
    python, pip = conda_pip_requirements()
    expected = pyproject_requirements()
    assert pip == expected, f"only in environment.yml: {pip - expected}; only in pyproject.toml: {expected - pip}"
    assert python == "python=3.11"


def test_torch_is_pinned_exactly():
    """Any torch other than 2.13.0 (the local CPU build) pulls a multi-GB CUDA build."""
    torch = [r for r in pyproject_requirements() if r.startswith("torch")]
    assert torch == ["torch==2.13.0"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(r.startswith("torch") for r in project["dependencies"]), "torch must not be a runtime dependency"
