"""Structured pruning: whole output channels of Conv layers and neurons of Linear layers are
removed, so the tensors really shrink (unstructured zeros only shrink a file).

The model is read as an FX graph (fake_quant.graph_module: BatchNorm folded, functional
aten.conv2d / aten.linear with stored weights), the form every registered PyTorch model (a
TorchScript or torch.export file) reaches; Torch-Pruning would need the nn.Module layers,
which the registry no longer has. `channel_groups` follows each layer's output channels
through the graph to the layers that read them:

- elementwise ops, activations, pooling, BatchNorm, flatten/reshape (a flattened channel
  becomes a block of features of the next Linear), permutes and slices of other dimensions
  carry them along;
- channels that meet in an Add/Mul (a residual connection) form one group, pruned together;
- a depthwise convolution passes them through and is sliced with them;
- channels that reach the model's output, a concatenation, a LayerNorm or softmax across
  them, a reshape that splits them (attention heads), or a tensor they cannot be pruned with
  (the model's input) are left alone, and the note says why;
- any other operator is one the pruner cannot follow: the pass is skipped, naming the layer
  and the operator, and suggesting ignore_layers.

Each step keeps the most important channels (L1/L2 norm of their weights), rounded to a
hardware-friendly multiple, is timed in ONNX Runtime against the model before it and kept
only when it is faster, then fine-tuned (passes/training.py). The result is a .pt2 program.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import operator
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optiserve.core.deps import require
from optiserve.core.errors import ConfigError, first_line
from optiserve.passes.base import Artifact, Pass, PassContext, PassSkipped
from optiserve.passes.fake_quant import _CONV, _get_attr, _op, _quiet, graph_module
from optiserve.passes.training import (LOSSES, Trainer, deadline, loss_plan, model_stats,
                                       outputs, require_torch_model, save_program, stats_note,
                                       stopped_note, training_rows)

log = logging.getLogger(__name__)

# Ops that keep every element where it was: the channel dimension passes through unchanged.
_ELEMENTWISE = {"relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardtanh_",
                "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu", "mish", "softplus",
                "relu6", "dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "to",
                "neg", "abs", "exp", "erf", "sqrt", "rsqrt", "square", "pow", "clamp",
                "clamp_min", "clamp_max"}
_BINARY = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
         "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
         "_adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d_with_indices",
         "upsample_nearest2d", "upsample_bilinear2d"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_BATCH_NORM = {"batch_norm", "_native_batch_norm_legit_no_training"}
_ALONG = {"softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm", "slice", "select",
          "sym_size", "size"}
# aten op -> the _Walk method that follows channels through it; any other op is unknown
_HANDLERS = {**dict.fromkeys(_ELEMENTWISE | _BATCH_NORM | _POOL, "elementwise"),
             **dict.fromkeys(_BINARY, "binary"), **dict.fromkeys(_RESHAPE, "reshape"),
             **dict.fromkeys(_REDUCE, "reduce"), **dict.fromkeys(_ALONG, "along"),
             "permute": "permute", "transpose": "permute", "t": "permute", "cat": "cat"}


@dataclass
class Group:
    """Output channels that must be pruned together: the layers that make them, the weights
    that read them, and the per-channel tensors between (a depthwise conv, a BatchNorm)."""

    size: int
    producers: list[tuple[str, str, str | None]] = field(default_factory=list)  # label, w, b
    consumers: list[tuple[str, int]] = field(default_factory=list)  # weight, features/channel
    params: list[tuple[str, int]] = field(default_factory=list)  # tensor, dim (block 1)
    # sizes written into the graph that count these channels: (node, arg, index in a list)
    literals: list[tuple[Any, int, int | None]] = field(default_factory=list)
    pinned: str = ""  # why the channels stay
    blocked: str = ""  # the operator the analysis cannot follow them through

    @property
    def label(self) -> str:
        return "+".join(p[0] for p in self.producers)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(sorted(p[1] for p in self.producers))


class _Groups:
    """Union-find over groups: channels that meet in an Add are one group."""

    def __init__(self) -> None:
        self.groups: list[Group] = []
        self.parent: list[int] = []

    def new(self, group: Group) -> int:
        self.groups.append(group)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def get(self, gid: int) -> Group:
        return self.groups[self.find(gid)]

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.groups[a], self.groups[b]
        if ga.size != gb.size:
            ga.pinned = gb.pinned = "combined with a tensor of another channel count"
        for name in ("producers", "consumers", "params", "literals"):
            getattr(ga, name).extend(getattr(gb, name))
        ga.pinned, ga.blocked = ga.pinned or gb.pinned, ga.blocked or gb.blocked
        self.parent[b] = a
        return a

    def pin(self, gid: int, why: str) -> None:
        group = self.get(gid)
        group.pinned = group.pinned or why

    def roots(self) -> list[Group]:
        return [self.groups[i] for i in range(len(self.groups)) if self.find(i) == i]


# -- the analysis ----------------------------------------------------------------------------
def layer_parts(node: Any) -> tuple[Any, Any, int, bool] | None:
    """(weight, bias, groups, transposed) of a Conv/Linear call; None for any other node."""
    op, args = _op(node), list(node.args)
    if op == "linear":
        return args[1], args[2] if len(args) > 2 else node.kwargs.get("bias"), 1, False
    if op == "convolution":
        return args[1], args[2], args[8], bool(args[6])
    if op in _CONV:
        groups = args[6] if len(args) > 6 else node.kwargs.get("groups", 1)
        return args[1], args[2] if len(args) > 2 else node.kwargs.get("bias"), groups, False
    return None


def layer_label(node: Any) -> str:
    """The name a user knows a layer by: its module path ('features.3', recorded by
    torch.export, else read off the weight's name), or the graph node's name where neither
    has it (a TorchScript convolution that BatchNorm was folded into)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack and stack[-1][0]:
        return stack[-1][0]
    target = getattr(layer_parts(node)[0], "target", "")
    return target[:-len(".weight")] if target.endswith(".weight") else node.name


def layer_names(gm: Any) -> dict[str, Any]:
    """Every name ignore_layers accepts (label, node name, weight name) -> the layer node."""
    names = {}
    for node in gm.graph.nodes:
        parts = layer_parts(node)
        if parts is not None:
            names.update({layer_label(node): node, node.name: node})
            if getattr(parts[0], "op", None) == "get_attr":
                names[parts[0].target] = node
    return names


def channel_groups(torch: Any, gm: Any, args: tuple, ignore: set[str] = frozenset()
                   ) -> list[Group]:
    """The channel groups of `gm`, followed on shapes propagated from `args`."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if layer_parts(node) is not None:
            target = getattr(layer_parts(node)[0], "target", None)
            uses[target] = uses.get(target, 0) + 1
    walk = _Walk(gm, _Groups(), uses, ignore)
    for node in gm.graph.nodes:
        walk.visit(node)
    return walk.groups.roots()


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


class _Walk:
    """One forward walk: a tag (group, dim, features per channel) for every tensor that
    carries some layer's output channels."""

    def __init__(self, gm: Any, groups: _Groups, uses: dict[str, int], ignore: set[str]):
        self.gm, self.groups, self.uses, self.ignore = gm, groups, uses, ignore
        self.tags: dict[Any, tuple[int, int, int]] = {}

    def inputs(self, node: Any) -> list[tuple[Any, tuple[int, int, int]]]:
        found = []
        for arg in [*node.args, *node.kwargs.values()]:
            for a in (arg if isinstance(arg, (list, tuple)) else [arg]):
                if a in self.tags:
                    found.append((a, self.tags[a]))
        return found

    def visit(self, node: Any) -> None:
        tagged = self.inputs(node)
        if layer_parts(node) is not None:
            self.layer(node, tagged)
            return
        if not tagged:
            return
        if node.op == "output":
            for _, (gid, _, _) in tagged:
                self.groups.pin(gid, "a model output")
            return
        if node.op == "call_function" and node.target is operator.getitem:
            self.tags[node] = tagged[0][1]
            return
        op = _op(node)
        handler = getattr(self, _HANDLERS.get(op, "unknown"))
        if handler not in (self.binary, self.cat) and any(
                src is not node.args[0] for src, _ in tagged):
            handler = self.unknown  # channels arriving as a second operand (a clamp bound)
        handler(node, op, tagged)

    # -- layers --------------------------------------------------------------------------
    def layer(self, node: Any, tagged: list) -> None:
        weight, bias, groups, transposed = layer_parts(node)
        stored = getattr(weight, "op", None) == "get_attr" and self.uses[weight.target] == 1 \
            and (bias is None or getattr(bias, "op", None) == "get_attr")
        w_shape = _shape(weight) or (0, 0)
        depthwise = _op(node) != "linear" and groups > 1 and groups == w_shape[0] \
            and w_shape[1] == 1
        if any(src is not node.args[0] for src, _ in tagged):
            return self.unknown(node, _op(node) + " (its weight)", tagged)
        if tagged:
            self.read(node, tagged[0][1], stored, depthwise, groups, transposed)
            if depthwise:
                return
        if stored and groups == 1 and not transposed and _shape(node):
            dim = len(_shape(node)) - 1 if _op(node) == "linear" else 1
            group = Group(size=w_shape[0], producers=[
                (layer_label(node), weight.target, getattr(bias, "target", None))])
            if self.ignore & {layer_label(node), node.name, weight.target}:
                group.pinned = "in ignore_layers"
            self.tags[node] = (self.groups.new(group), dim, 1)

    def read(self, node: Any, tag: tuple[int, int, int], stored: bool, depthwise: bool,
             groups: int, transposed: bool) -> None:
        """`node` reads tagged channels as its input features."""
        gid, dim, block = tag
        weight, bias = layer_parts(node)[:2]
        ndim = len(_shape(node.args[0]) or ())
        group = self.groups.get(gid)
        if not stored:
            self.groups.pin(gid, f"read by {node.name}, whose weight is not a stored tensor")
        elif _op(node) == "linear" and dim == ndim - 1:
            group.consumers.append((weight.target, block))
        elif dim != 1 or block != 1:
            self.groups.pin(gid, f"read by {node.name} along another dimension")
        elif depthwise:
            group.params += [(weight.target, 0)] + ([(bias.target, 0)] if bias else [])
            group.literals.append((node, 8 if _op(node) == "convolution" else 6, None))
            self.tags[node] = tag
        elif groups == 1 and not transposed:
            group.consumers.append((weight.target, 1))
        else:
            self.groups.pin(gid, f"read by {node.name}, a grouped or transposed convolution")

    # -- ops that carry channels ---------------------------------------------------------
    def elementwise(self, node: Any, op: str, tagged: list) -> None:
        (src, (gid, dim, block)), = tagged[:1]
        shape, out = _shape(src), _shape(node)
        if op in _POOL and (dim != 1 or len(shape) < 3):
            return self.unknown(node, op, tagged)
        if op in _BATCH_NORM:
            stats = node.args[1:5]
            if dim != 1 or not all(getattr(a, "op", None) == "get_attr" for a in stats):
                return self.groups.pin(gid, f"normalized by {node.name} without stored "
                                            "statistics")
            self.groups.get(gid).params += [(a.target, 0) for a in stats]
        elif out is not None and op not in _POOL and out != shape:
            return self.unknown(node, op, tagged)
        self.tags[node] = (gid, dim, block)

    def binary(self, node: Any, op: str, tagged: list) -> None:
        """Channels that meet in an Add/Mul are one group; a tensor that is not some layer's
        output (the model's input) pins them, unless it broadcasts along them."""
        out = _shape(node) or ()
        where, root = set(), None
        for src, (gid, dim, block) in tagged:
            where.add((dim + len(out) - len(_shape(src)), block))
            root = gid if root is None else self.groups.union(root, gid)
        if len(where) > 1:
            return self.groups.pin(root, f"combined by {node.name} along different dimensions")
        (dim, block), = where
        for arg in node.args[:2]:
            shape = _shape(arg) if hasattr(arg, "meta") else None
            if arg in self.tags or shape is None:
                continue
            aligned = dim - (len(out) - len(shape))
            if aligned >= 0 and shape[aligned] != 1:
                return self.groups.pin(root, f"combined by {node.name} with {arg.name}, "
                                             "whose channels no prunable layer makes (the "
                                             "model's input, a normalization)")
        self.tags[node] = (root, dim, block)

    def reshape(self, node: Any, op: str, tagged: list) -> None:
        """Follows channels into the dimension that holds them whole: [N, C, H, W] flattened
        to [N, C*H*W] is C blocks of H*W features. A reshape that splits them (attention
        heads) pins them."""
        (src, (gid, dim, block)), = tagged[:1]
        shape, out = _shape(src), _shape(node)
        found = _follow_reshape(shape, out, dim, block, self.groups.get(gid).size)
        if found is None:
            return self.groups.pin(gid, f"split across dimensions by {node.name} (as "
                                        "attention heads are); not pruned yet")
        new_dim, new_block = found
        if op in ("view", "reshape", "_unsafe_view") and isinstance(node.args[1][new_dim], int) \
                and node.args[1][new_dim] != -1:
            self.groups.get(gid).literals.append((node, 1, new_dim))
        self.tags[node] = (gid, new_dim, new_block)

    def reduce(self, node: Any, op: str, tagged: list) -> None:
        (src, (gid, dim, block)), = tagged[:1]
        ndim = len(_shape(src))
        dims = node.args[1] if len(node.args) > 1 else None
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not isinstance(dims, (list, tuple)) or dim in {d % ndim for d in dims}:
            return self.groups.pin(gid, f"{op} over them in {node.name}")
        self.tags[node] = (gid, dim - (0 if keep else sum(d % ndim < dim for d in dims)), block)

    def permute(self, node: Any, op: str, tagged: list) -> None:
        (src, (gid, dim, block)), = tagged[:1]
        ndim = len(_shape(src))
        if op == "permute":
            order = [d % ndim for d in node.args[1]]
        else:
            a, b = (0, 1) if op == "t" else (node.args[1] % ndim, node.args[2] % ndim)
            order = list(range(ndim))
            order[a], order[b] = b, a
        self.tags[node] = (gid, order.index(dim), block)

    def along(self, node: Any, op: str, tagged: list) -> None:
        """Ops that work along one dimension: they carry the channels unless it is theirs."""
        (src, (gid, dim, block)), = tagged[:1]
        ndim = len(_shape(src))
        if op == "layer_norm":
            mine = set(range(ndim - len(node.args[1]), ndim))
        else:
            mine = {(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ndim}
        if dim in mine:
            what = {"layer_norm": "normalized across them", "sym_size": "their count is read",
                    "size": "their count is read", "slice": "sliced",
                    "select": "indexed"}.get(op, "softmax across them")
            return self.groups.pin(gid, f"{what} by {node.name}")
        if op in ("sym_size", "size"):
            return
        shift = 1 if op == "select" and min(mine) < dim else 0
        self.tags[node] = (gid, dim - shift, block)

    def cat(self, node: Any, op: str, tagged: list) -> None:
        parts = node.args[0]
        axis = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        axis %= len(_shape(node))
        dims = {self.tags[p][1:] for p in parts if p in self.tags}
        if len(dims) > 1 or axis == next(iter(dims))[0] or len(dims) and any(
                p not in self.tags for p in parts):
            for _, (gid, _, _) in tagged:
                self.groups.pin(gid, f"concatenated with other channels by {node.name}")
            return
        root = tagged[0][1][0]
        for _, (gid, _, _) in tagged[1:]:
            root = self.groups.union(root, gid)
        self.tags[node] = (root, *next(iter(dims)))

    def unknown(self, node: Any, op: str, tagged: list) -> None:
        what = f"aten.{op}" if op else f"{node.op} {node.target}"
        for _, (gid, _, _) in tagged:
            group = self.groups.get(gid)
            group.blocked = group.blocked or f"{what} (node '{node.name}')"


def _follow_reshape(shape: tuple, out: tuple, dim: int, block: int,
                    channels: int) -> tuple[int, int] | None:
    """(dimension, features per channel) of the channels in the reshaped tensor; None when
    the reshape splits a channel's features across dimensions or mixes channels with rows."""
    if shape is None or out is None:
        return None
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    chunk = block * inner  # consecutive elements one channel owns in each outer slice
    for d in range(len(out)):
        after = math.prod(out[d + 1:])
        if math.prod(out[:d]) == outer and out[d] * after == channels * chunk \
                and out[d] > 1 and chunk % after == 0:
            return d, chunk // after
    return None


# -- choosing and removing channels ----------------------------------------------------------
def kept_count(size: int, keep_fraction: float, round_to: int) -> int:
    """Channels to keep: `keep_fraction` of `size`, rounded to a multiple of `round_to` and
    never below it (SIMD kernels run whole vectors of channels; a ragged count wastes lanes)."""
    return max(round_to, int(round(size * keep_fraction / round_to)) * round_to)


def importance(torch: Any, gm: Any, group: Group, kind: str) -> Any:
    """Per channel: the L1 (or L2) norm of its weights in every layer that makes it, each
    layer's norms scaled to mean 1 so a residual group weighs its layers equally."""
    total = 0
    for _, weight, _ in group.producers:
        w = _get_attr(gm, weight).detach().reshape(group.size, -1)
        norm = w.abs().sum(1) if kind == "l1" else w.pow(2).sum(1).sqrt()
        total = total + norm / norm.mean().clamp_min(1e-12)
    return total


def prune_group(torch: Any, gm: Any, group: Group, keep: Any) -> None:
    """Slice every tensor of `group` to the channels in `keep` (sorted indices)."""
    for _, weight, bias in group.producers:
        _replace(torch, gm, weight, 0, keep)
        if bias is not None:
            _replace(torch, gm, bias, 0, keep)
    for target, dim in group.params:
        _replace(torch, gm, target, dim, keep)
    for weight, block in group.consumers:
        cols = (keep[:, None] * block + torch.arange(block)).reshape(-1)
        _replace(torch, gm, weight, 1, cols)
    for node, arg, index in group.literals:  # view(x, [-1, 64]) or groups=32 shrink too
        args = list(node.args)
        if index is None:
            args[arg] = args[arg] // group.size * len(keep)
        else:
            args[arg] = list(args[arg])
            args[arg][index] = args[arg][index] // group.size * len(keep)
        node.args = tuple(args)
    gm.recompile()


def _replace(torch: Any, gm: Any, target: str, dim: int, index: Any) -> None:
    """The tensor at `target` sliced along `dim`; a parameter stays a trainable parameter and
    a buffer (BatchNorm statistics) a buffer."""
    owner, _, attr = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    old = getattr(module, attr)
    new = old.detach().index_select(dim, index).clone()
    delattr(module, attr)
    if isinstance(old, torch.nn.Parameter):
        module.register_parameter(attr, torch.nn.Parameter(new, old.requires_grad))
    else:
        module.register_buffer(attr, new)


def shrink(torch: Any, gm: Any, groups: list[Group], keep_of: dict[tuple, int], kind: str
           ) -> dict[str, tuple[int, int]]:
    """Prune each group to keep_of[group.key] channels (the most important ones); returns
    label -> (channels before, after) for the groups that shrank."""
    changed = {}
    for group in groups:
        n = keep_of.get(group.key, group.size)
        if n >= group.size:
            continue
        keep = importance(torch, gm, group, kind).topk(n).indices.sort().values
        prune_group(torch, gm, group, keep)
        changed[group.label] = (group.size, n)
    return changed


def drop_unused(gm: Any) -> None:
    """Delete the tensors no graph node reads (the weights BatchNorm was folded out of), which
    torch.export would otherwise save with the program."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.recompile()


def prunable(groups: list[Group], round_to: int) -> list[Group]:
    return [g for g in groups if not g.pinned and not g.blocked and g.size > round_to]


def blocked_error(groups: list[Group]) -> PassSkipped | None:
    """The pass cannot prune a model with channels it cannot follow: name them and the op."""
    stuck = [g for g in groups if g.blocked and not g.pinned]
    if not stuck:
        return None
    names = [p[0] for g in stuck for p in g.producers]
    return PassSkipped(
        f"structured_pruning cannot follow the output channels of layer '{stuck[0].label}' "
        f"through {stuck[0].blocked}: it does not know how that operator uses channels. "
        f"Leave {'it' if len(names) == 1 else 'them'} unpruned with ignore_layers={names!r}")


def left_alone(groups: list[Group], round_to: int) -> str:
    """'; left alone: fc (a model output), conv1 (16 channels, at round_to)'."""
    why = [f"'{g.label}' ({g.pinned})" for g in groups if g.pinned] + [
        f"'{g.label}' ({g.size} channels, at round_to)" for g in groups
        if not g.pinned and not g.blocked and g.size <= round_to]
    return "; left alone: " + ", ".join(why) if why else ""


# -- the pass --------------------------------------------------------------------------------
class StructuredPruning(Pass):
    """Removes whole channels / neurons, keeps each step only if ONNX Runtime runs it faster,
    fine-tunes, and writes a .pt2 program with the smaller tensors."""

    name = "structured_pruning"
    extras = ("torch",)
    needs_onnx = False
    alternative = True  # the unshrunk model goes on beside it (Pass.alternative)

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        ratio: float | None = Field(
            None, gt=0, lt=1, description="Fraction of the channels (Conv) or neurons (Linear) "
            "removed from every layer that can be pruned. Unset: 0.5, and 0.25 when that fails "
            "the accuracy gate.", json_schema_extra={"search": [0.5, 0.25], "retry": True})
        round_to: int | None = Field(
            None, ge=1, description="Keep channel counts multiples of this, never below it: "
            "ONNX Runtime's CPU convolutions work on blocks of channels, so a ragged count "
            "saves less time than its size suggests, or none. Default 16 on CPUs with AVX-512 "
            "(its block), else 8.")
        importance: Literal["l1", "l2"] = Field(
            "l1", description="How channels are ranked: the L1 or L2 norm of their weights; "
            "the smallest are removed.")
        ignore_layers: list[str] = Field(
            default_factory=list, description="Layers whose output channels stay as they are, "
            "by module path ('features.3'), graph node name or weight name.")
        iterations: int = Field(
            2, ge=1, le=10, description="Prune in this many steps, up to `ratio`; each step is "
            "timed and kept only when it is faster, then fine-tuned before the next.")
        require_faster: bool = Field(
            True, description="Keep a step only when the pruned model runs faster in ONNX "
            "Runtime; false keeps every step untimed (a size target, not a latency one).")
        min_speedup: float = Field(
            1.05, ge=1, description="A step is faster when the previous model's p50 latency / "
            "the pruned one's is at least this: smaller gains are within timing noise and not "
            "worth the accuracy.")
        timing_batch_size: int | None = Field(
            None, ge=1, le=4096, description="Batch size the steps are timed at; default the "
            "largest batch size the run benchmarks (64 when the pass runs on its own).")
        steps: int = Field(300, ge=0, description="Optimizer steps of fine-tuning in all.")
        batch_size: int = Field(32, ge=1, description="Training rows per step.")
        learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
        loss: Literal["auto", "cross_entropy", "mse", "distill"] = Field(
            "auto", description="Fine-tuning loss: cross_entropy against integer labels, mse "
            "against float labels, distill: mean squared error to the unpruned model's "
            "outputs. auto: cross_entropy when the labels and the output allow it, else "
            "distill.")
        max_seconds: float = Field(
            300, gt=0, description="Stop fine-tuning once the pass has run this long; the "
            "steps done so far are kept and the note says so.")
        seed: int = Field(0, description="Seed of the batch order.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        require_torch_model(artifact, self.name)
        started = time.monotonic()
        torch = require("torch", extra="torch", feature="Structured pruning")
        data, labels, total = training_rows(artifact, ctx, self.name,
                                            keep=max(config.steps * config.batch_size, 512),
                                            seed=config.seed)
        sig = artifact.signature
        args = tuple(torch.from_numpy(data[s.name][:2]) for s in sig.inputs)
        gm = graph_module(torch, artifact.path, artifact.format, args)
        check_ignored(gm, config.ignore_layers)
        round_to = config.round_to or default_round_to(ctx)
        groups = channel_groups(torch, gm, args, set(config.ignore_layers))
        error = blocked_error(groups)
        if error is not None:
            raise error
        if not prunable(groups, round_to):
            raise PassSkipped(f"no layer has more than round_to={round_to} channels that can be "
                              f"pruned{left_alone(groups, round_to)}")
        kind, targets = loss_plan(config.loss, outputs(torch, gm, data, sig), labels)
        until, by_run = deadline(ctx, config.max_seconds, started)
        trainer = Trainer(torch, gm, data, targets, kind, sig, steps=config.steps,
                          batch_size=config.batch_size, learning_rate=config.learning_rate,
                          seed=config.seed, name=self.name, ctx=ctx)
        job = _Steps(torch, gm, args, config, round_to, until, trainer,
                     _Timer(torch, sig, data, ctx, config))
        loss_start, stats_start = job.trainer.evaluate(), model_stats(torch, gm, args)
        job.run(groups)
        if not job.kept:
            raise PassSkipped("no pruning step made the model faster: " + "; ".join(job.lines))
        gm = job.gm
        drop_unused(gm)
        out = save_program(torch, gm, sig, data, ctx.workdir / "structured_pruning.pt2")
        stopped = stopped_note(job.done, config.steps, by_run, config.max_seconds)
        rows = job.trainer.n
        note = (f"structured pruning ({config.importance}, ratio {job.ratio:g}, round_to "
                f"{round_to}): " + "; ".join(job.lines) + "; kept step(s) "
                + ", ".join(map(str, job.kept)) + "; channels "
                + ", ".join(f"'{k}' {a} -> {b}" for k, (a, b) in job.channels.items())
                + f"; {stats_note(stats_start, model_stats(torch, gm, args))}; {job.done} steps "
                f"of fine-tuning ({LOSSES[kind]}, {rows}{f' of {total}' if total > rows else ''}"
                f" rows of {ctx.training.description or 'the training data'}{stopped}), loss "
                f"{loss_start:.3g} unpruned -> {job.trainer.evaluate():.3g}"
                + left_alone(groups, round_to))
        return artifact.then(out, self.name, config, format="pt2", notes=[note])


def default_round_to(ctx: PassContext) -> int:
    """16 on CPUs with AVX-512, else 8: ONNX Runtime's CPU convolutions work on blocks of 16
    channels with AVX-512 (8 with AVX2), and a count off the block is slower than the next
    multiple up (measured on a digits CNN: 32 -> 24 channels ran 0.78x as fast)."""
    return 16 if "avx512f" in ctx.hardware.flags else 8


class _Steps:
    """The pruning steps: each prunes a copy of the last kept model further, is timed against
    it, and when kept, fine-tuned with its share of the steps."""

    def __init__(self, torch: Any, gm: Any, args: tuple, config: StructuredPruning.Config,
                 round_to: int, until: float, trainer: Trainer, timer: _Timer):
        self.torch, self.gm, self.args, self.config = torch, gm, args, config
        self.round_to, self.until, self.trainer, self.timer = round_to, until, trainer, timer
        self.ratio = config.ratio or 0.5
        self.kept: list[int] = []
        self.lines: list[str] = []
        self.channels: dict[str, tuple[int, int]] = {}
        self.done = 0

    def run(self, groups: list[Group]) -> None:
        config, n = self.config, self.config.iterations
        original = {g.key: g.size for g in prunable(groups, self.round_to)}
        timed = self.timer.export(self.gm, "original") if config.require_faster else None
        steps_left = config.steps
        for i in range(1, n + 1):
            candidate = copy.deepcopy(self.gm)
            cgroups = channel_groups(self.torch, candidate, self.args, set(config.ignore_layers))
            keep_of = {g.key: kept_count(original[g.key], 1 - self.ratio * i / n, self.round_to)
                       for g in prunable(cgroups, self.round_to) if g.key in original}
            changed = shrink(self.torch, candidate, cgroups, keep_of, config.importance)
            if not changed:
                self.lines.append(f"step {i}: nothing more to remove at this ratio and round_to")
                continue
            line, faster, path = self.judge(candidate, i, timed)
            self.lines.append(f"{line}, loss {self.loss(candidate):.3g} right after")
            if not faster:
                continue
            self.gm, timed = candidate, path
            self.kept.append(i)
            for label, (before, after) in changed.items():
                self.channels[label] = (self.channels.get(label, (before,))[0], after)
            share = steps_left // (n - i + 1)  # a rejected step's share goes to the next
            self.fine_tune(share)
            steps_left -= share
        if self.kept and steps_left:
            self.fine_tune(steps_left)
        self.trainer.module = self.gm

    def judge(self, candidate: Any, i: int, previous: Path | None
              ) -> tuple[str, bool, Path | None]:
        """(what step i measured, whether it is kept, its ONNX export for the next step)."""
        if previous is None:
            return f"step {i}: kept untimed (require_faster=false)", True, None
        path = self.timer.export(candidate, f"step{i}")
        before, after = self.timer.compare([previous, path])
        speedup, least = before / after, self.config.min_speedup
        verdict = "kept" if speedup >= least else f"rejected: below min_speedup={least:g}"
        return (f"step {i}: {before:.3f} -> {after:.3f} ms at batch {self.timer.batch} in "
                f"ONNX Runtime ({speedup:.2f}x, {verdict})"), speedup >= least, path

    def loss(self, module: Any) -> float:
        self.trainer.module = module
        return self.trainer.evaluate()

    def fine_tune(self, steps: int) -> None:
        self.trainer.module = self.gm
        self.done += self.trainer.train(self.until, steps=steps) if steps else 0


def check_ignored(gm: Any, names: list[str]) -> None:
    """A name in ignore_layers that is no layer is a typo: say which names there are."""
    known = layer_names(gm)
    unknown = [n for n in names if n not in known]
    if unknown:
        labels = sorted({layer_label(node) for node in known.values()})
        raise ConfigError(f"ignore_layers names {unknown}, which are not layers of this model.",
                          hint=f"Its Conv/Linear layers: {', '.join(labels)}.")


class _Timer:
    """p50 latencies of modules as ONNX Runtime runs them after onnx_conversion (exported with
    a fixed batch), timed in a fresh process like the optimizer's candidates, one call of each
    in turn. In-process torch timing predicts the deployed latency poorly: eager PyTorch spends
    microseconds per op dispatching, which hides what fewer channels save, and its OpenMP
    workers keep spinning into the next measurement. Taking turns matters as much: on a
    shared machine two models timed a second apart differ by 30 %, taking turns by 2 %."""

    def __init__(self, torch: Any, signature: Any, data: dict[str, np.ndarray],
                 ctx: PassContext, config: StructuredPruning.Config):
        self.torch, self.signature, self.ctx = torch, signature, ctx
        self.batch = config.timing_batch_size or max(ctx.batch_sizes or (64,))
        n = len(next(iter(data.values())))
        idx = np.arange(self.batch) % n
        self.rows = {k: np.ascontiguousarray(v[idx]) for k, v in data.items()}

    def export(self, gm: Any, name: str) -> Path:
        torch, sig = self.torch, self.signature
        path = self.ctx.workdir / f"timing-{name}.onnx"
        args = tuple(torch.from_numpy(self.rows[s.name]) for s in sig.inputs)
        try:
            with torch.no_grad(), _quiet("torch.onnx"):
                torch.onnx.export(gm, args, str(path), dynamo=False,
                                  opset_version=self.ctx.settings.onnx_opset_version,
                                  input_names=[s.name for s in sig.inputs],
                                  output_names=[s.name for s in sig.outputs])
        except Exception as exc:  # the exporter raises many types
            raise PassSkipped(f"the model could not be exported to ONNX to time it "
                              f"({first_line(exc, 200)}); require_faster=false skips timing"
                              ) from None
        return path

    def compare(self, paths: list[Path]) -> list[float]:
        """p50 ms of each ONNX file, timed in turns in one child process."""
        job = self.ctx.workdir / "timing-job.json"
        np.savez(self.ctx.workdir / "timing-rows.npz", **self.rows)
        job.write_text(json.dumps({
            "paths": [str(p) for p in paths], "threads": self.ctx.settings.threads,
            "signature": self.signature.model_dump(mode="json"),
            "rows": str(self.ctx.workdir / "timing-rows.npz")}))
        try:
            proc = subprocess.run([sys.executable, "-m", "optiserve.passes.structured_pruning",
                                   str(job)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise PassSkipped("timing the pruned model in ONNX Runtime took over 300 s; "
                              "lower timing_batch_size, or require_faster=false") from None
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PassSkipped(f"timing the pruned model in ONNX Runtime failed: {tail}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["p50_ms"]


def _time_in_turns(job_path: str, max_seconds: float = 2.0, rounds: int = 300) -> None:
    """The child of _Timer.compare: one call of each model in turn, for up to `rounds`
    rounds or `max_seconds` (at least 20), then the median of each; prints one JSON line."""
    from optiserve.core.types import Signature
    from optiserve.runtimes.base import load_runtime

    job = json.loads(Path(job_path).read_text())
    sig = Signature.model_validate(job["signature"])
    with np.load(job["rows"]) as data:
        rows = {k: data[k] for k in data.files}
    with contextlib.ExitStack() as stack:
        runtimes = [stack.enter_context(load_runtime(Path(p), sig, format="onnx",
                                                     threads=job["threads"]))
                    for p in job["paths"]]
        for runtime in runtimes:
            for _ in range(10):
                runtime.predict(rows)
        times: list[list[float]] = [[] for _ in runtimes]
        until = time.perf_counter() + max_seconds
        for r in range(rounds):
            if r >= 20 and time.perf_counter() > until:
                break
            for runtime, spent in zip(runtimes, times):
                start = time.perf_counter()
                runtime.predict(rows)
                spent.append(time.perf_counter() - start)
    print(json.dumps({"p50_ms": [float(np.median(t)) * 1e3 for t in times]}))


if __name__ == "__main__":
    _time_in_turns(sys.argv[1])
