"""Interruptions leave nothing behind: the one staging folder / staging file, and the interruption points of
long jobs (signals.deferred_interrupt + interruption_point), which is how a cancelled sweep job stops.

A cancelled Ray task and a terminal's Ctrl-C arrive as SIGINT; `signal.raise_signal` sends a real one here.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from qwen3vl_lab.debug import simulate as simulate_module
from qwen3vl_lab.debug.cluster import run_deferring_interrupts
from qwen3vl_lab.debug.simulate import SimRecipe, simulate_folder
from qwen3vl_lab.export import quantize as quantize_module
from qwen3vl_lab.export.files import staging_file, staging_folder
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder
from qwen3vl_lab.signals import deferred_interrupt, interruption_point


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_interrupt_right_after_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The KeyboardInterrupt lands in the first bytecode after mkdir returns (where a Ray cancel once left a
    `.NAME.building-*` folder behind: tempfile.mkdtemp returns the name only after making the folder)."""
    (tmp_path / "users-file.txt").write_text("keep me")
    real_mkdir = os.mkdir

    def mkdir_then_interrupted(path, *args, **kw):
        real_mkdir(path, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "mkdir", mkdir_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with staging_folder(tmp_path, ".build-"):
            pytest.fail("never reached")
    monkeypatch.undo()
    assert entries(tmp_path) == ["users-file.txt"]


def test_staging_folder_has_normal_permissions_and_is_removed(tmp_path):
    umask = os.umask(0o022)
    try:
        with staging_folder(tmp_path, ".build-") as staging:
            assert staging.parent == tmp_path and staging.name.startswith(".build-")
            assert staging.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700: workers of another user read it
            (staging / "result").mkdir()
            (staging / "result").rename(tmp_path / "result")  # what was moved out stays
    finally:
        os.umask(umask)
    assert entries(tmp_path) == ["result"]


def test_staging_file_replaces_or_leaves_the_original(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staging_file(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and entries(tmp_path) == ["config.json"]
    linked = tmp_path / "linked.json"
    os.link(path, linked)  # a hard-linked original is replaced, never edited through the link
    with staging_file(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and linked.read_text() == "old" and entries(tmp_path) == ["config.json",
                                                                                                "linked.json"]


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal: the state this file asserts on, set up here (pytest
    started in the background by a shell, or under nohup, inherits SIGINT ignored), and restored after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interruption_point_raises_only_after_sigint_inside_a_deferred_block(sigint_raises):
    interruption_point()  # outside any block: nothing to do
    with deferred_interrupt() as stop:
        interruption_point()
        signal.raise_signal(signal.SIGINT)  # a real SIGINT: only sets the flag here
        assert stop
        with pytest.raises(KeyboardInterrupt):
            interruption_point()
    interruption_point()  # the block is closed: nothing pending
    with pytest.raises(KeyboardInterrupt):  # and SIGINT raises again where it lands
        signal.raise_signal(signal.SIGINT)


def test_a_deferred_block_in_a_process_that_ignores_sigint_sets_the_flag_and_ignores_it_again(sigint_ignored):
    """Started with SIGINT ignored (`nohup`, `cmd &`): inside a block Ctrl-C still stops the job at its next
    interruption point; outside, the process keeps ignoring it, as it was started to."""
    with deferred_interrupt() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop
        with pytest.raises(KeyboardInterrupt):
            interruption_point()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.raise_signal(signal.SIGINT)  # ignored: nothing raises
    interruption_point()


@pytest.mark.parametrize("builder", ["quantize", "simulate"])
def test_a_build_stops_at_the_next_matrix_and_leaves_nothing(builder, tiny_onnx_fp32_dir, tmp_path, monkeypatch):
    """SIGINT during the second matrix of a deferred build: the build goes on to the end of that matrix,
    stops before the third, and neither the variant nor its staging folder is left."""
    module, name = (quantize_module, "quantize_one_matmul") if builder == "quantize" else (simulate_module,
                                                                                            "fake_quantize")
    real, calls = getattr(module, name), []

    def counted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    out = tmp_path / "variants"
    out.mkdir()
    with deferred_interrupt(), pytest.raises(KeyboardInterrupt):
        if builder == "quantize":
            quantize_folder(tiny_onnx_fp32_dir / "cpu-fp32", out / "int4", Int4Recipe(), progress=False)
        else:
            simulate_folder(tiny_onnx_fp32_dir / "cpu-fp32", out / "sim", SimRecipe(bits=3, block_size=32))
    assert len(calls) == 2  # stopped at the next matrix, not at the end of the build
    assert entries(out) == []


def test_a_job_in_a_worker_stops_at_its_next_interruption_point():
    """run_deferring_interrupts is how every sweep job runs in a pool process or a Ray task: SIGINT (Ray's
    cancel simulates one in the task) lets the current step finish and stops the job at the next point; a
    job already past its last point is not wanted either."""
    steps = []

    def job(n):
        for i in range(n):
            interruption_point()
            steps.append(i)
            if i == 1:
                signal.raise_signal(signal.SIGINT)
        return {"steps": n}

    with pytest.raises(KeyboardInterrupt):
        run_deferring_interrupts(job, 5)
    assert steps == [0, 1]
    steps.clear()
    with pytest.raises(KeyboardInterrupt):
        run_deferring_interrupts(job, 2)  # SIGINT during its last step: the record is dropped
    assert steps == [0, 1]
    assert run_deferring_interrupts(job, 1) == {"steps": 1}
