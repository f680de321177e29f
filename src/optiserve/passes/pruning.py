"""Unstructured magnitude pruning and the lottery ticket, on the PyTorch original.

Both zero the Conv/Linear weights of smallest magnitude (|w|, i.e. L1 per weight), over all
layers together (`global`: layers with many redundant weights give up more) or the same
fraction of each (`per_layer`). The last layer is left dense by default: it is small (the
classes x features of the head) and pruning it costs the most accuracy per weight removed.

- **pruning** (MagnitudePruning): prune to the target at once, or in `schedule_steps`
  increments along Zhu & Gupta's cubic schedule (2017), fine-tuning between them; the masks are
  re-applied after every optimizer step, so a pruned weight stays exactly zero.
- **lottery_ticket** (LotteryTicket): iterative magnitude pruning with weight rewinding
  (Frankle & Carbin 2019; Frankle et al. 2020): train, prune a fraction of the weights still
  alive, rewind the survivors to an early checkpoint, train again. The "initialization" is the
  stored model's weights, as for pre-trained networks (Chen et al. 2020), unless
  `reinitialize` retrains from random weights (for models small enough to train here). Each
  round is scored on a held-out slice of the training rows: the sparsity/accuracy curve.

Zeros that are not in blocks do not make a dense kernel faster: ONNX Runtime's and OpenVINO's
CPU kernels multiply them like any other weight. The notes say so; the gain is in size, which
onnx_conversion's `sparse_weights` option realizes by storing mostly-zero weights as ONNX
sparse initializers (ONNX Runtime reads them; graph_optimization, quantization and OpenVINO
cannot, so only a last onnx_conversion should).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from optiserve.core.types import Signature
from optiserve.passes.base import Artifact, PassContext, PassSkipped
from optiserve.passes.fx import CONV, aten_op, get_attr
from optiserve.passes.training import (LOSSES, Trainer, TrainingConfig, TrainingJob, TrainingPass,
                                       deadline, loss_plan, model_stats, outputs, save_program,
                                       stats_meta, stats_note, stopped_note, training_rows)

DENSE_RUNTIMES = ("unstructured zeros do not make a dense runtime faster: ONNX Runtime and "
                  "OpenVINO CPU kernels compute them; the gain is in size (compressed storage): "
                  "onnx_conversion with sparse_weights: true stores them as ONNX sparse "
                  "initializers, when it is the last pass")
#: tried in this order; the next only when the previous one failed the accuracy gate
SPARSITY_SEARCH = (0.8, 0.5)
_SHOWN_LAYERS = 12  # per-layer sparsities listed in a note; the rest are summarized
_EVALUATED_ROWS = 512  # rows Trainer.evaluate() reads: kept even when the steps read fewer


class _Common(TrainingConfig):
    """Options both pruning passes share."""

    scope: Literal["global", "per_layer"] = Field(
        "global", description="global: one magnitude threshold over all pruned layers, so "
        "layers with many redundant weights give up more; per_layer: the same fraction of "
        "every layer.")
    skip_last_layer: bool = Field(
        True, description="Leave the last Conv/Linear layer dense: it is small and pruning it "
        "costs the most accuracy per weight removed.")
    max_seconds: float = Field(
        120, gt=0, description="Stop training once the pass has run this long; the weights "
        "are still pruned to the target and the note says so.")
    seed: int = Field(0, description="Seed of the batch order (and of the held-out split).")


# -- the passes ------------------------------------------------------------------------------
class MagnitudePruning(TrainingPass):
    """Zeros the smallest-magnitude Conv/Linear weights, fine-tuning with the masks kept."""

    name = "pruning"
    feature = "Magnitude pruning (pruning)"
    kind = "alternative"  # the unshrunk model goes on beside it

    class Config(_Common):
        sparsity: float | None = Field(
            None, ge=0, lt=1, description="Fraction of the pruned layers' weights set to zero. "
            "Unset: 0.8, then 0.5 if 0.8 fails the accuracy gate.",
            json_schema_extra={"search": list(SPARSITY_SEARCH), "retry": True})
        schedule_steps: int = Field(
            3, ge=1, description="Pruning increments: 1 prunes to the target at once; n raises "
            "the sparsity in n steps along a cubic schedule (Zhu & Gupta 2017), fine-tuning "
            "between them, which keeps more accuracy at high sparsity.")
        steps: int = Field(300, ge=0, description="Fine-tuning optimizer steps in all, shared "
                           "between the increments; 0 prunes without fine-tuning.")

    def rows(self, artifact: Artifact, config: Config, ctx: PassContext):
        return training_rows(artifact, ctx, self.name, seed=config.seed,
                             keep=max(config.steps * config.batch_size, _EVALUATED_ROWS))

    def train(self, artifact: Artifact, config: Config, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        target = SPARSITY_SEARCH[0] if config.sparsity is None else config.sparsity
        _check_target(target)
        job = _layers(job, config, artifact.signature)
        torch, layers = job.torch, job.layers
        trainer = Trainer(torch, job.gm, job.data, job.targets, job.kind, artifact.signature,
                          steps=config.steps, batch_size=config.batch_size,
                          learning_rate=config.learning_rate, seed=config.seed,
                          name=self.name, ctx=ctx)
        dense = trainer.evaluate()
        until, by_run = deadline(ctx, config.max_seconds, job.started)
        done, pruned = _prune_gradually(torch, layers, trainer, config, target, until)
        prune_to(torch, layers, target, config.scope)  # reached even when time ran out
        after = trainer.evaluate()
        losses = (f"{dense:.3g} dense, {pruned:.3g} right after pruning, {after:.3g} fine-tuned"
                  if 0 < config.steps == done else f"{dense:.3g} dense, {after:.3g} pruned")
        out = save_program(torch, job.gm, artifact.signature, job.data,
                           ctx.workdir / "pruned.pt2")
        how = (f"in {config.schedule_steps} increments (cubic schedule), "
               if config.schedule_steps > 1 else "at once, ")
        note = (f"pruning: {config.scope.replace('_', '-')} L1 magnitude to "
                f"{target:.0%} {how}{done} fine-tuning steps ({_rows(job, trainer, ctx)}"
                f"{stopped_note(done, config.steps, by_run, config.max_seconds)}); loss {losses}")
        return _finish(artifact, self.name, config, job, out, [note], {})


def _prune_gradually(torch: Any, layers: list[Layer], trainer: Trainer, config: Any,
                     target: float, until: float) -> tuple[int, float]:
    """(fine-tuning steps done, the loss right after the last increment's pruning): prune
    along the cubic schedule, fine-tuning with the masks kept after each increment."""
    done, pruned = 0, float("nan")
    for i, steps in enumerate(_split(config.steps, config.schedule_steps), start=1):
        prune_to(torch, layers, _cubic(target, i, config.schedule_steps), config.scope)
        pruned = trainer.evaluate()
        trainer.seed = config.seed + i  # a fresh batch order per increment
        got = trainer.train(until, steps=steps, after_step=lambda _: apply_masks(torch, layers))
        done += got
        if got < steps:
            break
    return done, pruned


class LotteryTicket(TrainingPass):
    """Iterative magnitude pruning with rewinding; reports the sparsity/accuracy curve."""

    name = "lottery_ticket"
    feature = "The lottery ticket (lottery_ticket)"
    kind = "alternative"  # the unshrunk model goes on beside it

    class Config(_Common):
        sparsity: float = Field(0.8, ge=0, lt=1, description="Fraction of the pruned layers' "
                                "weights zero after the last round.")
        rounds: int = Field(3, ge=1, description="Prune-rewind-train rounds; each prunes the "
                            "same fraction of the weights still alive.")
        steps: int = Field(300, ge=1, description="Training steps per round (and of the dense "
                           "training before the first pruning).")
        rewind_step: int = Field(
            30, ge=0, description="Survivors are rewound to their values after this many "
            "steps of the dense training (0: the starting weights); an early checkpoint "
            "rather than the start keeps deeper networks trainable (Frankle et al. 2020).")
        reinitialize: bool = Field(
            False, description="Start from fresh random weights instead of the stored ones "
            "(the original lottery ticket experiment); only for models small enough to train "
            "from scratch in `rounds` x `steps` steps.")
        holdout: float = Field(0.2, gt=0, lt=1, description="Fraction of the training rows "
                               "held out to score each round (accuracy for class labels, "
                               "else the loss).")

        @model_validator(mode="after")
        def _rewind_within_training(self) -> LotteryTicket.Config:
            if self.rewind_step > self.steps:
                raise ValueError(f"rewind_step {self.rewind_step} is past the {self.steps} "
                                 "training steps; give rewind_step <= steps")
            return self

    def rows(self, artifact: Artifact, config: Config, ctx: PassContext):
        keep = int(max(config.steps * config.batch_size, _EVALUATED_ROWS)
                   / (1 - config.holdout)) + 1  # the held-out rows come on top
        return training_rows(artifact, ctx, self.name, keep=keep, seed=config.seed)

    def train(self, artifact: Artifact, config: Config, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        _check_target(config.sparsity)
        job = _layers(job, config, artifact.signature)
        torch, layers, sig = job.torch, job.layers, artifact.signature
        train, held = _split_rows(job, config.holdout, config.seed)
        trainer = Trainer(torch, job.gm, *train, job.kind, sig, steps=config.steps,
                          batch_size=config.batch_size, learning_rate=config.learning_rate,
                          seed=config.seed, name=self.name, ctx=ctx)
        judge = _Judge(torch, job.gm, *held, job.kind, sig)
        if config.reinitialize:
            _reinitialize(torch, job.gm, config.seed)
        until, by_run = deadline(ctx, config.max_seconds, job.started)
        curve, finished = _rounds(torch, job.gm, layers, trainer, judge, config, until)
        if not finished:  # out of time: the target is still met, by magnitude alone
            prune_to(torch, layers, config.sparsity, config.scope)
        out = save_program(torch, job.gm, sig, job.data, ctx.workdir / "lottery_ticket.pt2")
        stopped = "" if finished else stopped_note(0, 1, by_run, config.max_seconds)
        note = (f"lottery ticket: {config.scope.replace('_', '-')} L1 magnitude, "
                f"{config.rounds} round(s) pruning {_rate(config):.0%} of the surviving weights "
                f"each, rewound to step {config.rewind_step}"
                f"{' of fresh random weights' if config.reinitialize else ''}, "
                f"{config.steps} steps per round ({_rows(job, trainer, ctx)}, "
                f"{judge.n} more held out to score the rounds{stopped}"
                f"{'; the target reached by magnitude without retraining' if stopped else ''})"
                ": " + _curve_text(curve))
        return _finish(artifact, self.name, config, job, out, [note], {"lottery_curve": curve})


def _rate(config: LotteryTicket.Config) -> float:
    """The fraction of the surviving weights each round prunes to reach the target."""
    return 1 - (1 - config.sparsity) ** (1 / config.rounds)


def _rounds(torch: Any, gm: Any, layers: list[Layer], trainer: Trainer, judge: _Judge,
            config: LotteryTicket.Config, until: float) -> tuple[list[dict], bool]:
    """(the curve, whether every round ran): dense training (keeping the checkpoint at
    rewind_step), then per round: prune, rewind the survivors, train, score."""
    checkpoint = _snapshot(gm)

    def keep_checkpoint(step: int) -> None:
        if step + 1 == config.rewind_step:
            checkpoint.update(_snapshot(gm))

    done = trainer.train(until, after_step=keep_checkpoint)
    curve = [{"round": 0, "sparsity": 0.0, **judge.score()}]
    for r in range(1, config.rounds + 1):
        if done < config.steps * r:
            return curve, False
        level = config.sparsity if r == config.rounds else 1 - (1 - _rate(config)) ** r
        prune_to(torch, layers, level, config.scope)
        _rewind(torch, gm, checkpoint, layers)
        done += trainer.train(until, after_step=lambda _: apply_masks(torch, layers))
        curve.append({"round": r, "sparsity": round(level, 4), **judge.score()})
    return curve, done == config.steps * (config.rounds + 1)


# -- masks -----------------------------------------------------------------------------------
@dataclass
class Layer:
    """A pruned layer: its name, its weight (an nn.Parameter of the graph) and its mask
    (True: kept)."""

    name: str
    weight: Any
    mask: Any


def prunable_layers(torch: Any, gm: Any, skip_last: bool) -> tuple[list[Layer], list[str]]:
    """(the layers to prune, every Conv/Linear layer's name in graph order). Weights computed
    from the input, or shared with the skipped last layer, are left alone."""
    nodes = [n for n in gm.graph.nodes if aten_op(n) in (*CONV, "linear")
             and getattr(n.args[1], "op", None) == "get_attr"]
    if not nodes:
        ops = sorted({aten_op(n) for n in gm.graph.nodes} - {""})
        raise PassSkipped("no Conv or Linear layer with a stored weight to prune; the graph "
                          "has " + (", ".join(ops[:8]) or "no aten operators"))
    targets = list(dict.fromkeys(n.args[1].target for n in nodes))
    last = nodes[-1].args[1].target
    pruned = [t for t in targets if t != last] if skip_last else targets
    if not pruned:
        raise PassSkipped("the model's only Conv/Linear layer is its last one, which "
                          "skip_last_layer leaves dense; set skip_last_layer false to prune it")
    layers = []
    for target in pruned:
        weight = get_attr(gm, target)
        layers.append(Layer(_layer_name(target), weight,
                            torch.ones_like(weight, dtype=torch.bool)))
    return layers, [_layer_name(t) for t in targets]


def _layer_name(target: str) -> str:
    """'hidden' for hidden.weight, 'conv2d' for conv2d_folded_weight (BatchNorm folded)."""
    for suffix in (".weight", "_weight"):
        if target.endswith(suffix):
            return target[:-len(suffix)]
    return target


def prune_to(torch: Any, layers: list[Layer], sparsity: float, scope: str) -> None:
    """Masks with `sparsity` of the weights zero (over all layers together, or in each), the
    smallest |w| first; a weight pruned before stays pruned (its magnitude is 0)."""
    groups = [layers] if scope == "global" else [[layer] for layer in layers]
    with torch.no_grad():
        for group in groups:
            flat = torch.cat([(g.weight * g.mask).abs().flatten() for g in group])
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            k = int(round(sparsity * flat.numel()))
            if k:
                keep[torch.argsort(flat, stable=True)[:k]] = False
            start = 0
            for g in group:
                n = g.weight.numel()
                g.mask &= keep[start:start + n].view_as(g.mask)
                start += n
    apply_masks(torch, layers)


def apply_masks(torch: Any, layers: list[Layer]) -> None:
    """Zero the pruned weights again: run after every optimizer step, which moves them."""
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(layer.mask)


def _cubic(target: float, i: int, n: int) -> float:
    """Sparsity after increment i of n (Zhu & Gupta 2017): fast at first, gentle at the end,
    when fewer weights are left to absorb the loss."""
    return target * (1 - (1 - i / n) ** 3)


def _split(steps: int, parts: int) -> list[int]:
    return [steps // parts + (1 if i < steps % parts else 0) for i in range(parts)]


def _check_target(sparsity: float) -> None:
    if sparsity == 0:
        raise PassSkipped("sparsity 0 prunes nothing; give a target in (0, 1), e.g. 0.5")


# -- lottery ticket --------------------------------------------------------------------------
def _snapshot(gm: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in gm.named_parameters()}


def _rewind(torch: Any, gm: Any, checkpoint: dict[str, Any], layers: list[Layer]) -> None:
    """Every weight back to the checkpoint, the pruned ones to zero."""
    with torch.no_grad():
        for name, p in gm.named_parameters():
            p.copy_(checkpoint[name])
    apply_masks(torch, layers)


def _reinitialize(torch: Any, gm: Any, seed: int) -> None:
    """Fresh weights and biases for every Conv/Linear layer (the last one too), drawn as
    torch's own layers draw them: uniform within 1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if aten_op(node) not in (*CONV, "linear"):
                continue
            weight = node.args[1]
            fan_in = int(np.prod(get_attr(gm, weight.target).shape[1:])) or 1
            for arg in node.args[1:3]:
                if getattr(arg, "op", None) == "get_attr":
                    t = get_attr(gm, arg.target)
                    t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) / np.sqrt(fan_in))


def _split_rows(job: SimpleNamespace, holdout: float, seed: int) -> tuple[tuple, tuple]:
    """((train inputs, targets), (held-out inputs, targets)): a seeded random slice held out,
    so sorted rows (all of one class last) still give a fair score."""
    n = len(job.targets[0])
    held = max(1, int(round(holdout * n)))
    if n - held < 1:
        raise PassSkipped(f"the training data has {n} row(s): too few to hold out "
                          f"{holdout:.0%} for scoring the rounds and train on the rest")
    order = np.random.default_rng(seed).permutation(n)
    parts = []
    for idx in (np.sort(order[held:]), np.sort(order[:held])):
        parts.append(({k: np.ascontiguousarray(v[idx]) for k, v in job.data.items()},
                      [np.ascontiguousarray(t[idx]) for t in job.targets]))
    return parts[0], parts[1]


class _Judge:
    """Scores the model on the held-out rows: the loss, and the accuracy when the loss is
    against class ids (a few hundred rows move the accuracy in coarse steps; the loss shows
    the rest)."""

    def __init__(self, torch, gm, rows, targets, kind, signature):
        self.torch, self.gm, self.rows, self.targets = torch, gm, rows, targets
        self.kind, self.signature, self.n = kind, signature, len(targets[0])
        self.loss = Trainer(torch, gm, rows, targets, kind, signature, steps=0,
                            batch_size=256, learning_rate=1.0, seed=0, name="held-out")

    def score(self) -> dict[str, float]:
        loss = {"loss": round(self.loss.evaluate(), 6)}
        if self.kind != "cross_entropy":
            return loss
        pred = outputs(self.torch, self.gm, self.rows, self.signature)[0].argmax(1)
        return {"accuracy": round(float((pred == self.targets[0]).mean()), 4), **loss}


def _curve_text(curve: list[dict[str, float]]) -> str:
    """'dense acc 0.960 (loss 0.12); round 1: sparsity 42% acc 0.955 (loss 0.14); ...'."""
    def value(point: dict[str, float]) -> str:
        loss = f"loss {point['loss']:.3g}"
        return f"acc {point['accuracy']:.3f} ({loss})" if "accuracy" in point else loss
    return "; ".join("dense " + value(p) if p["round"] == 0 else
                     f"round {p['round']}: sparsity {p['sparsity']:.0%} {value(p)}"
                     for p in curve)


# -- shared set-up and output ----------------------------------------------------------------
def _layers(job: TrainingJob, config: Any, signature: Signature) -> SimpleNamespace:
    """The job with the loss and the layers to prune."""
    torch, gm, data = job.torch, job.gm, job.data
    kind, targets = loss_plan(config.loss, outputs(torch, gm, data, signature), job.labels)
    layers, names = prunable_layers(torch, gm, config.skip_last_layer)
    return SimpleNamespace(torch=torch, data=data, total=job.total, args=job.args, gm=gm,
                           started=job.started, kind=kind, targets=targets, layers=layers,
                           names=names, before=model_stats(torch, gm, job.args))


def _rows(job: SimpleNamespace, trainer: Trainer, ctx: PassContext) -> str:
    """'cross-entropy against the labels, 1078 of 1347 rows of digits': the rows read (a
    random subset when the steps cannot read them all)."""
    read = len(job.targets[0])
    shown = f"{trainer.n}{f' of {job.total}' if job.total > read else ''}"
    return (f"{LOSSES[job.kind]}, {shown} rows of "
            f"{ctx.training.description or 'the training data'}")


def _finish(artifact: Artifact, name: str, config: BaseModel, job: SimpleNamespace, out: Any,
            notes: list[str], meta: dict[str, Any]) -> Artifact:
    """The .pt2 artifact, with the per-layer sparsity, size and the dense-runtime notes."""
    torch = job.torch
    zeros = {layer.name: int((layer.weight == 0).sum()) for layer in job.layers}
    sizes = {layer.name: layer.weight.numel() for layer in job.layers}
    pruned = sum(zeros.values()) / max(1, sum(sizes.values()))
    all_weights = [get_attr(job.gm, t) for t in _weight_targets(job.gm)]
    overall = (sum(int((w == 0).sum()) for w in all_weights)
               / max(1, sum(w.numel() for w in all_weights)))
    per_layer = [f"{n}: {zeros[n] / sizes[n]:.0%}" if n in zeros else f"{n}: dense"
                 for n in job.names]
    if len(per_layer) > _SHOWN_LAYERS:
        per_layer = per_layer[:_SHOWN_LAYERS] + [f"{len(per_layer) - _SHOWN_LAYERS} more"]
    notes = [*notes,
             f"sparsity {pruned:.1%} of the pruned weights, {overall:.1%} of all Conv/Linear "
             f"weights; per layer: {', '.join(per_layer)}",
             stats_note(job.before, after := model_stats(torch, job.gm, job.args)),
             DENSE_RUNTIMES]
    return artifact.then(out, name, config, format="pt2", signature=artifact.signature,
                         notes=notes, meta={**meta, "sparsity": round(overall, 4),
                                            "pruned_sparsity": round(pruned, 4),
                                            **stats_meta(job.before, after)})


def _weight_targets(gm: Any) -> list[str]:
    return list(dict.fromkeys(n.args[1].target for n in gm.graph.nodes
                              if aten_op(n) in (*CONV, "linear")
                              and getattr(n.args[1], "op", None) == "get_attr"))
