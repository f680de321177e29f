"""Low-rank approximation: Linear and Conv weights factored by truncated SVD, then fine-tuned.

A Linear weight W [out, in] becomes U [out, r] times V [r, in] (the square roots of the kept
singular values split between the two, so both factors train at the same scale): one matrix
product becomes two, linear(linear(x, V), U, b). A k x k convolution in -> out becomes a k x k
convolution in -> r (same stride, padding, dilation) followed by a 1 x 1 convolution r -> out,
from the SVD of W reshaped to [out, in * k * k]. Grouped, depthwise and transposed convolutions
are left alone: their weights are not one matrix.

A layer is factored only where that is cheaper: r * (in + out) < in * out weights, the same
ratio in multiply-adds per row (per output position for a convolution). The rank comes from
`energy` (the fraction of the layer's squared singular values kept) or from `param_budget`
(a fraction of all factorable weights kept, spent where it keeps the most energy per weight),
rounded up to `round_to` so the matrix kernels stay on their fast paths.

Fine-tuning recovers what the truncation lost (passes/training.py: rows, loss, loop). It needs
training data; without it the pass still factors, says so, and leaves the accuracy to the gate,
unless `steps` was set explicitly, which asks for fine-tuning and so skips without data.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from optiserve.passes.base import Artifact, PassContext, PassSkipped
from optiserve.passes.fx import CONV, aten_op, get_attr, set_param
from optiserve.passes.training import (LOSSES, Trainer, TrainingConfig, TrainingJob, TrainingPass,
                                       deadline, loss_plan, model_stats, outputs, save_program,
                                       stats_meta, stats_note, stopped_note, training_rows)

DEFAULT_ENERGY = 0.9


class LowRank(TrainingPass):
    """Factors Linear/Conv weights by truncated SVD where that is cheaper; optional fine-tune."""

    name = "low_rank"
    feature = "Low-rank approximation (low_rank)"
    kind = "alternative"  # the unshrunk model goes on beside it

    class Config(TrainingConfig):
        energy: float | None = Field(
            None, gt=0, le=1, description="Fraction of each layer's squared singular values "
            f"kept: its rank is the smallest that keeps it. Default {DEFAULT_ENERGY} when "
            "param_budget is not given; the search tries 0.9 first, and 0.97 then 0.995 only "
            "after a candidate fails the accuracy gate.",
            json_schema_extra={"search": [0.9, 0.97, 0.995], "when": {"param_budget": None},
                               "retry": True})
        param_budget: float | None = Field(
            None, gt=0, lt=1, description="Instead of energy: the fraction of the factorable "
            "layers' weights kept overall; ranks are chosen across layers, each block of "
            "round_to ranks going where it keeps the most energy per weight.")
        min_size: int = Field(
            4096, ge=0, description="Leave layers with fewer weights than this dense: they cost "
            "too little to matter, and each factored layer adds a matrix product.")
        round_to: int = Field(
            8, ge=1, description="Round ranks up to a multiple of this: matrix kernels run "
            "fastest on sizes that fill their vector registers.")
        steps: int = Field(
            300, ge=0, description="Optimizer steps of fine-tuning after the factoring (needs "
            "training data; 0: none). Without training data the pass factors without "
            "fine-tuning, unless steps was set explicitly.")
        learning_rate: float = Field(
            1e-4, gt=0, description="Adam learning rate: small, since the factors start "
            "close to the trained weights (1e-3 undid more than it recovered on a digits MLP).")

        @model_validator(mode="after")
        def _one_rank_rule(self) -> LowRank.Config:
            if self.energy is not None and self.param_budget is not None:
                raise ValueError(f"energy={self.energy} and param_budget={self.param_budget} "
                                 "both choose the ranks; give one of them")
            return self

    @staticmethod
    def _tunes(config: Config, ctx: PassContext) -> bool:
        """Fine-tuning runs with training data, or without when steps were set explicitly (and
        then says what is missing)."""
        return config.steps > 0 and (ctx.training is not None
                                     or "steps" in config.model_fields_set)

    def rows(self, artifact: Artifact, config: Config, ctx: PassContext):
        """The training rows when it fine-tunes, else example inputs (factoring needs none)."""
        if not self._tunes(config, ctx):
            return artifact.signature.example_inputs(), None, 0
        return training_rows(artifact, ctx, self.name,
                             keep=max(512, config.steps * config.batch_size), seed=config.seed)

    def train(self, artifact: Artifact, config: Config, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        torch, data, labels, total, args, gm = (job.torch, job.data, job.labels, job.total,
                                                job.args, job.gm)
        signature = artifact.signature
        tune = self._tunes(config, ctx)
        size_before = model_stats(torch, gm, args)
        layers, left = find_layers(torch, gm, config.min_size)
        chosen, fraction = choose_ranks(layers, config, left)
        if not chosen:
            raise PassSkipped("no layer is worth factoring: " + "; ".join(left))
        tuner = FineTune(torch, gm, data, labels, signature, config, ctx) if tune else None
        for i, layer in enumerate(chosen):
            factor(torch, gm, layer, i)
        drop_unused_weights(gm, [layer.weight for layer in chosen])
        size_after = model_stats(torch, gm, args)
        notes = [factor_note(chosen, left, rule_text(config, fraction), size_before, size_after)]
        if tuner is None:
            notes.append("low_rank: not fine-tuned ("
                         + ("steps=0" if config.steps == 0 else
                            "no training data; give training_dataset to recover accuracy")
                         + "): the accuracy gate measures what the truncation lost")
        else:
            notes.append(tuner.run(*deadline(ctx, config.max_seconds, job.started), total))
        out = save_program(torch, gm, signature, data, ctx.workdir / "low_rank.pt2")
        return artifact.then(out, self.name, config, format="pt2", signature=signature,
                             notes=notes, meta=stats_meta(size_before, size_after))


# -- layers ----------------------------------------------------------------------------------
@dataclass
class Layer:
    """A Conv/Linear node whose weight is one matrix [out, in * kernel], with its SVD."""

    node: Any
    weight: str  # the get_attr target
    shape: tuple[int, ...]  # [out, in] or [out, in, *kernel]
    u: Any  # torch float64 [out, k]
    s: Any  # torch float64 [k], descending
    vh: Any  # torch float64 [k, in * kernel]
    rank: int = 0

    @property
    def label(self) -> str:
        return label(self.node, self.weight, self.shape)

    @property
    def out(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return int(np.prod(self.shape[1:]))

    @property
    def full(self) -> int:
        return len(self.s)

    @property
    def dense(self) -> int:
        return self.out * self.fan_in

    def cost(self, rank: int) -> int:
        """Weights (and multiply-adds per output position) of the factored form."""
        return rank * (self.fan_in + self.out)

    def kept(self, rank: int) -> float:
        """Fraction of the squared singular values the first `rank` keep."""
        energy = (self.s ** 2).numpy()
        return float(energy[:rank].sum() / energy.sum())


def find_layers(torch: Any, gm: Any, min_size: int) -> tuple[list[Layer], list[str]]:
    """(layers that could be factored, each with its SVD; why each other layer cannot be)."""
    nodes = [n for n in gm.graph.nodes if aten_op(n) in (*CONV, "linear")]
    if not nodes:
        ops = sorted({aten_op(n) for n in gm.graph.nodes} - {""})
        raise PassSkipped("no Conv or Linear layer to factor; the graph has "
                          + (", ".join(ops[:8]) or "no aten operators"))
    shared = Counter(n.args[1].target for n in nodes if getattr(n.args[1], "op", "") == "get_attr")
    layers, left = [], []
    for node in nodes:
        weight = node.args[1]
        if getattr(weight, "op", None) != "get_attr":
            left.append(f"{node.name}: its weight is computed in the graph, not stored")
            continue
        w = get_attr(gm, weight.target).detach()
        why = _cannot_factor(node, w, shared[weight.target], min_size)
        if why:
            left.append(f"{label(node, weight.target, tuple(w.shape))}: {why}")
            continue
        u, s, vh = torch.linalg.svd(w.double().reshape(w.shape[0], -1), full_matrices=False)
        layers.append(Layer(node, weight.target, tuple(w.shape), u, s, vh))
    return layers, left


def label(node: Any, weight: str, shape: tuple[int, ...]) -> str:
    """'fc2 (512x512)': the module's name where the weight keeps it, else the node's."""
    name = weight.removesuffix(".weight") if weight.endswith(".weight") else node.name
    return f"{name} ({'x'.join(map(str, shape))})"


def _cannot_factor(node: Any, weight: Any, readers: int, min_size: int) -> str:
    op = aten_op(node)
    if readers > 1:
        return "its weight is shared with another layer"
    if op == "convolution" and node.args[6]:
        return "transposed convolution"
    if op in CONV and _groups(node) != 1:
        return f"grouped or depthwise convolution (groups={_groups(node)}): not one matrix"
    if weight.numel() < min_size:
        return f"{weight.numel():,} weights, under min_size={min_size:,}"
    if not bool(weight.abs().sum()):
        return "its weight is all zeros"
    return ""


def _groups(node: Any) -> int:
    at = 8 if aten_op(node) == "convolution" else 6
    return int(node.args[at] if len(node.args) > at else node.kwargs.get("groups", 1))


# -- ranks ------------------------------------------------------------------------------------
def rounded(rank: int, round_to: int, full: int) -> int:
    return min(full, -(-rank // round_to) * round_to)


def energy_rank(layer: Layer, energy: float, round_to: int) -> int:
    """The smallest rank keeping `energy` of the squared singular values, rounded up. The
    tolerance lets energy=1.0 stop at a weight's true rank (its tail is float32 noise)."""
    s2 = (layer.s ** 2).numpy()
    kept = np.cumsum(s2) / s2.sum()
    return rounded(int(np.searchsorted(kept, energy - 1e-9)) + 1, round_to, layer.full)


def choose_ranks(layers: list[Layer], config: Any, left: list[str]) -> tuple[list[Layer], float]:
    """(layers to factor, with `rank` set; fraction of the factorable weights kept). Layers
    kept dense get their reason appended to `left`."""
    cheap = []
    for layer in layers:
        least = rounded(1, config.round_to, layer.full)
        if layer.cost(least) >= layer.dense:
            left.append(f"{layer.label}: not cheaper at any rank (rank {least} of "
                        f"{layer.full} needs {layer.cost(least):,} weights, dense "
                        f"{layer.dense:,})")
        else:
            cheap.append(layer)
    if config.param_budget is not None:
        budget_ranks(cheap, config.param_budget, config.round_to)
    else:
        for layer in cheap:
            layer.rank = energy_rank(layer, config.energy or DEFAULT_ENERGY, config.round_to)
    chosen = []
    for layer in cheap:
        if layer.cost(layer.rank) < layer.dense:
            chosen.append(layer)
        else:
            left.append(f"{layer.label}: not cheaper (rank {layer.rank} of {layer.full} keeps "
                        f"{layer.kept(layer.rank):.1%} energy with {layer.cost(layer.rank):,} "
                        f"weights, dense {layer.dense:,})")
    total = sum(layer.dense for layer in cheap)
    spent = sum(min(layer.cost(layer.rank), layer.dense) for layer in cheap)
    return chosen, (spent / total if total else 1.0)


def budget_ranks(layers: list[Layer], fraction: float, round_to: int) -> None:
    """Greedy across layers: each starts at round_to ranks, then the block of round_to more
    (or the step to dense, where factoring stops paying) that keeps the most energy per weight
    is added while the weights stay within `fraction` of the dense total."""
    budget = fraction * sum(layer.dense for layer in layers)
    for layer in layers:
        layer.rank = rounded(1, round_to, layer.full)
    spent = sum(layer.cost(layer.rank) for layer in layers)
    heap: list[tuple[float, int, int, int]] = []

    def offer(i: int) -> None:
        layer = layers[i]
        if layer.rank >= layer.full:
            return
        nxt = rounded(layer.rank + 1, round_to, layer.full)
        now, then = layer.cost(layer.rank), min(layer.cost(nxt), layer.dense)
        rank = nxt if layer.cost(nxt) < layer.dense else layer.full
        gain = layer.kept(rank) - layer.kept(layer.rank)
        heapq.heappush(heap, (-gain / max(1, then - now), i, rank, then - now))

    for i in range(len(layers)):
        offer(i)
    while heap:
        _, i, rank, extra = heapq.heappop(heap)
        if spent + extra > budget:
            continue  # this layer stops here; the ranks of the others may still grow
        spent += extra
        layers[i].rank = rank
        offer(i)


# -- the rewrite ------------------------------------------------------------------------------
def factor(torch: Any, gm: Any, layer: Layer, index: int) -> None:
    """linear(x, W, b) -> linear(linear(x, V), U, b); conv(x, W, b, ...) -> 1x1 conv of
    conv(x, V, None, ...) by U, plus b. sqrt(S) goes to both factors."""
    node, r, graph = layer.node, layer.rank, gm.graph
    root = layer.s[:r].sqrt()
    down = (root[:, None] * layer.vh[:r]).float().contiguous().reshape(r, *layer.shape[1:])
    spatial = len(layer.shape) - 2
    up = (layer.u[:, :r] * root).float().contiguous().reshape(layer.out, r, *[1] * spatial)
    names = _free_name(gm, f"low_rank_{index}_down"), _free_name(gm, f"low_rank_{index}_up")
    set_param(torch, gm, names[0], down)
    set_param(torch, gm, names[1], up)
    x, bias, rest = node.args[0], node.args[2] if len(node.args) > 2 else None, node.args[3:]
    with graph.inserting_before(node):
        v, u = graph.get_attr(names[0]), graph.get_attr(names[1])
        inner = graph.call_function(node.target, (x, v, None, *rest), dict(node.kwargs))
    if aten_op(node) == "linear":
        node.args = (inner, u, bias)
        return
    node.target = torch.ops.aten.convolution.default
    node.args = (inner, u, bias, [1] * spatial, [0] * spatial, [1] * spatial, False,
                 [0] * spatial, 1)
    node.kwargs = {}


def _free_name(gm: Any, name: str) -> str:
    """`name`, or name_2, name_3...: a model factored before (low_rank run twice) already holds
    low_rank_0_down, and overwriting it would change the layer that reads it."""
    taken, candidate, n = dict(gm.named_parameters()) | dict(gm.named_buffers()), name, 1
    while candidate in taken or hasattr(gm, candidate):
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def drop_unused_weights(gm: Any, targets: list[str]) -> None:
    """Delete the dense weights no node reads any more, so the saved program does not carry
    them."""
    gm.graph.eliminate_dead_code()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets:
        if target not in read:
            owner, _, attr = target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.graph.lint()
    gm.recompile()


# -- notes and fine-tuning -----------------------------------------------------------------
def rule_text(config: Any, fraction: float) -> str:
    if config.param_budget is not None:
        return (f"param_budget {config.param_budget:g}: {fraction:.1%} of the factorable "
                "weights kept")
    return f"energy {config.energy or DEFAULT_ENERGY:g} per layer"


def factor_note(chosen: list[Layer], left: list[str], rule: str, before: dict[str, int],
                after: dict[str, int]) -> str:
    done = ", ".join(f"{layer.label} rank {layer.rank}/{layer.full} keeping "
                     f"{layer.kept(layer.rank):.1%} energy" for layer in chosen)
    text = (f"low_rank: factored {len(chosen)} of {len(chosen) + len(left)} layers by truncated "
            f"SVD ({rule}): {done}")
    if left:
        text += "; left dense: " + "; ".join(left)
    return text + f"; {stats_note(before, after)}"


class FineTune:
    """Made on the unchanged graph (the original's outputs and loss), run on the factored one:
    the shared Trainer loop, and a note on what it recovered."""

    def __init__(self, torch: Any, gm: Any, data: dict[str, np.ndarray], labels: Any,
                 signature: Any, config: Any, ctx: PassContext):
        self.torch, self.signature, self.config, self.ctx = torch, signature, config, ctx
        self.reference = outputs(torch, gm, data, signature)
        kind, targets = loss_plan(config.loss, self.reference, labels)
        self.trainer = Trainer(torch, gm, data, targets, kind, signature, steps=config.steps,
                               batch_size=config.batch_size,
                               learning_rate=config.learning_rate, seed=config.seed,
                               name="low_rank", ctx=ctx)
        self.rows = {k: v[:512] for k, v in data.items()}  # where closeness is measured
        self.checked = len(next(iter(self.rows.values())))
        self.original_loss = self.trainer.evaluate()

    def run(self, until: float, by_run: bool, total: int) -> str:
        trainer, config = self.trainer, self.config
        factored_loss, before = trainer.evaluate(), self.closeness()
        done = trainer.train(until)
        trained_loss, after = trainer.evaluate(), self.closeness()
        stopped = stopped_note(done, config.steps, by_run, config.max_seconds)
        used = (f"{trainer.n}{f' of {total}' if total > trainer.n else ''} rows of "
                f"{self.ctx.training.description or 'the training data'}")
        original = "" if trainer.kind == "distill" else f"original {self.original_loss:.3g}, "
        return (f"low_rank fine-tuning: {done} steps ({LOSSES[trainer.kind]}, {used}{stopped}), "
                f"loss {original}factored {factored_loss:.3g} -> {trained_loss:.3g}; "
                f"{before[0]} {before[1]} -> {after[1]} on {self.checked} training rows")

    def closeness(self) -> tuple[str, str]:
        """(what is measured, its value) against the original's outputs: arg-max agreement for
        class scores, else relative L2 error."""
        got = outputs(self.torch, self.trainer.module, self.rows, self.signature)[0]
        ref = self.reference[0][:len(got)]
        if ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f":
            agree = (ref.argmax(1) == got.argmax(1)).mean()
            return "arg-max agreement with the original", f"{agree:.1%}"
        error = np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-12)
        return "relative error to the original", f"{error:.3g}"
