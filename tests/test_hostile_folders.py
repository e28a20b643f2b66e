"""A downloaded model folder, crafted by an attacker (issue 22, classes 1-3): nothing from it runs, nothing
outside it is read, nothing of the user's is overwritten.

1. Code: a tokenizer folder with an `auto_map` and its own .py, which would write a marker file when imported;
   "y" is fed on standard input (what transformers' "run the custom code? [y/N]" prompt reads). The marker
   never appears; one line, exit 2.
2. Paths: every file name a folder gives (genai_config.json file names, external-data locations, shard
   names in model.safetensors.index.json) is confined to the folder by `paths.inside`. An audit hook records
   every file this process opens: the outside file is never among them.
3. Writes: `doctor --report_dir` and the export's replace step with the user's files in the way: their hashes
   are the same after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.paths import inside

# -- what the process opens ------------------------------------------------------------------------
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only inside `opened()`


@contextmanager
def opened():
    """Every path this process opens inside the block (Python's `open` audit event: builtins.open, io,
    os.open, np.fromfile and np.memmap go through it)."""
    global _OPENED
    _OPENED = seen = []
    try:
        yield seen
    finally:
        _OPENED = None


def test_the_audit_hook_sees_every_way_our_readers_open_a_file(tmp_path):
    """The check below can fail: each way our readers open a data file is recorded."""
    f = tmp_path / "w.data"
    f.write_bytes(bytes(64))
    for read in (lambda: f.read_bytes(), lambda: np.fromfile(f, np.float32), lambda: np.memmap(f, np.float32, "r"),
                 lambda: os.close(os.open(f, os.O_RDONLY))):
        with opened() as seen:
            read()
        assert touched(seen, f), seen


def touched(seen: list[str], outside: Path) -> list[str]:
    """The opened paths that lead to `outside` (a file, or anything below a folder), symlinks resolved."""
    target = outside.resolve()
    return [p for p in seen if Path(p).resolve() == target or target in Path(p).resolve().parents]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clone(src: Path, dst: Path, copy: tuple[str, ...] = ()) -> Path:
    """Hard links to `src`'s files, real copies of `copy` (relative names of files to edit)."""
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copy2 if p.relative_to(src).as_posix() in copy else os.link)(p, target)
    return dst


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "qwen3vl_lab", *[str(a) for a in argv]]


# -- 1. code from the folder never runs ------------------------------------------------------------
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"


def plant_custom_code(folder: Path, marker: Path) -> None:
    """Make `folder`'s tokenizer one that transformers would load from the folder's own evil_tok.py (and ask
    about it on stdin): an unknown tokenizer_class and an auto_map naming the module."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.unlink()  # a hard link to the shared fixture: replace, never edit
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    path.write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(PAYLOAD.format(marker=str(marker)))


@pytest.fixture
def evil_export(tiny_onnx_fp32_dir, tmp_path) -> tuple[Path, Path]:
    model = clone(tiny_onnx_fp32_dir, tmp_path / "evil")
    marker = tmp_path / "MARKER"
    plant_custom_code(model / "cpu-fp32", marker)
    return model, marker


@pytest.mark.parametrize("how", ["generate", "interactive", "tokenizer_dir"])
def test_a_folders_own_python_never_runs_even_when_stdin_says_yes(how, evil_export, tiny_onnx_fp32_dir):
    """Real processes with a real "y" on standard input: for `--interactive` it is also the first chat line."""
    model, marker = evil_export
    argv = {"generate": ["--model_dir", model, "--prompt", "Hi", "--max_new_tokens", "2"],
            "interactive": ["--model_dir", model, "--interactive"],
            "tokenizer_dir": ["--model_dir", tiny_onnx_fp32_dir, "--tokenizer_dir", model / "cpu-fp32",
                              "--prompt", "Hi", "--max_new_tokens", "2"]}[how]
    done = subprocess.run(cli("generate", *argv), input="y\ny\nquit\n", capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert_one_line_error(done.returncode, done.stderr, "tokenizer_config.json", "auto_map", "never runs")
    assert "[y/N]" not in done.stdout + done.stderr


def test_without_the_refusal_trust_remote_code_false_still_never_prompts(evil_export, monkeypatch):
    """The second wall: transformers itself, called as we call it, refuses without asking (stdin says "y")."""
    import io

    from qwen3vl_lab import tokenizer

    model, marker = evil_export
    monkeypatch.setattr(tokenizer, "refuse_custom_code", lambda folder: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(UserError, match="custom code"):
        tokenizer._load_folder.__wrapped__(str(model / "cpu-fp32"))
    assert not marker.exists()


def test_make_guide_export_refuses_a_checkpoint_with_custom_code(tiny_dir, tmp_path, capsys):
    hf = clone(tiny_dir, tmp_path / "hf")
    plant_custom_code(hf, tmp_path / "MARKER")
    code, _, err = run_cli(capsys, "make-guide-export", "--hf_dir", hf, "--output_dir", tmp_path / "out")
    assert_one_line_error(code, err, "auto_map", "never runs")
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()


# -- 2. nothing outside the folder is read -----------------------------------------------------------
@pytest.fixture
def outside(tiny_onnx_fp32_dir, tmp_path) -> Path:
    """A folder next to the model holding a working decoder: reading it would show (generation would run)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        os.link(tiny_onnx_fp32_dir / "cpu-fp32" / name, folder / name)
    return folder


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DECODER_NAMES = {  # what genai_config.json's model.decoder.filename says, given the outside folder
    "climbs-out": lambda o: "../../outside/model.onnx",
    "absolute": lambda o: str(o / "model.onnx"),
    "proc": lambda o: "/proc/self/environ",
}


@pytest.mark.parametrize("kind", sorted(DECODER_NAMES))
def test_a_genai_config_file_name_outside_the_folder_is_refused(kind, tiny_onnx_fp32_dir, outside, tmp_path, capsys):
    model = clone(tiny_onnx_fp32_dir, tmp_path / "model", copy=("cpu-fp32/genai_config.json",))
    name = DECODER_NAMES[kind](outside)
    edit_json(model / "cpu-fp32" / "genai_config.json", lambda c: c["model"]["decoder"].update(filename=name))
    with opened() as seen:
        code, _, err = run_cli(capsys, "generate", "--model_dir", model, "--prompt", "Hi", "--max_new_tokens", "1")
    assert_one_line_error(code, err, "genai_config.json", "model.decoder.filename", "outside")
    assert touched(seen, outside) == [] and touched(seen, Path("/proc/self/environ")) == []


def test_a_decoder_that_is_a_symlink_out_of_the_folder_is_refused(tiny_onnx_fp32_dir, outside, tmp_path, capsys):
    model = clone(tiny_onnx_fp32_dir, tmp_path / "model")
    (model / "cpu-fp32" / "model.onnx").unlink()
    (model / "cpu-fp32" / "model.onnx").symlink_to(outside / "model.onnx")
    for argv in (["generate", "--model_dir", model, "--prompt", "Hi", "--max_new_tokens", "1"],
                 ["inspect", "--model_dir", model]):
        with opened() as seen:
            code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "model.onnx", "through a symlink")
        assert touched(seen, outside) == [], argv[0]


def test_a_genai_export_naming_an_embedding_outside_is_refused(tiny_onnx_fp32_dir, tmp_path, capsys):
    """onnxruntime-genai's layout reads model.embedding.filename (ours is found by its fixed name)."""
    model = clone(tiny_onnx_fp32_dir, tmp_path / "model", copy=("cpu-fp32/genai_config.json",))
    secret = tmp_path / "secret.onnx"
    os.link(tiny_onnx_fp32_dir / "cpu-fp32" / "qwen3vl-embedding.onnx", secret)
    for name in ("qwen3vl_lab.json", "qwen3vl-embedding.onnx", "qwen3vl-embedding-genai.onnx"):
        (model / "cpu-fp32" / name).unlink()
    edit_json(model / "cpu-fp32" / "genai_config.json",
              lambda c: c["model"].update(embedding={"filename": "../../secret.onnx"}))
    with opened() as seen:
        code, _, err = run_cli(capsys, "inspect", "--model_dir", model)
    assert_one_line_error(code, err, "genai_config.json", "model.embedding.filename", "outside")
    assert touched(seen, secret) == []


def relocate(graph_file: Path, location) -> None:
    """Point every external-data entry of `graph_file` at `location` (a copy of the graph: never the fixture)."""
    model = onnx.load(str(graph_file), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location(e.value)
    graph_file.unlink()
    onnx.save(model, str(graph_file))


def test_inspect_refuses_weights_that_live_outside_and_lists_weights_that_are_missing(
        tiny_onnx_fp32_dir, outside, tmp_path, capsys):
    model = clone(tiny_onnx_fp32_dir, tmp_path / "model")
    relocate(model / "cpu-fp32" / "model.onnx", lambda _: "../../outside/model.onnx.data")
    with opened() as seen:
        code, _, err = run_cli(capsys, "inspect", "--model_dir", model)
    assert_one_line_error(code, err, "model.onnx", "external_data location", "outside")
    assert touched(seen, outside) == []

    (model / "cpu-fp32" / "model.onnx").unlink()
    os.link(tiny_onnx_fp32_dir / "cpu-fp32" / "model.onnx", model / "cpu-fp32" / "model.onnx")
    (model / "cpu-fp32" / "model.onnx.data").unlink()
    code, out, err = run_cli(capsys, "inspect", "--model_dir", model)
    assert code == 0, err
    missing = next(line for line in out.splitlines() if line.strip().startswith("missing:"))
    assert "the weights of model.onnx (model.onnx.data" in missing and "nothing" not in missing, missing


LOCATIONS = {  # an external-data location, given the outside file
    "climbs-out": lambda f: "../" + f.name,
    "absolute": lambda f: str(f),
    "symlink": lambda f: "link.data",
    "proc": lambda f: "/proc/self/environ",
}


@pytest.fixture
def weight_readers():
    """Our own readers of external data (onnxruntime refuses such locations itself; these must too)."""
    from qwen3vl_lab.debug.weights import map_array
    from qwen3vl_lab.export.decoder_fast import SourceDecoder
    from qwen3vl_lab.export.quantize import read_array, read_raw
    from qwen3vl_lab.layouts import external_files

    return {"read_array (quantizer, read_quantized)": lambda m, t, d: read_array(t, d),
            "read_raw (quantizer)": lambda m, t, d: read_raw(t, d),
            "map_array (compare_weights)": lambda m, t, d: map_array(t, d),
            "SourceDecoder.array (fast graph)": lambda m, t, d: SourceDecoder(m, d).array(t.name),
            "external_files (inspect, edited sessions)": lambda m, t, d: external_files(m, d / "g.onnx")}


@pytest.mark.parametrize("kind", sorted(LOCATIONS))
def test_our_weight_readers_never_open_an_external_data_file_outside_the_graphs_folder(kind, weight_readers, tmp_path):
    secret = tmp_path / "secret.data"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "link.data").symlink_to(secret)
    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", LOCATIONS[kind](secret)), ("offset", "0"), ("length", "64")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph)
    for reader, read in weight_readers.items():
        with opened() as seen, pytest.raises(UserError) as e:
            read(model, w, folder)
        message = str(e.value)
        assert "\n" not in message and "'w'" in message and "location" in message and "outside" in message, reader
        assert touched(seen, secret) == [] and touched(seen, Path("/proc/self/environ")) == [], reader


def test_inside_is_the_one_rule(tmp_path):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(b"x")
    (folder / "up").symlink_to(tmp_path)
    (folder / "loop").symlink_to(folder / "loop")
    assert inside(folder, "sub/a.bin", "k") == folder / "sub" / "a.bin"
    assert inside(folder, "sub/../sub/a.bin", "k") == folder / "sub/../sub/a.bin"  # stays inside: fine
    assert inside(folder, "up/m/sub/a.bin", "k") == folder / "up/m/sub/a.bin"  # a link that leads back in: fine
    for bad in ("../m2/a.bin", "/etc/passwd", "up/other", ".", "", "loop", "a\0b", 3, None):
        with pytest.raises(UserError, match="^k ") as e:
            inside(folder, bad, "k")
        assert "\n" not in str(e.value)


# -- checkpoints: model.safetensors.index.json -----------------------------------------------------
SHARDS = {  # a weight_map value, given the outside shard
    "climbs-out": lambda f: "../" + f.name,
    "absolute": lambda f: str(f),
    "symlink": lambda f: "link.safetensors",
    "a-list": lambda f: [f.name],
    "a-number": lambda f: 7,
}


def sharded(tiny_dir: Path, folder: Path) -> Path:
    """`tiny_dir` saved as two shards + model.safetensors.index.json."""
    from qwen3vl_lab.export.checkpoint import Checkpoint, LazyTensor, save_checkpoint_weights

    ckpt = Checkpoint.open(tiny_dir)
    folder.mkdir()
    for p in tiny_dir.glob("*.json"):
        os.link(p, folder / p.name)
    total = sum(ckpt.info(n).nbytes for n in ckpt.names())
    save_checkpoint_weights(folder, {n: LazyTensor(ckpt.shape(n), lambda n=n: ckpt.get(n)) for n in ckpt.names()},
                            max_shard_bytes=total // 2 + 1)
    return folder


@pytest.fixture(scope="module")
def sharded_tiny(tiny_dir, tmp_path_factory) -> Path:
    return sharded(tiny_dir, tmp_path_factory.mktemp("sharded") / "hf")


@pytest.mark.parametrize("kind", sorted(SHARDS))
def test_a_shard_name_outside_the_checkpoint_is_refused(kind, sharded_tiny, tmp_path, capsys):
    hf = clone(sharded_tiny, tmp_path / "hf", copy=("model.safetensors.index.json",))
    first = sorted(hf.glob("model-*.safetensors"))[0]
    secret = tmp_path / "secret.safetensors"
    os.link(first, secret)  # a real shard: reading it would show (the export would go through)
    (hf / "link.safetensors").symlink_to(secret)
    index = hf / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].update({k: SHARDS[kind](secret) for k, v in d["weight_map"].items()
                                                       if v == first.name}))
    with opened() as seen:
        code, _, err = run_cli(capsys, "export", "--hf_dir", hf, "--output_dir", tmp_path / "out", "--quiet")
    assert_one_line_error(code, err, "model.safetensors.index.json", "weight_map[")
    assert touched(seen, secret) == [] and not (tmp_path / "out").exists()


def test_a_hugging_face_cache_snapshot_is_read_through_its_symlinks(sharded_tiny, tmp_path):
    """The Hub's cache keeps files in models--ORG--NAME/blobs/ and links them from snapshots/REV/: allowed."""
    from qwen3vl_lab.export.checkpoint import Checkpoint

    repo = tmp_path / "hub" / "models--Qwen--Qwen3-VL-2B-Instruct"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for p in sharded_tiny.iterdir():
        blob = repo / "blobs" / sha(p)
        os.link(p, blob)
        (snapshot / p.name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert Checkpoint.open(snapshot).names() == Checkpoint.open(sharded_tiny).names()
    (snapshot / "onnx").mkdir()  # onnx-community's repositories keep their graphs one folder down
    (snapshot / "onnx" / "model.onnx").symlink_to(Path("../../..") / "blobs" / blob.name)
    assert inside(snapshot / "onnx", "model.onnx", "k") == snapshot / "onnx" / "model.onnx"
    (repo / "elsewhere").write_text("not a blob")
    (snapshot / "sneaky").symlink_to(repo / "elsewhere")
    with pytest.raises(UserError, match="outside"):
        inside(snapshot, "sneaky", "k")


# -- 3. nothing of the user's is overwritten -------------------------------------------------------
@pytest.fixture
def users_files(tmp_path) -> dict[Path, str]:
    """A file of the user's outside the report folder (a symlink's target) and their own figure-named file."""
    victim = tmp_path / "thesis.txt"
    victim.write_text("the user's thesis\n")
    return {victim: sha(victim)}


@pytest.mark.parametrize("planted", ["symlink", "users-file"])
def test_doctor_report_dir_refuses_a_figure_name_it_did_not_write(planted, tiny_onnx_fp32_dir, users_files,
                                                                  tmp_path, capsys):
    """Refused up front (before the diagnosis runs), in one line; the user's bytes are unchanged."""
    report = tmp_path / "report"
    report.mkdir()
    figure = report / "kl_per_step.png"
    victim = next(iter(users_files))
    if planted == "symlink":
        figure.symlink_to(victim)
    else:
        figure.write_bytes(b"my own plot")
        users_files[figure] = sha(figure)
    code, out, err = run_cli(capsys, "doctor", "--model_dir", tiny_onnx_fp32_dir, "--report_dir", report,
                             "--no_recipes", "--quiet")
    assert_one_line_error(code, err, "--report_dir", "kl_per_step.png", "never replaces")
    assert out == ""  # nothing diagnosed for nothing
    assert {p: sha(p) for p in users_files} == users_files
    assert figure.is_symlink() == (planted == "symlink")


def test_write_figures_replaces_its_own_figures_and_never_writes_through_a_link(tmp_path, users_files):
    from matplotlib.figure import Figure

    from qwen3vl_lab.viz import doctor as viz

    class Sweep:  # what plot_sweep draws is beside the point here: one figure named "sweep"
        pass

    def fig(*_):
        f = Figure(figsize=(2, 2))
        f.subplots().plot([0, 1], [1, 0])
        return f

    viz_plot_sweep, viz.plot_sweep = viz.plot_sweep, fig
    try:
        report = tmp_path / "report"
        first = viz.write_figures(None, report, sweep=Sweep())
        again = viz.write_figures(None, report, sweep=Sweep())  # ours, unchanged: replaced
        assert first == again == [report / "sweep.png"]
        (report / "sweep.png").write_bytes(b"edited by the user")  # no longer what we wrote: refused
        with pytest.raises(UserError, match="sweep.png"):
            viz.write_figures(None, report, sweep=Sweep())
        assert (report / "sweep.png").read_bytes() == b"edited by the user"
        (report / "sweep.png").unlink()
        victim = next(iter(users_files))
        (report / ".qwen3vl-lab-figures.json").unlink()
        (report / ".qwen3vl-lab-figures.json").symlink_to(victim)  # even our record: replaced, not written through
        viz.write_figures(None, report, sweep=Sweep())
    finally:
        viz.plot_sweep = viz_plot_sweep
    assert {p: sha(p) for p in users_files} == users_files
    assert not (report / ".qwen3vl-lab-figures.json").is_symlink()


def tree(path: Path) -> list[tuple[str, bytes | None]]:
    """Names and bytes of `path` and everything below it (None for a folder)."""
    return [(p.name, p.read_bytes() if p.is_file() else None) for p in [path, *sorted(path.rglob("*"))]]


@pytest.mark.parametrize("squatter", ["file", "folder-with-files", "empty-folder"])
def test_a_predictable_old_name_made_by_someone_else_never_breaks_a_replace(squatter, tmp_path):
    """What `.cpu-fp32.old-PID` used to be: another process makes that name first; the replace goes through
    and the squatter's bytes are untouched."""
    from qwen3vl_lab.export.files import replace_folder, stamp_folder

    final, staged = tmp_path / "cpu-fp32", tmp_path / ".staged"
    for folder, text in ((final, "old"), (staged, "new")):
        folder.mkdir()
        (folder / "model.onnx").write_text(text)
    stamp_folder(final, "export")
    planted = tmp_path / f".cpu-fp32.old-{os.getpid()}"
    if squatter == "file":
        planted.write_text("someone else's")
    else:
        planted.mkdir()
        if squatter == "folder-with-files":
            (planted / "theirs.txt").write_text("someone else's")
    before = tree(planted)
    replace_folder(staged, final)
    assert (final / "model.onnx").read_text() == "new" and not staged.exists()
    after = tree(planted)
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name] == [planted.name]


def test_a_re_export_with_the_old_name_taken_goes_through(tiny_dir, tiny_onnx_fp32_dir, tmp_path, capsys):
    """The same from the command line: an earlier export is replaced, the squatter's folder is untouched."""
    out = clone(tiny_onnx_fp32_dir, tmp_path / "out")
    planted = out / f".cpu-fp32.old-{os.getpid()}"
    planted.mkdir()
    (planted / "theirs.txt").write_text("someone else's")
    code, _, err = run_cli(capsys, "export", "--hf_dir", tiny_dir, "--output_dir", out, "--quiet")
    assert code == 0 and "Traceback" not in err, err
    assert (planted / "theirs.txt").read_text() == "someone else's"
    assert sorted(p.name for p in out.iterdir()) == sorted(["cpu-fp32", "pytorch", planted.name])


def test_a_tokenizer_file_that_is_a_symlink_out_of_the_folder_is_never_read(tiny_onnx_fp32_dir, tmp_path, capsys):
    model = clone(tiny_onnx_fp32_dir, tmp_path / "model")
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (model / "cpu-fp32" / "tokenizer.json").unlink()
    (model / "cpu-fp32" / "tokenizer.json").symlink_to(secret)
    from qwen3vl_lab.tokenizer import _load_folder

    _load_folder.cache_clear()
    with opened() as seen:
        code, _, err = run_cli(capsys, "generate", "--model_dir", model, "--prompt", "Hi", "--max_new_tokens", "1")
    assert_one_line_error(code, err, "tokenizer.json", "through a symlink")
    assert touched(seen, secret) == [] and "PRIVATE" not in err


def test_the_fast_paths_embedding_table_outside_the_folder_is_never_mapped(tiny_onnx_fp32_dir, tmp_path):
    """`--fast` reads the embedding rows straight from the table's external-data file: confined too (onnxruntime
    refuses such a graph when the model opens, so the graph is changed after that, as on a second look)."""
    from qwen3vl_lab.fast import embedding_table
    from qwen3vl_lab.model import load_model

    model = clone(tiny_onnx_fp32_dir, tmp_path / "model")
    secret = tmp_path / "secret.data"
    os.link(tiny_onnx_fp32_dir / "cpu-fp32" / "qwen3vl-embedding.onnx.data", secret)
    m = load_model(model, open_decoder=False)
    assert embedding_table(m) is not None  # the table is read this way
    relocate(model / "cpu-fp32" / "qwen3vl-embedding.onnx", lambda _: "../../secret.data")
    with opened() as seen, pytest.raises(UserError, match="qwen3vl-embedding.onnx.*outside"):
        embedding_table(m)
    assert touched(seen, secret) == []


def test_a_precision_folder_that_is_a_symlink_out_of_the_export_is_refused(tiny_onnx_fp32_dir, tmp_path, capsys):
    """OUT/cpu-fp32 -> a folder elsewhere (another of the user's models): not read through the export."""
    elsewhere = clone(tiny_onnx_fp32_dir / "cpu-fp32", tmp_path / "elsewhere")
    model = clone(tiny_onnx_fp32_dir / "pytorch", tmp_path / "model" / "pytorch")
    (model.parent / "cpu-fp32").symlink_to(elsewhere, target_is_directory=True)
    with opened() as seen:
        code, _, err = run_cli(capsys, "generate", "--model_dir", model.parent, "--prompt", "Hi", "--max_new_tokens", "1")
    assert_one_line_error(code, err, "its folder cpu-fp32", "through a symlink")
    assert touched(seen, elsewhere) == []
    code, _, err = run_cli(capsys, "generate", "--model_dir", model.parent / "cpu-fp32", "--prompt", "Hi",
                           "--max_new_tokens", "1")
    assert code == 0, err  # named directly, the folder is the user's own choice
