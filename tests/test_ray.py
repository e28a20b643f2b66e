"""Sweeps as Ray tasks (debug/cluster.py) on a local 2-CPU cluster (no network), and the bad-input lines.

The cluster tests skip when Ray is not installed; the error lines (`--ray` without Ray, an unreachable
address, Ray never imported without --ray) run either way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import onnxruntime as ort
import pytest

from qwen3vl_lab.debug import sweep as sweep_module
from qwen3vl_lab.debug.cluster import Backend
from qwen3vl_lab.debug.results import RESULTS_FOLDER
from qwen3vl_lab.debug.simulate import SimRecipe
from qwen3vl_lab.debug.sweep import sweep
from qwen3vl_lab.debug.variants import ASSETS_FOLDER, VARIANT_STAMP, build_variant, source_fingerprint
from qwen3vl_lab.export.quantize import Int4Recipe

TEXT = "Write a haiku about the sea."
N = 3
RECIPES = [Int4Recipe(), Int4Recipe(bits=2, block_size=16, symmetric=False), SimRecipe(bits=3, block_size=32)]
# onnxruntime refuses this one at load: hqq writes the int8 lm_head with float zero points, and MatMulNBits on
# CPU runs 8 bits only with uint8 zero points (measured with onnxruntime 1.32)
REFUSED = Int4Recipe(algorithm="hqq", lm_head="int8").validate()  # hqq is asymmetric: hqq-b32-asym-acc4-head_int8


def figures(result) -> list[tuple]:
    """What a row measures (not timings, folders or where it ran), in rank order."""
    return [(r.name, r.mean_kl, r.max_kl, r.agreement, r.mean_ref_rank, r.first_divergence, r.decoder_mb)
            for r in result.rows]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)  # a local cluster: no network
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(cluster, tiny_onnx_fp32_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("ray-sweep")
    local = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=base / "local", n_steps=N, progress=False)
    remote = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=base / "ray", n_steps=N, progress=False,
                   backend=Backend(ray=True))
    return local, remote, base


def test_ray_sweep_gives_the_local_table(runs):
    local, remote, base = runs
    assert figures(remote) == figures(local)  # same ranking, same numbers
    assert remote.table().splitlines()[:3] == local.table().splitlines()[:3]
    assert all(r.pid is not None and r.pid != os.getpid() for r in remote.rows)  # each ran in a Ray worker
    assert all(r.pid == os.getpid() for r in local.rows)
    assert remote.backend.startswith("Ray")
    # each task cleaned up its variant (only the small records came back); the local run keeps them
    assert not any((base / "ray" / r.name).exists() for r in RECIPES)
    assert all((base / "local" / r.name / VARIANT_STAMP).is_file() for r in RECIPES)
    assert len(list((base / "ray" / RESULTS_FOLDER).glob("*.json"))) == 3


def test_a_recipe_onnxruntime_refuses_is_a_failed_row(runs, tiny_onnx_fp32_dir):
    _, remote, base = runs
    result = sweep(tiny_onnx_fp32_dir, [*RECIPES, REFUSED], [TEXT], out_dir=base / "ray", n_steps=N, progress=False,
                   backend=Backend(ray=True))
    assert [r.cached for r in result.rows[:3]] == [True, True, True]  # the three finished ones are not redone
    assert figures(result)[:3] == figures(remote)
    bad = result.rows[3]
    assert bad.name == REFUSED.name and bad.failed and not bad.cached
    assert "could not be loaded by onnxruntime" in bad.error and "8-bit" in bad.error
    assert f"{REFUSED.name[:42]:42s} FAILED: " in result.table()
    assert not list((base / "ray").glob(".*.building-*")) and not (base / "ray" / REFUSED.name).exists()  # cleaned up


def test_interrupting_cancels_the_remote_tasks_and_leaves_no_half_written_variant(
        cluster, tiny_onnx_fp32_dir, tmp_path, monkeypatch):
    real = sweep_module.run_jobs

    def interrupted_after_the_first_variant(fn, jobs, backend, on_result, **kw):
        if fn is not sweep_module.run_variant_job:
            return real(fn, jobs, backend, on_result, **kw)

        def first_then_ctrl_c(i, record):
            on_result(i, record)
            raise KeyboardInterrupt

        return real(fn, jobs, backend, first_then_ctrl_c, **kw)

    monkeypatch.setattr(sweep_module, "run_jobs", interrupted_after_the_first_variant)
    # The fast simulated variant goes first: the job that starts on the CPU it frees is an onnxruntime
    # quantization, which takes far longer than the cancellation takes to reach it. (A sub-second simulated
    # variant started there could finish before any cancel arrives: done before the interruption, not after.)
    sim = [r for r in RECIPES if isinstance(r, SimRecipe)]
    recipes = [*sim, *[r for r in RECIPES if r not in sim], Int4Recipe(block_size=64), Int4Recipe(lm_head="int8")]
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny_onnx_fp32_dir, recipes, [TEXT], out_dir=out, n_steps=N, progress=False,
              backend=Backend(ray=True), keep_variants=True)
    built = sorted(p.name for p in out.iterdir() if (p / VARIANT_STAMP).is_file())
    time.sleep(3)  # a task that was not stopped would go on building
    assert sorted(p.name for p in out.iterdir() if (p / VARIANT_STAMP).is_file()) == built  # the run stopped
    # What the code guarantees, not how many tasks a scheduler had started (that depends on its timing): the
    # first variant is there, every variant in place is complete (its stamp is this recipe on this export, its
    # decoder opens), none is half-written, no temporary folder is left, and only the finished row is kept.
    by_name = {r.name: r for r in recipes}
    assert by_name[recipes[0].name].name in built
    fingerprint = source_fingerprint(tiny_onnx_fp32_dir / "cpu-fp32")
    for name in built:
        folder, _, reused = build_variant(tiny_onnx_fp32_dir / "cpu-fp32", out, by_name[name], fingerprint=fingerprint,
                                          assets=out / ASSETS_FOLDER)
        assert reused, f"{name} is in place but its stamp does not verify"
        ort.InferenceSession(str(next(folder.rglob("model.onnx"))), providers=["CPUExecutionProvider"])
    leftovers = [p.name for p in out.iterdir() if p.name in by_name and not (p / VARIANT_STAMP).is_file()]
    assert leftovers == [] and not list(out.glob(".*.building-*"))  # no half-written variant, no temporary folder
    assert len(list((out / RESULTS_FOLDER).glob("*.json"))) == 1  # the finished one is kept


def test_ctrl_c_on_the_cli_cancels_the_ray_tasks(tiny_onnx_fp32_dir, tmp_path):
    """A real SIGINT to `qwen3vl-lab sweep --ray` (a local cluster of its own, or the one this module
    started) once the first row is on disk: exit 130, the finished row kept, no half-written variant or
    temporary folder, and nothing built afterwards."""
    pytest.importorskip("ray")
    out = tmp_path / "sweep"
    names = [r.name for r in [*RECIPES, Int4Recipe(block_size=64), Int4Recipe(lm_head="int8"),
                              Int4Recipe(block_size=128)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_lab", "sweep", "--model_dir", str(tiny_onnx_fp32_dir),
                             "--prompt", TEXT, "--n_steps", str(N), "--out_dir", str(out), "--recipes", *names,
                             "--ray", "--keep_variants", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not list((out / RESULTS_FOLDER).glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    rows = len(list((out / RESULTS_FOLDER).glob("*.json")))
    built = sorted(p.name for p in out.iterdir() if (p / VARIANT_STAMP).is_file())
    assert 1 <= rows < len(names) and len(built) < len(names)  # the queued ones never ran
    assert [p.name for p in out.iterdir() if p.name in names and p.name not in built] == []  # nothing half-written
    assert not list(out.glob(".*.building-*"))
    time.sleep(3)  # a task that was not stopped would go on building
    assert sorted(p.name for p in out.iterdir() if (p / VARIANT_STAMP).is_file()) == built


# -- bad input (Ray installed or not) --------------------------------------------------------------
def _cli(*args, extra_env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "qwen3vl_lab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_ray_without_ray_installed_is_one_line(tiny_onnx_fp32_dir, tmp_path, monkeypatch, capsys):
    from qwen3vl_lab.apps.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    code = main(["sweep", "--model_dir", str(tiny_onnx_fp32_dir), "--recipes", "default-b32-sym-acc4-head_int4",
                 "--ray", "--out_dir", str(tmp_path / "v"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'pip install "qwen3vl-lab[ray]"' in err[0]
    assert not (tmp_path / "v").exists()  # refused before any work


def test_an_unreachable_cluster_is_one_line_and_ray_is_never_imported_without_ray(tiny_onnx_fp32_dir, tmp_path):
    pytest.importorskip("ray")
    done = _cli("sweep", "--model_dir", tiny_onnx_fp32_dir, "--recipes", "default-b32-sym-acc4-head_int4",
                "--ray", "127.0.0.1:9", "--out_dir", tmp_path / "v", "--quiet", extra_env={"RAY_ADDRESS": ""})
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "unreachable" in err[0] and "Traceback" not in done.stderr
    code = ("import sys; from qwen3vl_lab.apps.cli import main; "
            f"main(['sweep', '--model_dir', {str(tiny_onnx_fp32_dir)!r}, '--recipes', 'sim-int3-b32', "
            f"'--prompt', 'Hi', '--n_steps', '2', '--out_dir', {str(tmp_path / 'local')!r}, '--quiet']); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))")
    done = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("argv,needle", [
    (["--ray", "--workers", "2"], "pass one of them"),
    (["--task_cpus", "2"], "pass --ray too"),
    (["--workers", "0"], "--workers must be"),
])
def test_backend_flags_are_checked(tiny_onnx_fp32_dir, argv, needle, capsys):
    from qwen3vl_lab.apps.cli import main

    try:
        code = main(["sweep", "--model_dir", str(tiny_onnx_fp32_dir), "--recipes", "sim-int3-b32", *argv])
    except SystemExit as e:  # argparse's own checks (errors.ArgumentParser: one line, exit 2)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_eval_shapes_recipes_on_ray_gives_the_local_answers(cluster, shapes_onnx_fp32_dir, tmp_path, capsys):
    from qwen3vl_lab.apps.cli import main
    from qwen3vl_lab.shapes.accuracy import recipe_accuracy

    recipes = ["fp32", "sim-int2-per-tensor-asym"]
    local = recipe_accuracy(shapes_onnx_fp32_dir, recipes, n=1, out_dir=tmp_path / "local", progress=False)
    code = main(["eval-shapes", "--model_dir", str(shapes_onnx_fp32_dir), "--recipes", *recipes, "--n", "1",
                 "--out_dir", str(tmp_path / "ray"), "--ray", "--quiet", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    saved = json.loads(out.strip().splitlines()[-1])
    assert [r["accuracy"] for r in saved["rows"]] == [r.table for r in local.rows]
    assert [r["well_formed"] for r in saved["rows"]] == [r.well_formed for r in local.rows]
    assert not (tmp_path / "ray" / recipes[1]).exists()  # the task removed its variant once scored
