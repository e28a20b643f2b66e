"""`qwen3vl-lab bench --kernels`: what one MatMulNBits node does per second at each bits / block size.

    qwen3vl-lab bench --model_dir OUT --kernels --spinning off

A decode step is mostly MatMulNBits (`bench --profile`), so its speed is this kernel's. One node of the model's
width (K = hidden_size, N = 24 x K, M = 1, random weights: the speed does not depend on the values) is built
for each (bits, block) with accuracy_level 4, all open at once, and timed in rounds that rotate their order.
A kernel that streamed its packed weights at the machine's bandwidth would be as fast as the bandwidth
probe; one that is slower is computing, not waiting for memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..hugepages import huge_pages
from ..model import RuntimeOptions

CASES = ((4, 32), (4, 64), (4, 128), (8, 32), (8, 128))  # (bits, block size)
WIDTH = 24  # N = WIDTH x K: ~100 M weights at K = 2048, far larger than the caches


@dataclass(frozen=True)
class KernelTime:
    bits: int
    block: int
    seconds: float  # median over the rounds
    weight_bytes: int  # packed weights + scales
    weights: int  # K x N

    def as_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block, "ms": 1e3 * self.seconds,
                "gb_s": self.weight_bytes / self.seconds / 1e9, "gweights_s": self.weights / self.seconds / 1e9}


def matmulnbits_model(k: int, n: int, bits: int, block: int, seed: int = 0) -> tuple[bytes, int]:
    """A graph of one MatMulNBits (1 x k) @ (k x n), random packed weights and scales -> (bytes, weight bytes)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (0.001 + 0.01 * rng.random(n * blocks, dtype=np.float32)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "W", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "matmulnbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), packed.nbytes + scales.nbytes


def kernel_times(k: int, options: RuntimeOptions, rounds: int = 60) -> list[KernelTime]:
    """Median time of one call of each case, all sessions open, rounds rotating the order (ABC.. BC..A ..)."""
    n = WIDTH * k
    x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    sessions, sizes = [], []
    for bits, block in CASES:
        model, nbytes = matmulnbits_model(k, n, bits, block)
        with huge_pages(options.huge_pages):
            sessions.append(ort.InferenceSession(model, options.session_options(), providers=["CPUExecutionProvider"]))
        sizes.append(nbytes)
        for _ in range(3):  # warm: the first calls allocate
            sessions[-1].run(None, {"x": x})
    seconds: list[list[float]] = [[] for _ in CASES]
    for r in range(rounds):
        for i in [*range(r % len(CASES), len(CASES)), *range(r % len(CASES))]:
            t0 = time.perf_counter()
            sessions[i].run(None, {"x": x})
            seconds[i].append(time.perf_counter() - t0)
    return [KernelTime(bits, block, float(np.median(s)), nbytes, k * n)
            for (bits, block), s, nbytes in zip(CASES, seconds, sizes)]
