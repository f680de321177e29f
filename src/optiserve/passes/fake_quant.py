"""Fake quantization on an FX graph of a PyTorch model, and its export as an ONNX QDQ model.

The model becomes an FX graph (a torch.export program's module; TorchScript goes through
torch._export.converter first). BatchNorm is folded into the convolution before it, then every
Conv/Linear gets fake quantization the way ONNX Runtime runs INT8: weights per-channel symmetric
int8, activations per-tensor asymmetric uint8 from moving-average min/max observers, observed
after a following ReLU (ONNX Runtime drops it into the quantization) and shared across
MaxPool/Flatten/Reshape so no requantization sits between layers (and one per tensor, however
many layers read it). The TorchScript ONNX exporter writes each fake-quant as QuantizeLinear ->
DequantizeLinear; the weights are then stored as int8, the form ONNX Runtime fuses into
QLinearConv / QGemm / MatMulIntegerToFloat kernels, and per-tensor scales and zero points as
scalars, the only form its QLinearAdd (a residual connection's Add) accepts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from optiserve.convert.onnx_io import write_meta
from optiserve.core.errors import first_line
from optiserve.core.types import Signature
from optiserve.passes.base import PassSkipped
from optiserve.passes.fx import CONV, aten_op, get_attr, quiet, retarget_sizes, set_param

# Ops that move values without changing them: their output keeps their input's scale.
_SAME_SCALE = {"max_pool1d", "max_pool2d", "max_pool3d", "flatten", "view", "reshape",
               "_unsafe_view", "dropout", "clone", "contiguous", "permute", "transpose",
               "squeeze", "unsqueeze", "alias"}


def insert_fake_quant(torch: Any, gm: Any, *, quantize_output: bool,
                      weight_bits: int = 8) -> list[str]:
    """Fake-quantize every Conv/Linear's weight, input and output (the model's output only when
    `quantize_output`); return the layers' names. Modules are named qat_weight_i, qat_input_i
    and qat_output_i. `weight_bits` 7 keeps weights in [-64, 63], where ONNX Runtime's u8 x s8
    kernel on x86 without VNNI cannot saturate."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver)

    graph, layers, fq_of, read_through = gm.graph, [], {}, {}
    w_min, w_max = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1

    def call(name: str, arg: Any, module: Any = None) -> Any:
        if module is not None:
            gm.add_submodule(name, module)
        return graph.call_module(name, (arg,))

    def activation() -> Any:
        return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                            dtype=torch.quint8, qscheme=torch.per_tensor_affine)

    for node in list(graph.nodes):
        op = aten_op(node)
        if op not in (*CONV, "linear") or (op == "convolution" and node.args[6]):
            continue  # transposed convolutions stay in float
        if _reads_input(node.args[1]):
            raise PassSkipped(f"layer '{node.name}' ({op}) computes its weight from the model's "
                              "input; fake quantization needs a stored weight")
        i, source = len(layers), _same_scale_source(node.args[0])
        with graph.inserting_before(node):
            node.update_arg(1, call(f"qat_weight_{i}", node.args[1], FakeQuantize(
                observer=MovingAveragePerChannelMinMaxObserver, quant_min=w_min, quant_max=w_max,
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)))
            if source not in fq_of:  # one quantization per tensor, however many layers read
                if node.args[0] not in read_through:  # it (a block's conv and its downsample)
                    read_through[node.args[0]] = call(f"qat_input_{i}", node.args[0],
                                                      activation())
                node.update_arg(0, read_through[node.args[0]])
            elif source is not node.args[0]:  # same scale as the quantized tensor it moves
                node.update_arg(0, call(fq_of[source], node.args[0]))
        point = node  # ONNX Runtime folds a ReLU into the quantization after it
        if len(node.users) == 1 and aten_op(next(iter(node.users))) in ("relu", "relu_"):
            point = next(iter(node.users))
        if quantize_output or not _only_to_output(point):
            with graph.inserting_after(point):
                fq = call(f"qat_output_{i}", point, activation())
            point.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
            fq_of[fq] = f"qat_output_{i}"
        layers.append(node.name)
    if not layers:
        ops = sorted({aten_op(n) for n in graph.nodes} - {""})
        raise PassSkipped("no Conv or Linear layer to fake-quantize; the graph has "
                          + (", ".join(ops[:8]) or "no aten operators"))
    graph.lint()
    gm.recompile()
    return layers


def _reads_input(node: Any) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if getattr(n, "op", None) == "placeholder":
            return True
        if hasattr(n, "all_input_nodes") and n not in seen:
            seen.add(n)
            todo += n.all_input_nodes
    return False


def _same_scale_source(node: Any) -> Any:
    while aten_op(node) in _SAME_SCALE and node.args:
        node = node.args[0]
    return node


def _only_to_output(node: Any) -> bool:
    return all(u.op == "output" or (aten_op(u) in _SAME_SCALE and _only_to_output(u))
               for u in node.users)


def export_qdq(torch: Any, gm: Any, args: tuple, signature: Signature, out: Path, opset: int,
               *, meta: dict[str, Any]) -> None:
    """Write the fake-quantized graph as ONNX QDQ with int8 weights (dynamic axes where the
    signature has -1), carrying the facts in `meta` that later passes read."""
    for module in gm.modules():  # observers would export as ops ONNX lacks (aten::copy)
        if hasattr(module, "disable_observer"):
            module.disable_observer()
    _widen_7bit_weights(torch, gm)
    retarget_sizes(gm)
    axes = {s.name: {i: f"{s.name}_d{i}" for i, d in enumerate(s.shape) if d == -1}
            for s in (*signature.inputs, *signature.outputs)}
    try:
        with torch.no_grad(), quiet("torch.onnx"):
            torch.onnx.export(gm, args, str(out), dynamo=False, opset_version=opset,
                              input_names=[s.name for s in signature.inputs],
                              output_names=[s.name for s in signature.outputs],
                              dynamic_axes=axes)
    except Exception as exc:  # the exporter raises many types
        raise PassSkipped(f"the fake-quantized model did not export to ONNX "
                          f"({first_line(exc, 200)})") from None
    model = onnx.load(str(out))
    _scalar_qparams(model.graph)
    _store_int8_weights(model.graph)
    _transpose_int8_weights(model.graph)
    write_meta(model, {k: v for k, v in meta.items()
                       if k in ("num_heads", "hidden_size", "model_type")})
    onnx.save(model, str(out))


def _widen_7bit_weights(torch: Any, gm: Any) -> None:
    """The exporter writes only the 8-bit ranges (-128, 127) and (0, 255). A weight trained in
    7 bits is replaced by its fake-quantized values (multiples of its scale in [-64, 63]) and
    its FakeQuantize widened to 8 bits with the same, frozen scale: the file then holds the
    very integers training saw."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("qat_weight_"):
            continue
        fq = gm.get_submodule(node.target)
        if (int(fq.quant_min), int(fq.quant_max)) == (-128, 127):
            continue
        source = node.args[0]
        if getattr(source, "op", None) == "get_attr":
            with torch.no_grad():
                set_param(torch, gm, source.target, fq(get_attr(gm, source.target)))
        fq.quant_min, fq.quant_max = -128, 127
        if hasattr(fq, "activation_post_process"):
            fq.activation_post_process.quant_min = -128
            fq.activation_post_process.quant_max = 127


def _scalar_qparams(graph: onnx.GraphProto) -> None:
    """A one-element scale or zero point of QuantizeLinear/DequantizeLinear becomes a scalar.
    FakeQuantize keeps per-tensor parameters as shape-[1] tensors and exports them so, but
    ONNX Runtime's QLinearAdd/QLinearMul/QLinearConcat (what it fuses DQ -> Add -> Q into, as
    at a ResNet's residual) accept only rank-0 ones and fail the session's creation."""
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    for node in graph.node:  # the exporter shares equal constants through Identity nodes
        if node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    scalars: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k in range(1, len(node.input)):
            value = consts.get(node.input[k])
            if value is None or value.size != 1 or value.ndim == 0:
                continue
            if node.input[k] not in scalars:
                scalars[node.input[k]] = f"{node.input[k]}_scalar"
                graph.initializer.append(
                    numpy_helper.from_array(value.reshape(()), scalars[node.input[k]]))
            node.input[k] = scalars[node.input[k]]


def _store_int8_weights(graph: onnx.GraphProto) -> None:
    """QuantizeLinear of a constant weight becomes the int8 initializer it computes: the file
    holds int8 weights (4x smaller) and DequantizeLinear -> Conv, the pattern ORT fuses."""
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in consts}
    kept, renamed = [], {}
    for node in graph.node:
        node.input[:] = [alias.get(i, i) for i in node.input]
        if node.op_type == "Identity" and node.output[0] in alias:
            continue
        if node.op_type != "QuantizeLinear" or not all(i in consts for i in node.input):
            kept.append(node)
            continue
        w, scale, zp = (consts[i] for i in node.input)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)  # QuantizeLinear rounds half to even, as np.rint does
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.astype(np.int32).reshape(shape),
                    info.min, info.max).astype(zp.dtype)
        renamed[node.output[0]] = node.input[0] + "_quantized"
        graph.initializer.append(numpy_helper.from_array(q, renamed[node.output[0]]))
    for node in kept:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in kept if n.op_type != "Constant" or n.output[0] in used)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _transpose_int8_weights(graph: onnx.GraphProto) -> None:
    """DequantizeLinear(int8 W) -> Transpose, how a Linear on 3-D inputs exports, becomes
    DequantizeLinear(int8 W transposed) on the moved axis, feeding MatMul directly."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = Counter(i for n in graph.node for i in n.input)
    dropped = []
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or readers[dq.output[0]] != 1 or readers[dq.input[0]] != 1:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"),
                    list(range(w.ndim))[::-1])
        inits[dq.input[0]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), dq.input[0]))
        for attr in dq.attribute:
            if attr.name == "axis":
                attr.i = perm.index(attr.i % w.ndim)
        dq.output[0] = node.output[0]
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Types of the Conv/Gemm/MatMul nodes whose weight comes through DequantizeLinear."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.op_type for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dq]
