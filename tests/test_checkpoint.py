"""qwen3vl_lab.export.checkpoint: torch-free safetensors reading and writing, checked against safetensors/torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.checkpoint import (
    INDEX_NAME,
    SAFETENSORS_NAME,
    Checkpoint,
    LazyTensor,
    float32_to_bfloat16_bits,
    plan_shards,
    read_safetensors_header,
    save_checkpoint_weights,
    save_safetensors,
)

DTYPES = ["float32", "bfloat16", "float16"]


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A mix of shapes, including a scalar, an empty tensor and values that stress rounding."""
    rng = np.random.default_rng(seed)
    edge = np.array([0.0, -0.0, 1.0, -2.5, 1e-40, 3.0e38, -3.0e38, np.inf, -np.inf, 65504.0, 7e4], np.float32)
    # float32 bit patterns exactly halfway between two bf16 values: ties go to even.
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF], np.uint32).view(np.float32)
    return {
        "a.weight": rng.standard_normal((7, 5), dtype=np.float32),
        "b.bias": rng.standard_normal(3, dtype=np.float32) * 1e-3,
        "conv": rng.standard_normal((2, 3, 2, 4, 4), dtype=np.float32),
        "edge": np.concatenate([edge, ties]),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def _torch_reference(x: np.ndarray, dtype: str) -> np.ndarray:
    """What torch stores for `x` in `dtype`, back as float32."""
    import torch

    return torch.from_numpy(x.copy()).to(getattr(torch, dtype)).float().numpy()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal (so -0.0 != 0.0), with NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    keep = ~np.isnan(a)
    return np.array_equal(a[keep].view(np.uint32), b[keep].view(np.uint32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_matches_torch_rounding(tmp_path, dtype):
    tensors = _tensors()
    path = save_safetensors(tmp_path / "x.safetensors", tensors, dtype)
    ckpt = Checkpoint.open(path)
    assert ckpt.names() == sorted(tensors)
    st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    for name, x in tensors.items():
        assert ckpt.shape(name) == x.shape and ckpt.dtype(name) == st
        got = ckpt.get(name)
        assert got.dtype == np.float32 and type(got) is np.ndarray
        assert _same(got, _torch_reference(x, dtype)), name
    assert not [p for p in tmp_path.iterdir() if p.name != "x.safetensors"], "temporary file left behind"


@pytest.mark.parametrize("dtype", DTYPES)
def test_our_files_load_in_safetensors_torch(tmp_path, dtype):
    import torch
    from safetensors.torch import load_file

    tensors = _tensors(1)
    save_safetensors(tmp_path / "x.safetensors", tensors, dtype)
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, x in tensors.items():
        assert loaded[name].dtype == getattr(torch, dtype)
        assert _same(loaded[name].float().numpy(), _torch_reference(x, dtype)), name
    with open(tmp_path / "x.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert n % 8 == 0 and json.loads(f.read(n))["__metadata__"] == {"format": "pt"}


def test_torch_written_files_read_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, 3, 2, generator=g).to(torch.float16),
        "f32": torch.randn(5, generator=g),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "bf16_scalar": torch.tensor(-3.25, dtype=torch.bfloat16),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    ckpt = Checkpoint.open(tmp_path / "t.safetensors")
    assert ckpt.metadata == {"format": "pt"}
    assert ckpt.dtype("bf16") == "BF16" and ckpt.dtype("f16") == "F16" and ckpt.dtype("f64") == "F64"
    for name, t in tensors.items():
        np.testing.assert_array_equal(ckpt.get(name), t.float().numpy(), err_msg=name)


def test_bf16_bits_match_torch_on_many_values():
    import torch

    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * np.float32(10.0) ** np.arange(
        -30, 30, 0.0006, dtype=np.float32
    )[:100_000]
    ours = float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_lazy_tensors_are_made_while_writing(tmp_path):
    made = []

    def maker(name, shape):
        def make():
            made.append(name)
            return np.full(shape, len(made), np.float32)

        return LazyTensor(shape, make)

    tensors = {"x": maker("x", (2, 3)), "y": maker("y", (4,))}
    assert made == []
    save_safetensors(tmp_path / "lazy.safetensors", tensors)
    assert made == ["x", "y"]
    ckpt = Checkpoint.open(tmp_path / "lazy.safetensors")
    np.testing.assert_array_equal(ckpt.get("y"), np.full(4, 2, np.float32))


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(3, np.float32)})

    def boom():
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        save_safetensors(path, {"a": np.zeros(3, np.float32), "b": LazyTensor((2,), boom)})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    np.testing.assert_array_equal(Checkpoint.open(path).get("a"), np.ones(3, np.float32))


# ------------------------------------------------------------------------------------------
# sharded checkpoints
# ------------------------------------------------------------------------------------------

def _layered(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {f"model.layers.{i}.w": rng.standard_normal((16, 16 + i), dtype=np.float32) for i in range(n)}


def test_sharded_write_and_read(tmp_path):
    tensors = _layered()
    files = save_checkpoint_weights(tmp_path, tensors, "bfloat16", max_shard_bytes=1200)
    names = sorted(p.name for p in tmp_path.iterdir())
    n = len(files) - 1
    assert n > 1 and names == sorted([f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + [INDEX_NAME])
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"] == {
        "total_parameters": sum(x.size for x in tensors.values()),
        "total_size": 2 * sum(x.size for x in tensors.values()),
    }
    assert list(index["weight_map"]) == sorted(tensors)
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.names() == sorted(tensors) and len(ckpt.files()) == n
    for name, x in tensors.items():
        assert _same(ckpt.get(name), _torch_reference(x, "bfloat16"))


def test_sharded_load_in_transformers_style(tmp_path):
    """The index and shards are what huggingface_hub's splitter (used by save_pretrained) produces."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = _layered(5)
    tensors["model.big"] = np.zeros((40, 40), np.float32)  # larger than a shard: gets a shard of its own
    tensors["model.z"] = np.ones((3,), np.float32)
    limit = 3000
    save_checkpoint_weights(tmp_path, tensors, "float32", max_shard_bytes=limit)
    split = split_torch_state_dict_into_shards(
        {k: torch.from_numpy(v) for k, v in tensors.items()},
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=limit,
    )
    ours = json.loads((tmp_path / INDEX_NAME).read_text())
    assert ours["weight_map"] == split.tensor_to_filename
    assert ours["metadata"]["total_size"] == split.metadata["total_size"]
    assert plan_shards([("a", 5), ("b", 20), ("c", 5)], 10) == [["b"], ["a", "c"]]


def test_single_file_when_it_fits_and_stale_shards_are_removed(tmp_path):
    tensors = _layered(3)
    save_checkpoint_weights(tmp_path, tensors, "float32", max_shard_bytes=1500)
    assert (tmp_path / INDEX_NAME).exists()
    (tmp_path / "config.json").write_text("{}")
    save_checkpoint_weights(tmp_path, tensors, "float32", max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SAFETENSORS_NAME]
    assert Checkpoint.open(tmp_path).names() == sorted(tensors)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def _message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(UserError) as e:
        Checkpoint.open(tmp_path / "nope")
    assert "does not exist" in _message(e)
    with pytest.raises(UserError) as e:
        Checkpoint.open(tmp_path)
    assert SAFETENSORS_NAME in _message(e) and INDEX_NAME in _message(e)


def test_missing_shard_and_bad_index(tmp_path):
    files = save_checkpoint_weights(tmp_path, _layered(), "float32", max_shard_bytes=2000)
    files[1].unlink()
    with pytest.raises(UserError) as e:
        Checkpoint.open(tmp_path)
    assert f"{files[1].name} is missing" in _message(e)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(UserError) as e:
        Checkpoint.open(tmp_path)
    assert INDEX_NAME in _message(e)


def test_index_naming_an_absent_tensor(tmp_path):
    files = save_checkpoint_weights(tmp_path, _layered(), "float32", max_shard_bytes=2000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = files[0].name
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(UserError) as e:
        Checkpoint.open(tmp_path)
    assert "'ghost'" in _message(e)


@pytest.mark.parametrize(
    "corrupt, why",
    [
        (lambda b: b[:5], "shorter than"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "does not fit"),
        (lambda b: b[:8] + b"[" + b[9:], "not JSON"),
        (lambda b: b[:-4], "outside"),
    ],
)
def test_corrupt_files(tmp_path, corrupt, why):
    path = save_safetensors(tmp_path / SAFETENSORS_NAME, {"a": np.ones((4, 4), np.float32)})
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(UserError) as e:
        Checkpoint.open(tmp_path)
    msg = _message(e)
    assert why in msg and str(path) in msg and "re-download" in msg


def test_missing_tensor_and_bad_arguments(tmp_path):
    path = save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(2, np.float32)})
    ckpt = Checkpoint.open(path)
    assert "a" in ckpt and "b" not in ckpt
    with pytest.raises(UserError) as e:
        ckpt.get("b")
    assert "'b' is not in checkpoint" in _message(e)
    with pytest.raises(UserError) as e:
        save_safetensors(tmp_path / "y.safetensors", {"a": np.ones(2)}, dtype="int8")
    assert "bfloat16" in _message(e)
    with pytest.raises(UserError):
        save_safetensors(tmp_path / "y.safetensors", {"a": np.ones(2)}, metadata={"format": 1})
    with pytest.raises(UserError):
        save_safetensors(tmp_path / "no_such_dir" / "y.safetensors", {"a": np.ones(2)})
    header, _ = read_safetensors_header(path)
    assert header["a"].shape == (2,) and header["a"].nbytes == 8
