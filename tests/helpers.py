"""Small helpers shared by the test files (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import weakref
from pathlib import Path

import onnx
import onnxruntime as ort

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


def hf_hidden_states(hf, input_ids) -> tuple[list, object]:
    """transformers' forward with output_hidden_states on (1, S) ids -> (hidden states of batch row 0: the
    embeddings, then after each layer, the last one normed; logits of row 0), as numpy. rope_deltas are
    cleared before and after (the model caches them between calls)."""
    import torch

    hf.model.rope_deltas = None
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(input_ids), output_hidden_states=True)
    finally:
        hf.model.rope_deltas = None
    return [h[0].numpy() for h in out.hidden_states], out.logits[0].numpy()


def print_max_diffs(max_diffs: dict[str, float], width: int = 34) -> None:
    """Print the measured maxima (visible with pytest -s)."""
    for k, v in sorted(max_diffs.items()):
        print(f"\n{k:{width}s} max |logit diff| {v:.2e}", end="")


class DecoderSessions:
    """Which decoders' weights are in memory together: every onnxruntime session opened while this is active
    (`with DecoderSessions() as s:`), counted as a decoder when it returns `logits`, labelled by the file its
    weights live in (the graph's external-data file: an edited in-memory copy of a graph is labelled like
    the graph), and dropped when the session object is freed. `overlaps` lists each moment a decoder opened
    while a decoder with weights from another file was still alive."""

    def __init__(self):
        self.alive: dict[int, Path] = {}
        self.opened: list[Path] = []
        self.overlaps: list[tuple[Path, list[Path]]] = []

    def __enter__(self):
        tracker, real = self, ort.InferenceSession
        self._real = real

        class Tracked(real):
            def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
                super().__init__(path_or_bytes, sess_options, *args, **kwargs)
                if "logits" in {o.name for o in self.get_outputs()}:
                    tracker._opened(self, path_or_bytes, sess_options)

        ort.InferenceSession = Tracked
        return self

    def __exit__(self, *exc):
        ort.InferenceSession = self._real

    @staticmethod
    def weights_file(source, options) -> Path:
        if isinstance(source, (str, Path)):
            folder, graph = Path(source).resolve().parent, onnx.load(str(source), load_external_data=False)
        else:
            try:
                folder = options.get_session_config_entry("session.model_external_initializers_file_folder_path")
            except Exception:  # onnxruntime raises when the entry was never set: weights inside the bytes
                folder = "<in memory>"
            folder, graph = Path(folder).resolve(), onnx.load_from_string(source)
        locations = sorted({e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"})
        return folder / (locations[0] if locations else "<inside the graph>")

    def _opened(self, session, source, options) -> None:
        file = self.weights_file(source, options)
        others = sorted({f for f in self.alive.values() if f != file})
        if others:
            self.overlaps.append((file, others))
        key = id(session)
        self.alive[key] = file
        self.opened.append(file)
        weakref.finalize(session, self.alive.pop, key, None)
