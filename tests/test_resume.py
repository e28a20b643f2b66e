"""Resumable sweeps: every finished row is cached on disk by (export, recipe, prompt set), written atomically.

Recomputation is counted, not timed: each row says whether it came from the cache (`cached`), and the
variant jobs that actually run are counted by wrapping the job function.
"""

from __future__ import annotations

import json
import os

import pytest

from qwen3vl_lab.debug import sweep as sweep_module
from qwen3vl_lab.debug.cluster import Backend
from qwen3vl_lab.debug.results import RESULTS_FOLDER
from qwen3vl_lab.debug.simulate import SimRecipe
from qwen3vl_lab.debug.sweep import sweep
from qwen3vl_lab.debug.variants import VARIANT_STAMP
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.quantize import Int4Recipe
from qwen3vl_lab.shapes.accuracy import recipe_accuracy

TEXT = "Write a haiku about the sea."
N = 3
RECIPES = [Int4Recipe(), SimRecipe(bits=3, block_size=32)]


def figures(result) -> list[tuple]:
    """Everything a row measures (not timings, folders or cache flags), in rank order."""
    return [(r.name, r.mean_kl, r.max_kl, r.agreement, r.mean_ref_rank, r.first_divergence, r.decoder_mb)
            for r in result.rows]


@pytest.fixture
def jobs(monkeypatch):
    """The recipes whose variant job really ran, in order."""
    ran = []
    real = sweep_module.run_variant_job

    def counting(job):
        ran.append(job.recipe.name)
        return real(job)

    monkeypatch.setattr(sweep_module, "run_variant_job", counting)
    return ran


def _result_file(out, name):
    return next(p for p in (out / RESULTS_FOLDER).glob("*.json") if json.loads(p.read_text())["record"]["recipe"] == name)


def test_a_finished_sweep_is_read_back_and_a_deleted_row_alone_is_recomputed(tiny_onnx_fp32_dir, tmp_path, jobs):
    out = tmp_path / "sweep"
    first = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert sorted(jobs) == sorted(r.name for r in RECIPES) and first.cached == [False, False]
    assert not first.reference_cached
    assert len(list((out / RESULTS_FOLDER).glob("*.json"))) == 2
    assert not [p for p in (out / RESULTS_FOLDER).iterdir() if p.name.startswith(".")]  # no temporary files left

    jobs.clear()
    again = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert jobs == [] and again.cached == [True, True]  # nothing built, nothing run
    assert figures(again) == figures(first)
    assert again.table().splitlines()[:-1] == first.table().splitlines()  # + "2 of 2 row(s) read from the cache"
    assert again.rows[0].comparison.kl.tolist() == first.rows[0].comparison.kl.tolist()

    _result_file(out, RECIPES[1].name).unlink()
    third = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert jobs == [RECIPES[1].name]  # only the deleted one
    rows = {r.name: r for r in third.rows}
    assert rows[RECIPES[0].name].cached and not rows[RECIPES[1].name].cached
    assert rows[RECIPES[1].name].variant_reused and third.reference_cached  # its folder and the fp32 record were kept
    assert figures(third) == figures(first)

    jobs.clear()  # another prompt set is another key: everything is computed again
    other = sweep(tiny_onnx_fp32_dir, RECIPES, ["Hello"], out_dir=out, n_steps=N, progress=False)
    assert sorted(jobs) == sorted(r.name for r in RECIPES) and other.cached == [False, False]


def test_cached_results_that_do_not_verify_are_computed_again_and_said(tiny_onnx_fp32_dir, tmp_path, jobs, capsys):
    """Issue 22: an edited row (mean KL 0, top-1 100 %), a row moved under another row's key, random bytes, a
    JSON list, an edited fp32 reference record: none is shown as computed; each is computed again (the figures
    are the first run's) and named on stderr."""
    out = tmp_path / "sweep"
    first = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    capsys.readouterr()
    a, b = (_result_file(out, r.name) for r in RECIPES)
    entry = json.loads(a.read_text())
    entry["record"].update(mean_kl=0.0, max_kl=0.0, top1_agreement=1.0)
    b.write_text(a.read_text())  # a valid sealed row, under the other recipe's key (a swap, half of it)
    a.write_text(json.dumps(entry))
    jobs.clear()
    second = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert sorted(jobs) == sorted(r.name for r in RECIPES) and second.cached == [False, False]
    assert figures(second) == figures(first) and second.reference_cached
    assert capsys.readouterr().err.count("does not verify") == 2

    a.write_bytes(os.urandom(300))
    b.write_text("[1, 2, 3]\n")
    reference = next((out / sweep_module.REFERENCE_FOLDER).iterdir())
    logits = reference / "logits.npy"
    edited = logits.read_bytes()
    logits.write_bytes(edited[:-8] + bytes(8))  # the last logit of the record, zeroed
    jobs.clear()
    third = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert sorted(jobs) == sorted(r.name for r in RECIPES) and not third.reference_cached  # recorded again
    assert figures(third) == figures(first) and logits.read_bytes() != edited[:-8] + bytes(8)
    err = capsys.readouterr().err
    assert err.count("does not verify") == 3 and str(reference) in err, err


def test_an_interrupted_sweep_continues_where_it_stopped(tiny_onnx_fp32_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real = sweep_module.run_variant_job
    ran = []

    def interrupted_at_the_second(job):
        if ran:
            raise KeyboardInterrupt  # Ctrl-C while the second variant is being built
        ran.append(job.recipe.name)
        return real(job)

    monkeypatch.setattr(sweep_module, "run_variant_job", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert len(list((out / RESULTS_FOLDER).glob("*.json"))) == 1  # the first one is kept
    monkeypatch.setattr(sweep_module, "run_variant_job", real)
    resumed = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert {r.name: r.cached for r in resumed.rows} == {RECIPES[0].name: True, RECIPES[1].name: False}
    assert resumed.reference_cached


def test_a_failing_variant_is_a_failed_row_and_the_users_folder_is_kept(tiny_onnx_fp32_dir, tmp_path, capsys):
    from qwen3vl_lab.apps.cli import main

    out = tmp_path / "sweep"
    mine = out / RECIPES[1].name
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("not a variant")
    result = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=out, n_steps=N, progress=False)
    assert [r.failed for r in result.rows] == [False, True]  # failed rows rank last
    assert "is not a variant qwen3vl-lab built" in result.rows[1].error
    assert f"{RECIPES[1].name[:42]:42s} FAILED: " in result.table()
    assert (mine / "notes.txt").read_text() == "not a variant" and not (mine / VARIANT_STAMP).exists()
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["rows"][1]["error"] and saved["rows"][0]["error"] is None
    code = main(["sweep", "--model_dir", str(tiny_onnx_fp32_dir), "--recipes", *(r.name for r in RECIPES),
                 "--prompt", TEXT, "--n_steps", str(N), "--out_dir", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and "FAILED" in captured.out  # the table is printed, then one line
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 recipe(s) failed" in err[0] and "Traceback" not in captured.err


def test_recipe_accuracy_resumes(shapes_onnx_fp32_dir, tmp_path):
    out = tmp_path / "variants"
    recipes = ["fp32", "sim-int3-per-tensor"]
    first = recipe_accuracy(shapes_onnx_fp32_dir, recipes, n=1, out_dir=out, progress=False)
    again = recipe_accuracy(shapes_onnx_fp32_dir, recipes, n=1, out_dir=out, progress=False)
    assert [r.cached for r in first.rows] == [False, False] and [r.cached for r in again.rows] == [True, True]
    assert [r.predictions for r in again.rows] == [r.predictions for r in first.rows]
    assert [qa.question for qa in again.questions] == [qa.question for qa in first.questions]
    assert again.table().splitlines()[:-1] == first.table().splitlines()
    other = recipe_accuracy(shapes_onnx_fp32_dir, recipes, n=1, seed=1, out_dir=out, progress=False)
    assert [r.cached for r in other.rows] == [False, False]  # other scenes: another key


def test_an_unreadable_export_on_a_worker_is_one_line(tiny_onnx_fp32_dir, tmp_path):
    from qwen3vl_lab.debug.sweep import VariantJob, run_variant_job

    job = VariantJob(str(tmp_path / "elsewhere" / "cpu-fp32"), str(tmp_path), RECIPES[0], "x",
                     {"cpu-fp32/model.onnx": 1}, str(tmp_path / "no-record"), [TEXT], N)
    record = run_variant_job(job)
    assert record["fatal"] and "cannot read" in record["error"] and "\n" not in record["error"]
    with pytest.raises(UserError, match="cannot read"):
        sweep_module._stop_on_error(0, record)


def test_a_local_process_pool_gives_the_same_figures(tiny_onnx_fp32_dir, tmp_path):
    here = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=tmp_path / "here", n_steps=N, progress=False)
    pool = sweep(tiny_onnx_fp32_dir, RECIPES, [TEXT], out_dir=tmp_path / "pool", n_steps=N, progress=False,
                 backend=Backend(workers=2))
    assert figures(pool) == figures(here)
    assert all(r.pid is not None and r.pid != os.getpid() for r in pool.rows)  # ran in the pool's processes
    assert not any((tmp_path / "pool" / r.name).exists() for r in RECIPES)  # removed once scored


def test_a_sweep_without_out_dir_leaves_nothing_in_the_temporary_folder(tiny_onnx_fp32_dir, tmp_path, monkeypatch):
    """Without --out_dir a sweep works in a folder of the system's temporary folder, removed when it ends:
    after a finished sweep and after Ctrl-C during a variant."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    seen = []
    real = sweep_module.run_variant_job

    def watched(job):
        seen.append([(p.name, p.stat().st_mode & 0o777) for p in temp.iterdir()])  # the sweep's folder, while it runs
        return real(job)

    monkeypatch.setattr(sweep_module, "run_variant_job", watched)
    result = sweep(tiny_onnx_fp32_dir, RECIPES[1:], [TEXT], n_steps=N, progress=False)
    assert [r.failed for r in result.rows] == [False]
    assert len(seen) == 1 and len(seen[0]) == 1
    name, mode = seen[0][0]
    assert name.startswith("qwen3vl-sweep-") and mode == 0o700  # private, as tempfile.mkdtemp made it
    assert os.listdir(temp) == []

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_variant_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny_onnx_fp32_dir, RECIPES[1:], [TEXT], n_steps=N, progress=False)
    assert os.listdir(temp) == []
