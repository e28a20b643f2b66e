"""A real JupyterLab in headless Chromium: run the quickstart notebook, move its slider, see the plot change.

Needs Debian's Chromium (`apt-get install chromium`) and Playwright's Python package (`pip install
playwright`, pointed at /usr/bin/chromium: never `playwright install`). Skips with the reason when
either is missing. The server gets its own config/workspace folders, a token, 127.0.0.1 only, and
is stopped by its own pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_quickstart.ipynb"
DONE = "01_quickstart: all checks passed"
CHROMIUM = os.environ.get("QWEN3VL_LAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
                "(or set QWEN3VL_LAB_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: `pip install playwright` "
                               "(the browser comes from apt, never run `playwright install`)")
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout} s")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of the quickstart notebook; yields (base url, token)."""
    from qwen3vl_lab.apps import notebook

    cache, work, config = tmp_path / "cache", tmp_path / "work", tmp_path / "jupyter"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)  # Lab autosaves into the file: use a copy
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(  # no "get Jupyter news?" toast
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "HF_DIR", "MPLBACKEND")}
    env.update(QWEN3VL_LAB_CACHE=str(cache), JUPYTER_CONFIG_DIR=str(config),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"))
    with pytest.MonkeyPatch.context() as mp:  # make the tiny model before the notebook's cells are timed
        mp.setenv("QWEN3VL_LAB_CACHE", str(cache))
        notebook.tiny_model_dir()
    port, token = free_port(), hashlib.sha256(os.urandom(16)).hexdigest()[:32]
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
        yield f"http://127.0.0.1:{port}", token
    finally:
        proc.terminate()  # the server stops its kernels with it
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def image_hash(page) -> str:
    src = page.locator(".widget-output img").first.get_attribute("src") or ""
    return hashlib.sha256(src.encode()).hexdigest()


def wait_for_new_image(page, old: str, timeout: float = 30.0, settle: float = 0.8) -> str:
    """Each slider value redraws once: wait until the image differs from `old` and stops changing."""
    end = time.monotonic() + timeout
    current, since = image_hash(page), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        h = image_hash(page)
        if h != current:
            current, since = h, time.monotonic()
        elif current != old and time.monotonic() - since >= settle:
            return current
    raise TimeoutError("the widget's image did not change")


def run_all(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator("li[data-command='runmenu:run-all']").click()


def launch(p, profile: Path, height: int = 1000):
    """Debian's Chromium, headless, with its own profile folder."""
    return p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=CHROME_ARGS,
                                                viewport={"width": 1400, "height": height})


def run_notebook_in_lab(browser, base: str, token: str, notebook: str, done_text: str, timeout: int = 120_000):
    """Open `notebook` in JupyterLab, wait for the kernel, Run All until a cell prints `done_text`; the page."""
    page = browser.new_page()
    page.goto(f"{base}/lab/tree/{notebook}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    done = page.locator(".jp-OutputArea-output", has_text=done_text)
    run_all(page)
    try:
        done.wait_for(timeout=timeout)
    except sync_api.TimeoutError:  # a Run All issued before the kernel was really ready is dropped
        run_all(page)
        done.wait_for(timeout=timeout)
    return page


def test_slider_redraws_the_generation_explorer_in_jupyterlab(lab, tmp_path):
    base, token = lab
    t0 = time.monotonic()
    with sync_api.sync_playwright() as p:
        browser = launch(p, tmp_path / "profile")
        try:
            page = run_notebook_in_lab(browser, base, token, NOTEBOOK, DONE)
            readout = page.locator(".widget-readout").first
            assert readout.inner_text() == "3"  # the notebook's last cell set step 3
            page.locator(".widget-output img").first.wait_for(timeout=30_000)
            first = wait_for_new_image(page, "")

            page.locator(".widget-slider .noUi-handle").first.focus()  # keyboard: one step right
            page.keyboard.press("ArrowRight")
            page.wait_for_function("() => document.querySelector('.widget-readout').textContent.trim() === '4'",
                                   timeout=30_000)
            second = wait_for_new_image(page, first)

            handle = page.locator(".widget-slider .noUi-handle").first.bounding_box()  # mouse: drag to the end
            track = page.locator(".widget-slider .noUi-base").first.bounding_box()
            page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] + track["width"] + 20, track["y"] + track["height"] / 2, steps=8)
            page.mouse.up()
            page.wait_for_function("() => document.querySelector('.widget-readout').textContent.trim() === '7'",
                                   timeout=30_000)
            third = wait_for_new_image(page, second)
            assert len({first, second, third}) == 3
            page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - t0:.1f} s; screenshot {tmp_path / 'jupyterlab.png'}")
