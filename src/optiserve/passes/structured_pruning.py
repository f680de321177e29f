"""Structured pruning: whole output channels of Conv layers and neurons of Linear layers are
removed, so the tensors really shrink (unstructured zeros only shrink a file).

The model is read as an FX graph (fx.graph_module), the form every registered PyTorch
model (a TorchScript or torch.export file) reaches; Torch-Pruning would need the nn.Module
layers, which the registry no longer has. passes/channels.py finds the channels that must go
together; an operator it cannot follow skips the pass, naming the layer and the operator, and
suggesting ignore_layers.

Each step keeps the most important channels (L1/L2 norm of their weights), rounded to a
hardware-friendly multiple, is timed in ONNX Runtime against the model before it and kept
only when it is faster, then fine-tuned (passes/training.py). The result is a .pt2 program.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optiserve.bench.isolated import time_in_turns
from optiserve.core.errors import ConfigError, OptiserveError, first_line
from optiserve.passes.base import Artifact, PassContext, PassSkipped
from optiserve.passes.channels import (Group, blocked_error, channel_groups, drop_unused,
                                       kept_count, layer_label, layer_names,
                                       left_alone, prunable, shrink)
from optiserve.passes.fx import quiet
from optiserve.passes.training import (LOSSES, Trainer, TrainingConfig, TrainingJob, TrainingPass,
                                       deadline, loss_plan, model_stats, outputs, save_program,
                                       stats_meta, stats_note, stopped_note, training_rows)


# -- the pass --------------------------------------------------------------------------------
class StructuredPruning(TrainingPass):
    """Removes whole channels / neurons, keeps each step only if ONNX Runtime runs it faster,
    fine-tunes, and writes a .pt2 program with the smaller tensors."""

    name = "structured_pruning"
    feature = "Structured pruning"
    kind = "alternative"  # the unshrunk model goes on beside it

    class Config(TrainingConfig):
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

    def rows(self, artifact: Artifact, config: Config, ctx: PassContext):
        return training_rows(artifact, ctx, self.name,
                             keep=max(config.steps * config.batch_size, 512), seed=config.seed)

    def train(self, artifact: Artifact, config: Config, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        torch, data, total, args, gm = job.torch, job.data, job.total, job.args, job.gm
        sig = artifact.signature
        check_ignored(gm, config.ignore_layers)
        round_to = config.round_to or default_round_to(ctx)
        groups = channel_groups(torch, gm, args, set(config.ignore_layers))
        error = blocked_error(groups)
        if error is not None:
            raise error
        if not prunable(groups, round_to):
            raise PassSkipped(f"no layer has more than round_to={round_to} channels that can be "
                              f"pruned{left_alone(groups, round_to)}")
        kind, targets = loss_plan(config.loss, outputs(torch, gm, data, sig), job.labels)
        until, by_run = deadline(ctx, config.max_seconds, job.started)
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
                + f"; {stats_note(stats_start, stats_end := model_stats(torch, gm, args))}; "
                f"{job.done} steps "
                f"of fine-tuning ({LOSSES[kind]}, {rows}{f' of {total}' if total > rows else ''}"
                f" rows of {ctx.training.description or 'the training data'}{stopped}), loss "
                f"{loss_start:.3g} unpruned -> {job.trainer.evaluate():.3g}"
                + left_alone(groups, round_to))
        return artifact.then(out, self.name, config, format="pt2", notes=[note],
                             meta=stats_meta(stats_start, stats_end))


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
            with torch.no_grad(), quiet("torch.onnx"):
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
        try:
            return time_in_turns(paths, self.signature, self.rows,
                                 threads=self.ctx.settings.threads,
                                 hint="Lower timing_batch_size, or set require_faster=false.")
        except OptiserveError as exc:
            raise PassSkipped(f"timing the pruned model: {exc}") from None
