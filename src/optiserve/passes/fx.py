"""The FX graph helpers the PyTorch passes share: a stored model as an FX GraphModule (BatchNorm
folded, Conv/Linear weights trainable), a node's aten op, a graph's attributes read and set as
parameters, and the retargeting that lets jit.trace (the TorchScript ONNX exporter) keep a
batch size read in the graph dynamic.

Used by qat (fake_quant.py), pruning, structured_pruning (channels.py), low_rank and
distillation; torch is passed in, never imported here, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

from optiserve.core.errors import first_line
from optiserve.passes.base import PassSkipped


CONV = ("conv1d", "conv2d", "conv3d", "convolution")  # aten ops of a convolution


def aten_op(node: Any) -> str:
    """'conv2d' for a call of torch.ops.aten.conv2d.default; '' for anything else."""
    if getattr(node, "op", None) != "call_function" or not str(node.target).startswith("aten."):
        return ""
    return getattr(node.target, "__name__", "").split(".")[0]


def graph_module(torch: Any, path: Path, fmt: str, args: tuple) -> Any:
    """An FX GraphModule of a stored torch model (format "pt2" or "torchscript", traced on
    `args`), BatchNorm folded and Conv/Linear weights trainable parameters."""
    try:
        if fmt == "pt2":
            gm = torch.export.load(str(path)).module()
        else:
            from torch._export.converter import TS2EPConverter

            script = torch.jit.load(str(path), map_location="cpu").eval()
            with quiet("torch._export"):  # advice about unused buffers and specialized dims
                gm = TS2EPConverter(script, args).convert().module()
    except Exception as exc:  # the converters raise many types; any means "cannot follow it"
        raise PassSkipped(f"the {fmt} model could not be turned into an FX graph "
                          f"to fake-quantize ({first_line(exc, 200)})") from None
    for node in list(gm.graph.nodes):  # export's input guards: they only check shapes
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            gm.delete_submodule("_guards_fn")
    for method in ("train", "eval"):  # .module() forbids them; the ONNX exporter calls eval()
        gm.__dict__.pop(method, None)
    for key, hook in list(gm._forward_pre_hooks.items()):  # reads shapes jit.trace cannot
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    fold_batch_norm(torch, gm)
    for node in gm.graph.nodes:
        if aten_op(node) in (*CONV, "linear"):
            for arg in node.args[1:3]:
                if getattr(arg, "op", None) == "get_attr":
                    set_param(torch, gm, arg.target, get_attr(gm, arg.target))
    gm.recompile()
    return gm


def _size(tensor: Any, dim: int) -> Any:
    return tensor.size(dim)


def _view(tensor: Any, shape: Any) -> Any:
    return tensor.view(shape)


def _reshape(tensor: Any, shape: Any) -> Any:
    return tensor.reshape(shape)


# A batch size read in the graph reaches ONNX as a Shape op only when jit.trace sees it come
# from Tensor.size and go to Tensor.view/reshape; through aten ops it is baked in as a number.
TRACEABLE = {"aten.sym_size.int": _size, "aten.view.default": _view,
              "aten.reshape.default": _reshape, "aten._unsafe_view.default": _reshape}


@contextlib.contextmanager
def quiet(logger: str):
    """Silence a library's warnings (Python warnings and its logger) for the duration."""
    chatty = logging.getLogger(logger)
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        chatty.setLevel(level)


def get_attr(gm: Any, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def set_param(torch: Any, gm: Any, target: str, value: Any) -> None:
    owner, _, attr = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if hasattr(module, attr):
        delattr(module, attr)  # TS2EP keeps weights as buffers: make them parameters
    module.register_parameter(attr, torch.nn.Parameter(value.detach().clone().float()))


def fold_batch_norm(torch: Any, gm: Any) -> None:
    """conv -> batch_norm(inference statistics) becomes one conv with scaled weights and bias:
    the form ONNX Runtime quantizes. The statistics stay those of the original model."""
    graph = gm.graph
    for bn in list(graph.nodes):
        op, conv = aten_op(bn), bn.args[0] if bn.args else None
        if op not in ("batch_norm", "_native_batch_norm_legit_no_training") or \
                aten_op(conv) not in CONV or len(conv.users) != 1 or \
                (aten_op(conv) == "convolution" and conv.args[6]) or \
                (op == "batch_norm" and bn.args[5]) or \
                (op != "batch_norm" and any(u.args[1] != 0 for u in bn.users)) or \
                any(getattr(a, "op", None) != "get_attr" for a in (conv.args[1], *bn.args[1:5])):
            continue  # training-mode or affine-free BatchNorm, or a shared conv: left as is
        eps = bn.args[7] if op == "batch_norm" else bn.args[6]
        gamma, beta, mean, var = (get_attr(gm, a.target).detach().float() for a in bn.args[1:5])
        w = get_attr(gm, conv.args[1].target).detach()
        bias = conv.args[2] if len(conv.args) > 2 else None
        b = get_attr(gm, bias.target).detach() if bias is not None else torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + eps)
        set_param(torch, gm, f"{conv.name}_folded_weight",
                   w * factor.reshape(-1, *[1] * (w.dim() - 1)))
        set_param(torch, gm, f"{conv.name}_folded_bias", (b - mean) * factor + beta)
        with graph.inserting_before(conv):
            new_w = graph.get_attr(f"{conv.name}_folded_weight")
            new_b = graph.get_attr(f"{conv.name}_folded_bias")
        conv.args = (conv.args[0], new_w, new_b, *conv.args[3:])
        for user in ([bn] if op == "batch_norm" else list(bn.users)):  # else: getitem 0 of 3
            user.replace_all_uses_with(conv)
            if user is not bn:
                graph.erase_node(user)
        graph.erase_node(bn)
    graph.eliminate_dead_code()


def retarget_sizes(gm: Any) -> None:
    """Make a batch size read in the graph reach ONNX as a Shape op under jit.trace, which
    follows sizes through Tensor methods, not aten ops."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in TRACEABLE:
            node.target = TRACEABLE[str(node.target)]
    gm.recompile()
