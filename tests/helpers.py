"""Small helpers shared by the test files (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from qwen3vl_lab.apps.cli import main


def run_cli(capsys, *argv):
    """qwen3vl-lab's main() in-process -> (exit code, stdout, stderr); argparse's SystemExit counts too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (bad option values) exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """Bad input: exit code 2, one line `qwen3vl-lab: error: ...` naming the problem, no traceback."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("qwen3vl-lab: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def grace_hopper() -> str:
    """A real 512x600 photo that ships with matplotlib: usable offline."""
    from matplotlib import cbook

    return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def print_max_diffs(max_diffs: dict[str, float], width: int = 34) -> None:
    """Print the measured maxima (visible with pytest -s)."""
    for k, v in sorted(max_diffs.items()):
        print(f"\n{k:{width}s} max |logit diff| {v:.2e}", end="")
