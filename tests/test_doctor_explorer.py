"""The DoctorExplorer: fp32 vs INT4 recorded once (DoctorTrace), drawn per decode step, MatMul and repair candidate;
in a plain kernel and in a real JupyterLab in headless Chromium (skips, saying why, without Chromium/Playwright)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_doctor import massive_activation_copy

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder
from qwen3vl_lab.model import load_model

CANDIDATES = {"default INT4": ["red circle", "blue square"], "repaired": ["red triangle", "blue circle"]}
QUESTIONS, FP32 = ["What is red?", "What is blue?"], ["red triangle", "blue circle"]


@pytest.fixture(scope="module")
def heavy(tiny_onnx_dir, tmp_path_factory):
    """fp32 with channel 5 of every norm output x1024 (function-preserving), and its INT4 (level 4, fp32 head)."""
    base = tmp_path_factory.mktemp("explorer")
    fp32 = massive_activation_copy(tiny_onnx_dir / "cpu-fp32", base / "fp32", scale=1024.0)
    return fp32, quantize_folder(fp32, base / "int4", Int4Recipe(lm_head="fp32"), progress=False)


@pytest.fixture(scope="module")
def trace(heavy):
    from qwen3vl_lab.viz.doctor import CandidateAnswers, record_doctor_trace

    fp32, int4 = (load_model(f) for f in heavy)
    return record_doctor_trace(fp32, int4, n_steps=4, questions=QUESTIONS, reference_answers=FP32,
                               candidates=[CandidateAnswers(k, v, accuracy=np.mean([a == b for a, b in zip(v, FP32)]))
                                           for k, v in CANDIDATES.items()])


def test_the_trace_names_the_planted_channel_and_measures_the_drift(trace):
    assert trace.n_steps == 4 and trace.layer_error.shape == (4, 4) and (trace.layer_error > 0).all()
    assert (trace.kl > 0).all() and np.isfinite(trace.kl).all()
    planted = [m for m in trace.matmuls if m.endswith(("q_proj", "gate_proj"))]  # read the scaled norms
    assert planted and all(trace.outliers[m][:1] == (5,) for m in planted)
    assert all(trace.outliers[m] == () for m in trace.matmuls if m.endswith(("o_proj", "down_proj")))


def test_the_explorer_redraws_per_step_matmul_and_candidate(trace):
    from qwen3vl_lab.viz.doctor import doctor_figure
    from qwen3vl_lab.viz.widgets import DoctorExplorer

    ex = DoctorExplorer(trace)
    assert ex.matmul.value.endswith(("q_proj", "gate_proj"))  # the outlier-heaviest first
    first = ex.figure
    ex.step.value = 2
    ex.candidate.value = "repaired"
    assert ex.figure is not first and "fp32 says" in ex.figure.axes[0].get_title()
    text = "".join(t.get_text() for t in ex.figure.axes[3].texts)
    assert "repaired: accuracy 100%" in text and "same: red triangle" in text
    with pytest.raises(UserError, match="out of range"):
        doctor_figure(trace, 9)


# -- in JupyterLab -----------------------------------------------------------------------------------
NOTEBOOK = "doctor_explorer.ipynb"
DONE = "doctor explorer: ready"


def _notebook(path: Path, fp32: Path, int4: Path) -> None:
    import nbformat

    code = f"""from qwen3vl_lab.model import load_model
from qwen3vl_lab.viz.doctor import CandidateAnswers, record_doctor_trace
from qwen3vl_lab.viz.widgets import DoctorExplorer
trace = record_doctor_trace(load_model({str(fp32)!r}), load_model({str(int4)!r}), n_steps=4,
                            questions={QUESTIONS!r}, reference_answers={FP32!r},
                            candidates=[CandidateAnswers(k, v) for k, v in {CANDIDATES!r}.items()])
explorer = DoctorExplorer(trace)
display(explorer)
print({DONE!r})"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_the_doctor_explorer_in_jupyterlab(heavy, tmp_path):
    browser_test = pytest.importorskip("test_browser")  # skips (module level) without Chromium / Playwright / Lab
    sync_api = browser_test.sync_api
    work, config = tmp_path / "work", tmp_path / "jupyter"
    work.mkdir()
    _notebook(work / NOTEBOOK, *heavy)
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "HF_DIR", "MPLBACKEND")}
    env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"))
    port, token = browser_test.free_port(), os.urandom(16).hex()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(tmp_path / "lab.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            browser_test.wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, timeout=240)
            _drive(sync_api, browser_test, f"http://127.0.0.1:{port}", token, tmp_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drive(sync_api, bt, base: str, token: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with sync_api.sync_playwright() as p:
        browser = bt.launch(p, tmp_path / "profile", height=1100)
        try:
            page = bt.run_notebook_in_lab(browser, base, token, NOTEBOOK, DONE, timeout=180_000)
            page.locator(".widget-output img").first.wait_for(timeout=30_000)
            first = bt.wait_for_new_image(page, "")
            page.locator(".widget-slider .noUi-handle").first.focus()  # the step slider, one step right
            page.keyboard.press("ArrowRight")
            page.wait_for_function("() => document.querySelector('.widget-readout').textContent.trim() === '1'",
                                   timeout=30_000)
            second = bt.wait_for_new_image(page, first)
            page.locator("select", has=page.locator("option", has_text="repaired")).select_option(label="repaired")
            third = bt.wait_for_new_image(page, second)
            assert len({first, second, third}) == 3
            page.screenshot(path=str(tmp_path / "doctor_explorer.png"), full_page=True)
        finally:
            browser.close()
    print(f"doctor explorer browser test: {time.monotonic() - t0:.1f} s; screenshot {tmp_path / 'doctor_explorer.png'}")
