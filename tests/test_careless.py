"""A careless user, case by case (issue 14): every mistake ends in one line naming the problem and the
fix, exit code 2, no traceback, nothing half-written, nothing of the user's lost.

`CASES` is the table: each case builds its inputs in a private folder and returns the command line and
the files of the user's that must come out untouched (hashed before and after). Cases that need a
real permission check run in one child process without root's file-permission override
(`setpriv` drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH); a full disk is a real 1 MB / 100 MB tmpfs;
signals, a closed pipe and a full stdout (/dev/full) are real processes. The Python API cases are a
second table.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli
from PIL import Image

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.checkpoint import Checkpoint, LazyTensor, save_checkpoint_weights
from qwen3vl_lab.limits import max_threads

# -- the world a case builds in ------------------------------------------------------------------


@dataclass
class World:
    hf: Path  # the tiny checkpoint (read-only)
    onnx: Path  # its fp32 export (read-only)
    tmp: Path  # this case's own folder

    def clone_onnx(self, name: str = "model", copy: tuple[str, ...] = ()) -> Path:
        """A private export: hard links to the fixture's files, real copies of `copy` (files to change)."""
        dst = self.tmp / name
        for src in self.onnx.rglob("*"):
            target = dst / src.relative_to(self.onnx)
            if src.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif src.relative_to(self.onnx).as_posix() in copy:
                shutil.copy2(src, target)
            else:
                os.link(src, target)
        return dst

    def clone_hf(self, name: str = "hf", edit: Callable[[dict], None] | None = None) -> Path:
        """A private checkpoint: config.json copied (and edited), everything else hard-linked."""
        dst = self.tmp / name
        dst.mkdir()
        for src in self.hf.iterdir():
            if src.name == "config.json":
                config = json.loads(src.read_text())
                if edit:
                    edit(config)
                (dst / src.name).write_text(json.dumps(config))
            elif src.is_file():
                os.link(src, dst / src.name)
        return dst

    def edit_genai(self, edit: Callable[[dict], None]) -> Path:
        model = self.clone_onnx(copy=("cpu-fp32/qwen3vl_lab.json",))  # our settings, beside genai_config.json
        path = model / "cpu-fp32" / "qwen3vl_lab.json"
        cfg = json.loads(path.read_text())
        edit(cfg["config"])
        path.write_text(json.dumps(cfg))
        return model

    def image(self, name: str = "red.png", size: tuple[int, int] = (64, 64)) -> Path:
        path = self.tmp / name
        Image.new("RGB", size, (200, 30, 30)).save(path)
        return path

    def user_folder(self, *parts: str, file: str = "mine.txt") -> Path:
        """A folder of the user's holding one file of theirs; returns the folder."""
        folder = self.tmp.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / file).write_text("the user's own notes\n")
        return folder


@dataclass
class Case:
    build: Callable[[World], tuple[list, list[Path]]]  # -> (argv, paths whose content must not change)
    needles: tuple[str, ...]  # what the one error line must say
    forbidden: tuple[str, ...] = ()  # what it must not say (misleading advice)
    as_user: bool = False  # a real permission check: run without root's override


CASES: dict[str, Case] = {}


def case(*needles: str, forbidden: tuple[str, ...] = (), as_user: bool = False):
    def register(build):
        CASES[build.__name__] = Case(build, needles, forbidden, as_user)
        return build
    return register


def gen(model, *flags) -> list:
    return ["generate", "--model_dir", model, "--prompt", "Hello", "--max_new_tokens", "2", *flags]


# -- 1. data loss --------------------------------------------------------------------------------
@case("mine.txt", "did not write", "--output_dir")
def export_into_a_users_precision_folder(w):
    out = w.user_folder("out", "cpu-fp32").parent
    return ["export", "--hf_dir", w.hf, "--output_dir", out, "--quiet"], [out]


@case("mine.txt", "did not write")
def export_into_a_users_pytorch_folder(w):
    out = w.user_folder("out", "pytorch").parent
    return ["export", "--hf_dir", w.hf, "--output_dir", out, "--quiet"], [out]


@case("mine.txt", "did not write")
def export_int4_into_a_users_int4_folder(w):
    out = w.user_folder("out", "cpu-int4").parent
    return ["export", "--hf_dir", w.hf, "--output_dir", out, "--precision", "int4", "--quiet"], [out]


@case("cpu-fp32", "is a file")
def export_where_cpu_fp32_is_a_users_file(w):
    out = w.tmp / "out"
    out.mkdir()
    (out / "cpu-fp32").write_text("not a folder")
    return ["export", "--hf_dir", w.hf, "--output_dir", out, "--quiet"], [out]


@case("--output_dir", "empty")
def export_to_an_empty_output_dir(w):
    return ["export", "--hf_dir", w.hf, "--output_dir", "", "--quiet"], []


@case("--output_dir", "is a file")
def export_to_a_file(w):
    target = w.tmp / "notes.txt"
    target.write_text("mine")
    return ["export", "--hf_dir", w.hf, "--output_dir", target, "--quiet"], [target]


@case("--overwrite", "not empty", forbidden=("overwrite=True",))
def make_tiny_into_a_users_folder(w):
    folder = w.user_folder("ckpt")
    return ["make-tiny", "--output_dir", folder], [folder]


@case("mine.txt", "did not write")
def make_tiny_overwrite_a_users_folder(w):
    folder = w.user_folder("ckpt")
    return ["make-tiny", "--output_dir", folder, "--overwrite"], [folder]


@case("mine.txt", "did not write")
def train_shapes_into_a_users_folder(w):
    """Refused before training starts (it used to delete the folder after 20 minutes of training)."""
    folder = w.user_folder("run")
    return ["train-shapes", "--output_dir", folder, "--steps", "1"], [folder]


# -- 3. unbounded resources ----------------------------------------------------------------------
@case("--threads", f"1 to {max_threads()}")
def threads_beyond_the_cores(w):
    return gen(w.onnx, "--threads", "100000"), []


@case("--image_size 1000000", "memory", "or smaller")
def a_huge_image_size(w):
    return gen(w.onnx, "--image", w.image(), "--image_size", "1000000"), []


@case("big.jpg resized to 4096x4096", "memory", "--image_size")
def an_8000_by_8000_image_at_native_size(w):
    from qwen3vl_lab.limits import available_memory, vision_call_bytes

    if (available_memory() or 0) > vision_call_bytes(4096, 4096, num_heads=2):
        pytest.skip("this machine has the memory for an 8000x8000 image: nothing to refuse")
    big = w.tmp / "big.jpg"
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(big, quality=50)
    return gen(w.onnx, "--image", big), [big]


# -- 4. input the tool must check ----------------------------------------------------------------
@case("--prompt", "UTF-8")
def a_prompt_that_is_not_utf8(w):
    return gen(w.onnx)[:-4] + ["--prompt", b"caf\xe9 ok".decode("utf-8", "surrogateescape")], []


@case("--prompts_file", "UTF-8")
def a_prompts_file_that_is_not_utf8(w):
    path = w.tmp / "prompts.txt"
    path.write_bytes(b"caf\xe9\nsecond\n")
    return ["generate", "--model_dir", w.onnx, "--prompts_file", path], [path]


@case("--prompts_file", "does not exist", "- reads standard input")
def a_missing_prompts_file(w):
    return ["generate", "--model_dir", w.onnx, "--prompts_file", w.tmp / "nope.txt"], []


@case("vocab_size", "config.json")
def a_checkpoint_config_without_vocab_size(w):
    hf = w.clone_hf(edit=lambda c: c["text_config"].pop("vocab_size"))
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


@case("config.json", "not valid JSON")
def a_checkpoint_config_that_is_not_json(w):
    hf = w.clone_hf()
    (hf / "config.json").write_text("{ not json")
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


@case("--report_dir", "is a file")
def doctor_report_dir_is_a_file(w):
    report = w.tmp / "report"
    report.write_text("mine")
    return ["doctor", "--model_dir", w.onnx, "--text_precision", "fp32", "--report_dir", report], [report]


@case("--out_dir", "is a file")
def sweep_out_dir_is_a_file(w):
    out = w.tmp / "variants"
    out.write_text("mine")
    return ["sweep", "--model_dir", w.onnx, "--out_dir", out], [out]


@case("hidden_size = 128", "qwen3vl-embedding.onnx", "re-run `qwen3vl-lab export`")
def genai_config_hidden_size_disagrees_with_the_graphs(w):
    def edit(c):
        c["text"]["hidden_size"] *= 2
    return gen(w.edit_genai(edit)), []


@case("num_hidden_layers = 5", "model.onnx has 4 layers")
def genai_config_layers_disagree_with_the_graphs(w):
    def edit(c):
        c["text"]["num_hidden_layers"] += 1
    return gen(w.edit_genai(edit)), []


@case("vocab_size", "logits")
def genai_config_vocab_disagrees_with_the_graphs(w):
    def edit(c):
        c["text"]["vocab_size"] += 7
    return gen(w.edit_genai(edit), "--fast"), []


@case("out_hidden_size", "qwen3vl-vision.onnx")
def genai_config_vision_width_disagrees_with_the_graph(w):
    def edit(c):
        c["vision"]["out_hidden_size"] *= 2
    return gen(w.edit_genai(edit), "--image", w.image()), []


# -- 4. permissions: real checks, as a user root's override does not apply to ----------------------
@case("--model_dir", "permission denied", as_user=True)
def an_unreadable_model_dir(w):
    model = w.clone_onnx()
    model.chmod(0)
    return gen(model), []


@case("cpu-fp32", "permission denied", as_user=True)
def an_unreadable_precision_folder(w):
    model = w.clone_onnx()
    (model / "cpu-fp32").chmod(0)
    return gen(model), []


@case("model.onnx.data", "permission denied", forbidden=("SystemError",), as_user=True)
def an_unreadable_onnx_data_file(w):
    model = w.clone_onnx(copy=("cpu-fp32/model.onnx.data",))
    (model / "cpu-fp32" / "model.onnx.data").chmod(0)
    return gen(model), []


@case("genai_config.json", "permission denied", as_user=True)
def an_unreadable_genai_config(w):
    model = w.clone_onnx(copy=("cpu-fp32/genai_config.json",))
    (model / "cpu-fp32" / "genai_config.json").chmod(0)
    return gen(model), []


@case("tokenizer_config.json", "Permission denied", as_user=True)
def an_unreadable_tokenizer_file(w):
    model = w.clone_onnx(copy=("cpu-fp32/tokenizer_config.json",))  # the tokenizer a precision folder carries
    (model / "cpu-fp32" / "tokenizer_config.json").chmod(0)
    return gen(model), []


@case("--image", "permission denied", as_user=True)
def an_unreadable_image(w):
    image = w.image()
    image.chmod(0)
    return gen(w.onnx, "--image", image), []


@case("--prompts_file", "permission denied", as_user=True)
def an_unreadable_prompts_file(w):
    path = w.tmp / "prompts.txt"
    path.write_text("Hello\n")
    path.chmod(0)
    return ["generate", "--model_dir", w.onnx, "--prompts_file", path], []


@case("config.json", "permission denied", as_user=True)
def an_unreadable_checkpoint_config(w):
    hf = w.clone_hf()
    (hf / "config.json").chmod(0)
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], []


@case("model.safetensors", "permission denied", as_user=True)
def unreadable_checkpoint_weights(w):
    hf = w.tmp / "hf"
    shutil.copytree(w.hf, hf)
    (hf / "model.safetensors").chmod(0)
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], []


@case("--output_dir", "not writable", as_user=True)
def export_into_a_read_only_folder(w):
    parent = w.tmp / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return ["export", "--hf_dir", w.hf, "--output_dir", parent / "out", "--quiet"], []


@case("--output_dir", "not writable", as_user=True)
def make_tiny_into_a_read_only_folder(w):
    parent = w.tmp / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return ["make-tiny", "--output_dir", parent / "ckpt"], []


@case("--report_dir", "not writable", as_user=True)
def doctor_report_into_a_read_only_folder(w):
    parent = w.tmp / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return ["doctor", "--model_dir", w.onnx, "--text_precision", "fp32", "--report_dir", parent / "r"], []


# -- 5. a config that contradicts its weights ----------------------------------------------------
@case("embed_tokens", "[151936, 64]", "config")
def config_hidden_size_twice_the_weights(w):
    hf = w.clone_hf(edit=lambda c: c["text_config"].update(hidden_size=2 * c["text_config"]["hidden_size"]))
    out = w.tmp / "out"
    return ["export", "--hf_dir", hf, "--output_dir", out, "--quiet"], [hf]


@case("num_attention_heads", "0")
def config_with_zero_attention_heads(w):
    hf = w.clone_hf(edit=lambda c: c["text_config"].update(num_attention_heads=0))
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


@case("mlp", "config")
def config_intermediate_size_wrong(w):
    hf = w.clone_hf(edit=lambda c: c["text_config"].update(intermediate_size=c["text_config"]["intermediate_size"] + 8))
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


@case("model.visual.blocks.3", "not a complete")
def config_with_a_vision_block_the_weights_lack(w):
    hf = w.clone_hf(edit=lambda c: c["vision_config"].update(depth=c["vision_config"]["depth"] + 1))
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


@case("num_key_value_heads", "multiple")
def config_heads_not_a_multiple_of_kv_heads(w):
    hf = w.clone_hf(edit=lambda c: c["text_config"].update(num_key_value_heads=3))
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


# -- 7. misleading messages ----------------------------------------------------------------------
@case("--model_dir", "is a file, not a folder", forbidden=("does not exist",))
def model_dir_is_a_file(w):
    return gen(w.onnx / "cpu-fp32" / "genai_config.json"), []


@case("--hf_dir", "is a file, not a folder")
def hf_dir_is_a_file(w):
    return ["export", "--hf_dir", w.hf / "config.json", "--output_dir", w.tmp / "out", "--quiet"], []


@case("/dev/zero", "not a regular file", forbidden=("folder",))
def image_is_a_device(w):
    return gen(w.onnx, "--image", "/dev/zero"), []


@case("--reference", "does not exist", forbidden=("--model_dir",))
def doctor_reference_missing(w):
    return ["doctor", "--model_dir", w.onnx, "--reference", w.tmp / "nope"], []


@case("model-fast.onnx", "without --fast", forbidden=("write_fast_decoder", "fast=True"))
def fast_without_the_fused_decoder(w):
    model = w.clone_onnx()
    (model / "cpu-fp32" / "model-fast.onnx").unlink()
    return gen(model, "--fast"), []


@case("<|image_pad|>", "placeholder", forbidden=("format_chat(",))
def an_image_pad_typed_into_the_prompt(w):
    return ["generate", "--model_dir", w.onnx, "--image", w.image(), "--prompt", "look <|image_pad|> here"], []


# -- issue 22: a hostile folder (classes 4, 5, 7) ---------------------------------------------------
def with_template(w, text: str) -> Path:
    """A private export whose precision folder carries `text` as its chat template (chat_template.jinja)."""
    model = w.clone_onnx(copy=("cpu-fp32/chat_template.jinja",))
    (model / "cpu-fp32" / "chat_template.jinja").write_text(text)
    return model


@case("chat template", "sandbox refuses", "__class__")
def a_template_the_sandbox_refuses(w):
    return gen(with_template(w, "{{ ().__class__.__base__.__subclasses__() }}")), []


@case("chat template", "refused this chat", "no tools here")
def a_template_that_raises(w):
    return gen(with_template(w, "{{ raise_exception('no tools here') }}")), []


@case("chat template", "not valid jinja", "line 1")
def a_template_with_a_syntax_error(w):
    return gen(with_template(w, "{% if %}")), []


@case("chat template", "not a string", "tokenizer_config.json")
def a_template_that_is_not_a_string(w):
    model = w.clone_onnx(copy=("cpu-fp32/tokenizer_config.json",))
    (model / "cpu-fp32" / "chat_template.jinja").unlink()
    path = model / "cpu-fp32" / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": 5}))
    return gen(model), []


@case("chat template", "did not finish rendering", "5 s")
def a_template_that_never_ends(w):
    return gen(with_template(w, "{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}"
                                "{% endfor %}{% endfor %}{% endfor %}")), []


@case("chat template", "more than 2 GB")
def a_template_that_asks_for_10_gb(w):
    return gen(with_template(w, "{% set n = 99999 %}{{ ('x' * n) * n }}")), []


@case("qwen3vl_lab.json", "eos token id", "1000000000000000000000000000000")
def an_eos_id_of_10_to_the_30(w):
    return gen(w.edit_genai(lambda c: c.update(eos_token_ids=[10**30]))), []


@case("qwen3vl_lab.json", "eos token id", "'x'")
def an_eos_id_that_is_a_string(w):
    return gen(w.edit_genai(lambda c: c.update(eos_token_ids=["x"]))), []


@case("qwen3vl_lab.json", "max_position_embeddings is 0", forbidden=("prompt",))
def a_context_length_of_zero(w):
    return gen(w.edit_genai(lambda c: c["text"].update(max_position_embeddings=0))), []


@case("qwen3vl_lab.json", "max_position_embeddings is -5", forbidden=("prompt",))
def a_negative_context_length(w):
    return gen(w.edit_genai(lambda c: c["text"].update(max_position_embeddings=-5))), []


@case("qwen3vl_lab.json", "nested deeper than")
def our_config_200000_deep(w):
    model = w.clone_onnx(copy=("cpu-fp32/qwen3vl_lab.json",))
    (model / "cpu-fp32" / "qwen3vl_lab.json").write_text("[" * 200_000 + "]" * 200_000)
    return gen(model), []


@case("genai_config.json", "nested deeper than")
def genai_config_200000_deep(w):
    model = w.clone_onnx(copy=("cpu-fp32/genai_config.json",))
    (model / "cpu-fp32" / "genai_config.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    return gen(model), []


@case("config.json", "nested deeper than")
def a_checkpoint_config_200000_deep(w):
    """The same reader as the guide's pytorch/config.json (load_hf_config)."""
    hf = w.clone_hf()
    (hf / "config.json").write_text('{"text_config": ' * 200_000 + "{}" + "}" * 200_000)
    return ["export", "--hf_dir", hf, "--output_dir", w.tmp / "out", "--quiet"], [hf]


@case("--output_dir", "--hf_dir", "overlap")
def guide_export_into_the_checkpoint_it_reads(w):
    hf = w.clone_hf()
    return ["make-guide-export", "--hf_dir", hf, "--output_dir", hf / "guide"], [hf]


@case("--n", "100,000")
def eval_shapes_with_a_20_digit_count(w):
    return ["eval-shapes", "--model_dir", w.onnx, "--n", "99999999999999999999"], []


@case("--n_steps", "1024")
def sweep_with_a_20_digit_step_count(w):
    return ["sweep", "--model_dir", w.onnx, "--n_steps", "99999999999999999999", "--out_dir", w.tmp / "v"], []


@case("cpu-fp32", "symbolic link", forbidden=("is a file",))
def export_where_cpu_fp32_is_a_symlink(w):
    target = w.user_folder("elsewhere")
    out = w.tmp / "out"
    out.mkdir()
    (out / "cpu-fp32").symlink_to(target, target_is_directory=True)
    return ["export", "--hf_dir", w.hf, "--output_dir", out, "--quiet"], [target]


# -- running the table ---------------------------------------------------------------------------
def tree_hash(path: Path) -> str:
    """Names and contents of every file below `path` (or of `path` itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(root: Path) -> list[Path]:
    """Hidden staging folders or temporary files left anywhere below `root`."""
    return [p for p in root.rglob(".*") if p.name.startswith((".export-", ".fp32-source")) or ".tmp-" in p.name
            or ".old-" in p.name]


@pytest.fixture
def world(tiny_dir, tiny_onnx_fp32_dir, tmp_path) -> World:
    return World(tiny_dir, tiny_onnx_fp32_dir, tmp_path)


IN_PROCESS = sorted(k for k, c in CASES.items() if not c.as_user)
AS_USER = sorted(k for k, c in CASES.items() if c.as_user)


def check(name: str, code, err: str, protected: dict[Path, str], tmp: Path) -> None:
    c = CASES[name]
    assert_one_line_error(code, err, *c.needles)
    for word in c.forbidden:
        assert word not in err, err
    for path, before in protected.items():
        assert tree_hash(path) == before, f"{path} changed"
    assert not leftovers(tmp), leftovers(tmp)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_bad_input_in_process(name, world, capsys):
    argv, protected = CASES[name].build(world)
    before = {p: tree_hash(p) for p in protected}
    code, _, err = run_cli(capsys, *argv)
    check(name, code, err, before, world.tmp)


CHILD = r"""
import contextlib, io, json, sys, traceback
from qwen3vl_lab.apps.cli import main
probe = sys.argv[1]
try:
    open(probe).read()
    print(json.dumps({"override": True}))
    sys.exit(0)
except PermissionError:
    pass
results = {}
for name, argv in json.loads(sys.stdin.read()).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = None
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def _without_permission_override() -> list[str] | None:
    """The command prefix that runs a child without root's permission override; [] when not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.fixture(scope="module")
def as_user_results(tiny_dir, tiny_onnx_fp32_dir, tmp_path_factory):
    """Every permission case, built as root, run in ONE child process that file modes apply to."""
    prefix = _without_permission_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: file permissions cannot be checked for real")
    base = tmp_path_factory.mktemp("as-user")
    base.chmod(0o755)
    probe = base / "probe"
    probe.write_text("x")
    probe.chmod(0)
    argvs, protected, worlds = {}, {}, {}
    for name in AS_USER:
        w = World(tiny_dir, tiny_onnx_fp32_dir, base / name)
        w.tmp.mkdir()
        argv, keep = CASES[name].build(w)
        argvs[name] = [str(a) for a in argv]
        protected[name] = {p: tree_hash(p) for p in keep}
        worlds[name] = w
    done = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(probe)], input=json.dumps(argvs),
                          capture_output=True, text=True, timeout=300)
    for p in base.rglob("*"):  # let pytest clean up
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if results.get("override"):
        pytest.skip("the child still reads a mode-000 file: cannot drop the permission override here")
    return results, protected, worlds


@pytest.mark.parametrize("name", AS_USER)
def test_bad_input_without_permission(name, as_user_results):
    results, protected, worlds = as_user_results
    code, err = results[name]
    check(name, code, err, protected[name], worlds[name].tmp)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40, len(CASES)


# -- faults that need a real process, a real signal or a real disk -------------------------------
def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "qwen3vl_lab", *[str(a) for a in argv]]


@pytest.mark.parametrize("signum, users_folder", [(signal.SIGTERM, False), (signal.SIGHUP, True)])
def test_a_kill_during_export_removes_the_staging_folder(tiny_dir, tmp_path, signum, users_folder):
    """SIGTERM (a plain `kill`) / SIGHUP mid-export: the hidden staging folder goes; a folder the export
    created goes too, a folder of the user's stays with their file in it."""
    out = tmp_path / "out"
    if users_folder:
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    proc = subprocess.Popen(cli("export", "--hf_dir", tiny_dir, "--output_dir", out, "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(tmp_path.glob("out/.export-*")) and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    if users_folder:
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
    else:
        assert not out.exists()


class _Reader:
    """Collects a pipe's bytes in a thread, so a test can wait for output without blocking on it."""

    def __init__(self, pipe):
        self.data = b""
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        while chunk := pipe.read1(4096):
            self.data += chunk

    def wait_for_more(self, than: int, timeout: float = 60) -> None:
        t0 = time.monotonic()
        while len(self.data) <= than and time.monotonic() - t0 < timeout:
            time.sleep(0.01)


def test_ctrl_c_during_the_first_answer_then_another_message(tiny_onnx_fp32_dir):
    """Ctrl-C while the first answer streams stops it; the next message is answered (and stopped the same
    way); no crash, no traceback. An undecodable line in between is one error line, and the chat goes on."""
    proc = subprocess.Popen(cli("generate", "--model_dir", tiny_onnx_fp32_dir, "--interactive", "--temperature", "0",
                                "--max_new_tokens", "3000"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert b"Type a message" in proc.stderr.readline()
    out = _Reader(proc.stdout)
    for message in (b"tell me a very long story\n", b"\xff\xfe\n", b"and another one\n"):
        before = len(out.data)
        proc.stdin.write(message)
        proc.stdin.flush()
        if message.startswith(b"\xff"):
            time.sleep(0.5)
            continue
        out.wait_for_more(than=before + len(b"> ") + 2)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    proc.stdin.write(b"quit\n")
    proc.stdin.flush()
    _, err = proc.communicate(timeout=120)
    out.thread.join(timeout=10)
    err = err.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert out.data.decode("utf-8", "replace").count("[stopped]") == 2, out.data[-300:]
    assert "Traceback" not in err and "not valid UTF-8" in err


def test_stdout_closed_early_exits_quietly(tiny_onnx_fp32_dir, monkeypatch, capsys):
    """`... | head -c 1`: the reader closes the pipe; no traceback and no error line (exit 141, as a process
    killed by SIGPIPE). A real pipe whose read end is closed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        code, _, err = run_cli(capsys, *gen(tiny_onnx_fp32_dir, "--temperature", "0"))
    assert code == 141 and err == "", err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_stdout_on_a_full_disk(tiny_onnx_fp32_dir, json_flag, monkeypatch, capsys):
    """`... > /dev/full`: one line naming standard output and the full disk."""
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        code, _, err = run_cli(capsys, *gen(tiny_onnx_fp32_dir, *json_flag))
        monkeypatch.undo()  # before the file closes: its last flush fails too
        try:
            full.close()
        except OSError:
            pass
    assert_one_line_error(code, err, "standard output", "No space left")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a real tmpfs of that size (root only; skipped where mount is not allowed)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]}): a full disk cannot be made")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_export_to_a_disk_without_room_is_refused_up_front(tiny_dir, small_disk, capsys):
    disk = small_disk("1m")
    code, _, err = run_cli(capsys, "export", "--hf_dir", tiny_dir, "--output_dir", disk / "out", "--quiet")
    assert_one_line_error(code, err, "--output_dir", "1.0 MB free", "needed")
    assert list(disk.iterdir()) == []


def test_a_disk_that_fills_up_during_the_export(tiny_dir, small_disk, capsys):
    """fp32 fits (checked up front), the INT4 folder does not: one line, the staging folder removed."""
    disk = small_disk("84m")
    code, _, err = run_cli(capsys, "export", "--hf_dir", tiny_dir, "--output_dir", disk / "out",
                           "--precision", "fp32", "int4", "--quiet")
    assert_one_line_error(code, err, "--output_dir", "is full", "free", "needed", "free some space")
    assert "writable" not in err
    assert list(disk.iterdir()) == []


def test_a_disk_that_fills_up_while_writing_a_checkpoint(small_disk, capsys):
    disk = small_disk("1m")
    code, _, err = run_cli(capsys, "make-tiny", "--output_dir", disk / "ckpt")
    assert_one_line_error(code, err, "--output_dir", "ckpt", "is full", "needed")
    assert list(disk.iterdir()) == []


# -- what is not an error, but must not be silent or missing ---------------------------------------
def test_nan_weights_export_with_a_warning_naming_the_tensor(tiny_dir, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_dir, hf)
    ckpt = Checkpoint.open(tiny_dir)
    bad = "model.language_model.layers.1.mlp.up_proj.weight"

    def make(name):
        w = ckpt.get(name)
        if name == bad:
            w[3, 5] = np.nan
        return w

    save_checkpoint_weights(hf, {n: LazyTensor(ckpt.shape(n), lambda n=n: make(n)) for n in ckpt.names()})
    code, _, err = run_cli(capsys, "export", "--hf_dir", hf, "--output_dir", tmp_path / "out", "--quiet")
    assert code == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and bad in warnings[0] and "NaN" in warnings[0], err


def test_prompts_file_dash_reads_standard_input(tiny_onnx_fp32_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"first\nsecond\n")))
    code, out, err = run_cli(capsys, "generate", "--model_dir", tiny_onnx_fp32_dir, "--prompts_file", "-",
                             "--max_new_tokens", "2", "--temperature", "0", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["first", "second"]


def test_export_replaces_its_own_earlier_export(tiny_dir, world, capsys):
    """The refusal is not a blanket one: an export over an earlier (stamped) export goes through."""
    out = world.clone_onnx("out")
    code, _, err = run_cli(capsys, "export", "--hf_dir", tiny_dir, "--output_dir", out, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cpu-fp32", "pytorch"] and not leftovers(world.tmp)


# -- the Python API: errors name the argument -----------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_onnx_fp32_dir):
    from qwen3vl_lab import Qwen3VLPipeline

    return Qwen3VLPipeline(tiny_onnx_fp32_dir)


API_CASES = {
    "model_dir-int": (lambda p, d: _new_pipe(3), ["model_dir", "int"]),
    "model_dir-none": (lambda p, d: _new_pipe(None), ["model_dir", "NoneType"]),
    "text_precision": (lambda p, d: _new_pipe(d, "fp8"), ["text_precision", "fp8"]),
    "threads": (lambda p, d: _runtime(threads=10**5), ["threads", "cores"]),
    "max_new_tokens-float": (lambda p, d: p.generate("Hi", max_new_tokens=2.5), ["max_new_tokens", "2.5"]),
    "max_new_tokens-batch": (lambda p, d: p.generate(["Hi"], max_new_tokens=2.5), ["max_new_tokens"]),
    "batch_size-float": (lambda p, d: p.generate(["Hi"], batch_size=1.5), ["batch_size"]),
    "sampler-outside-vocab": (lambda p, d: p.generate("Hi", max_new_tokens=2, sampler=lambda lg, prev: np.array([10**7])),
                              ["custom sampler", "10000000", "vocabulary"]),
    "sampler-negative": (lambda p, d: p.generate("Hi", max_new_tokens=2, sampler=lambda lg, prev: np.array([-1])),
                         ["custom sampler", "-1"]),
    "prompt-bytes": (lambda p, d: p.generate(b"Hi", max_new_tokens=2), ["prompt", "bytes"]),
    "prompt-surrogates": (lambda p, d: p.generate("caf\udce9", max_new_tokens=2), ["prompt", "UTF-8"]),
    "image_size-huge": (lambda p, d: p.generate("Hi", images=[np.zeros((64, 64, 3), np.uint8)], image_size=10**6),
                        ["image_size", "memory"]),
}


def _new_pipe(*args):
    from qwen3vl_lab import Qwen3VLPipeline

    return Qwen3VLPipeline(*args)


def _runtime(**kwargs):
    from qwen3vl_lab.model import RuntimeOptions

    return RuntimeOptions(**kwargs)


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_python_api_errors_name_the_argument(name, pipe, tiny_onnx_fp32_dir):
    call, needles = API_CASES[name]
    with pytest.raises(UserError) as e:
        call(pipe, tiny_onnx_fp32_dir)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message


# -- issue 22: settings, identities and limits that need more than one command line ------------------
@pytest.mark.parametrize("setting", ["/dev/null", "a-file", "a-file/below"])
def test_a_cache_setting_that_is_not_a_folder_is_one_line_naming_it(setting, tiny_onnx_fp32_dir, tmp_path, monkeypatch,
                                                                     capsys):
    (tmp_path / "a-file").write_text("the user's own notes\n")
    value = setting if setting.startswith("/") else str(tmp_path / setting)
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", value)
    before = tree_hash(tmp_path / "a-file")
    code, _, err = run_cli(capsys, "sweep", "--model_dir", tiny_onnx_fp32_dir, "--out_dir", tmp_path / "v",
                           "--recipes", "default-b32-sym-acc4-head_int4", "--quiet")
    assert_one_line_error(code, err, "QWEN3VL_LAB_CACHE", value)
    assert tree_hash(tmp_path / "a-file") == before


@pytest.mark.parametrize("kind", ["decoder", "file", "missing"])
def test_model_dir_in_a_notebook_is_checked_like_every_export_path(kind, tiny_onnx_fp32_dir, tmp_path, monkeypatch):
    """Notebook 07 says MODEL_DIR may be a decoder .onnx: every helper it calls accepts one; a file of another
    kind is called a file, not missing."""
    from qwen3vl_lab.apps import notebook

    path = {"decoder": tiny_onnx_fp32_dir / "cpu-fp32" / "model.onnx",
            "file": tiny_onnx_fp32_dir / "cpu-fp32" / "genai_config.json", "missing": tmp_path / "nope"}[kind]
    monkeypatch.setenv("MODEL_DIR", str(path))
    if kind == "decoder":
        assert notebook.doctor_dir() == path and notebook.model_dir() == path and not notebook.is_shapes()
        return
    with pytest.raises(UserError) as e:
        notebook.is_shapes()
    assert "MODEL_DIR" in str(e.value) and ("is a file" if kind == "file" else "does not exist") in str(e.value)


def test_a_precision_export_does_not_write_is_not_suggested(tiny_onnx_fp32_dir):
    from qwen3vl_lab.model import load_model

    with pytest.raises(UserError) as e:
        load_model(tiny_onnx_fp32_dir, "int8")
    assert "--precision int8" not in str(e.value) and "fp32 and int4 only" in str(e.value)


def test_two_models_of_other_dimensions_are_named_before_onnxruntime_sees_them(tiny_dir, tiny_deep_dir):
    from qwen3vl_lab.config import load_hf_config
    from qwen3vl_lab.debug.identity import check_same_dims

    check_same_dims(load_hf_config(tiny_dir), load_hf_config(tiny_dir), "a", "b")  # the same model: nothing to say
    with pytest.raises(UserError) as e:
        check_same_dims(load_hf_config(tiny_dir), load_hf_config(tiny_deep_dir), "--reference B", "--model_dir A")
    assert "not the same model" in str(e.value) and "num_hidden_layers" in str(e.value)


def test_a_checkpoint_of_another_model_of_the_same_shape_is_not_blamed_on_quantization(tiny_dir, tiny_onnx_dir,
                                                                                       tmp_path):
    """The INT4 export of the tiny model (seed 0) against its own checkpoint: the same model; against the checkpoint
    of another tiny model (seed 1, the same dimensions) or that model's export: another model, said so."""
    from qwen3vl_lab.debug.identity import checkpoint_table, embedding_table, not_the_same_model
    from qwen3vl_lab.export.exporter import export
    from qwen3vl_lab.export.tiny import make_tiny
    from qwen3vl_lab.layouts import find_layout

    other = make_tiny(tmp_path / "seed1", seed=1)
    tested = embedding_table(find_layout(tiny_onnx_dir, "int4"))
    assert not_the_same_model(tested, checkpoint_table(tiny_dir), "--hf_dir A") is None
    assert not_the_same_model(tested, embedding_table(find_layout(tiny_onnx_dir, "fp32")), "its fp32") is None
    sentence = not_the_same_model(tested, checkpoint_table(other), "--hf_dir B")
    assert sentence is not None and sentence.startswith("--hf_dir B is not the model that was tested")
    export(other, tmp_path / "seed1-onnx", progress=False, log=lambda _: None)
    assert not_the_same_model(tested, embedding_table(find_layout(tmp_path / "seed1-onnx", "fp32")), "B") is not None


def test_the_image_size_the_fit_check_recommends_under_ulimit_v_is_checked_again_not_a_traceback(
        tiny_onnx_fp32_dir, tmp_path):
    """Under `ulimit -v` the check reads the process limit (RLIMIT_AS), not only MemAvailable: the one line says
    so and names a size; that size then runs, or is one line again (never a traceback, never the OOM killer)."""
    import re
    import resource

    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000), (200, 30, 30)).save(big)
    limit = 4 * 2**30

    def run(*flags):
        return subprocess.run(cli(*gen(tiny_onnx_fp32_dir, "--image", big, *flags)), capture_output=True, text=True,
                              timeout=600, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))

    first = run()
    assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr[-2000:]
    assert "ulimit -v" in first.stderr and len(first.stderr.strip().splitlines()) == 1, first.stderr
    side = re.search(r"--image_size (\d+)", first.stderr).group(1)
    second = run("--image_size", side)
    assert second.returncode in (0, 2) and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert second.returncode == 0 or len(second.stderr.strip().splitlines()) == 1, second.stderr
