"""A small helper over `onnx.helper` for writing graphs by hand, with weights streamed to disk.

Every graph in `qwen3vl_lab.export` is written with this class: one `op()` call per ONNX node, so
a reader sees the model's math line by line. Weights go straight into the external-data file as
they are added (`weight()`), so exporting a model holds about one tensor in memory at a time,
not the whole checkpoint — a 4B checkpoint exports on a 24 GB machine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18  # ai.onnx opset: Reduce* take axes as an input, Split takes num_outputs
MS_DOMAIN = "com.microsoft"
ALIGN = 4096  # external tensors start on a page boundary, so onnxruntime can mmap them
INLINE_LIMIT = 1024  # bytes: smaller tensors stay inside the .onnx file

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers; writes large weights to `data_file` at once.

    >>> g = GraphBuilder("toy")
    >>> x = g.input("x", FLOAT, ["batch", 4])
    >>> y = g.op("MatMul", [x, g.weight("w", np.ones((4, 2), np.float32))], out="y")
    >>> g.output(y, FLOAT, ["batch", 2])
    """

    def __init__(self, name: str, data_path: str | Path | None = None, opset: int = OPSET):
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self._scope: list[str] = []
        self.data_path = Path(data_path) if data_path is not None else None
        self._data: BinaryIO | None = None
        self.uses_ms_domain = False

    # -- naming -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix node and tensor names, e.g. `/model/layers.3/attn/MatMul_1`."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _fresh(self, base: str) -> str:
        prefix = "/" + "/".join(self._scope) if self._scope else ""
        name = f"{prefix}/{base}"
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        return name if n == 0 else f"{name}_{n}"

    # -- graph interface ----------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def optional_input(self, name: str, default: np.ndarray, shape: Sequence[int | str | None]) -> str:
        """An input that may be omitted at run time: it is also an initializer holding `default`."""
        default = np.asarray(default)
        self.input(name, helper.np_dtype_to_tensor_dtype(default.dtype), shape)
        self.initializers.append(numpy_helper.from_array(default, name))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        out: str | Sequence[str] | None = None,
        n_out: int = 1,
        domain: str = "",
        **attrs,
    ) -> str | list[str]:
        """Add one node. Returns its output name (or list of names when it has several)."""
        node_name = self._fresh(op_type)
        if out is None:
            outs = [f"{node_name}/output_{i}" for i in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=None) -> str:
        """A small constant (shape, axes, scalars); identical constants are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named weight. Large ones are appended to the external-data file right away."""
        array = np.ascontiguousarray(array)
        if self.data_path is None or array.nbytes < INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        if self._data is None:
            self._data = open(self.data_path, "wb")
        offset = self._data.tell()
        pad = (-offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(array.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        return name

    # -- finishing ----------------------------------------------------------------------------
    def build(self, doc: str = "") -> onnx.ModelProto:
        if self._data is not None:
            self._data.close()
            self._data = None
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers, value_info=self.value_info
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qwen3vl-lab", doc_string=doc)
        model.ir_version = 9  # onnxruntime >= 1.16 reads IR 9
        return model

    def save(self, path: str | Path, doc: str = "") -> onnx.ModelProto:
        """Write the .onnx next to its data file (the data was already written by `weight()`)."""
        model = self.build(doc)
        onnx.save_model(model, str(path))
        return model


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    onnx.save_model(model, str(path))
