"""Channel groups on an FX graph, and the surgery that removes channels from them.

Which output channels of which Conv / Linear layers must be pruned together, found by following
each layer's output channels through the graph (fx.graph_module's form: BatchNorm
folded, functional aten.conv2d / aten.linear with stored weights) to the layers that read them:

- elementwise ops, activations, pooling, BatchNorm, flatten/reshape (a flattened channel
  becomes a block of features of the next Linear), permutes and slices of other dimensions
  carry them along;
- channels that meet in an Add/Mul (a residual connection) form one group, pruned together;
- a depthwise convolution passes them through and is sliced with them;
- channels that reach the model's output, a concatenation, a LayerNorm or softmax across
  them, a reshape that splits them (attention heads), or a tensor they cannot be pruned with
  (the model's input) are left alone, with the reason;
- any other operator is one the analysis cannot follow: `blocked_error` names the layer and
  the operator.

Used by structured_pruning (remove the least important channels) and distillation (a student
derived from the teacher at a smaller width).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

from optiserve.passes.base import PassSkipped
from optiserve.passes.fx import CONV, aten_op, get_attr

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
    op, args = aten_op(node), list(node.args)
    if op == "linear":
        return args[1], args[2] if len(args) > 2 else node.kwargs.get("bias"), 1, False
    if op == "convolution":
        return args[1], args[2], args[8], bool(args[6])
    if op in CONV:
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
        op = aten_op(node)
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
        depthwise = aten_op(node) != "linear" and groups > 1 and groups == w_shape[0] \
            and w_shape[1] == 1
        if any(src is not node.args[0] for src, _ in tagged):
            return self.unknown(node, aten_op(node) + " (its weight)", tagged)
        if tagged:
            self.read(node, tagged[0][1], stored, depthwise, groups, transposed)
            if depthwise:
                return
        if stored and groups == 1 and not transposed and _shape(node):
            dim = len(_shape(node)) - 1 if aten_op(node) == "linear" else 1
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
        elif aten_op(node) == "linear" and dim == ndim - 1:
            group.consumers.append((weight.target, block))
        elif dim != 1 or block != 1:
            self.groups.pin(gid, f"read by {node.name} along another dimension")
        elif depthwise:
            group.params += [(weight.target, 0)] + ([(bias.target, 0)] if bias else [])
            group.literals.append((node, 8 if aten_op(node) == "convolution" else 6, None))
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
        w = get_attr(gm, weight).detach().reshape(group.size, -1)
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
