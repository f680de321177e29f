"""Knowledge distillation: a smaller student learns to give the teacher's outputs.

The teacher is the artifact (read as an FX graph like every training pass). The student is
either a file the user gives (`student`: TorchScript or torch.export, e.g. written from an
nn.Module by `save_student`), or derived from the teacher by the structured pruner's channel
surgery (`width`: the fraction of channels kept in every layer it can follow), starting from
the teacher's most important channels (`init: teacher`, fast to converge) or from fresh
weights (`init: random`, classic distillation).

The loss follows the output. Class scores: Hinton's KL divergence between the softened
teacher and student distributions (temperature T, scaled by T^2 so its gradients keep their
size), weighted `alpha` against cross-entropy on the hard labels when the training data has
them. Embeddings or other outputs (an encoder such as MiniLM): cosine distance or MSE to the
teacher's outputs. A student whose outputs are not shaped like the teacher's is the request's
mistake: a ConfigError naming both shapes, raised before any training, so nothing is stored.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from optiserve.core.deps import require
from optiserve.core.errors import ConfigError, first_line
from optiserve.passes.base import (Artifact, DataPath, PassContext,
                                   PassSkipped)
from optiserve.passes.fx import graph_module
from optiserve.passes.channels import (channel_groups, drop_unused, kept_count, layer_parts,
                                       left_alone, prunable, shrink)
from optiserve.passes.structured_pruning import default_round_to
from optiserve.passes.training import (Trainer, TrainingConfig, TrainingJob, TrainingPass, as_list,
                                       deadline, model_stats, outputs, save_program, stats_meta,
                                       stats_note, stopped_note)

LOSSES = {"kl": "KL divergence to the teacher's softened class scores",
          "cosine": "cosine distance to the teacher's outputs",
          "mse": "MSE to the teacher's outputs"}


class Distillation(TrainingPass):
    """Trains a smaller student on the teacher's outputs and writes it as a .pt2 program."""

    name = "distillation"
    feature = "Knowledge distillation"
    kind = "alternative"  # the unshrunk model goes on beside it

    class Config(TrainingConfig):
        student: Annotated[str | None, DataPath("Student model file")] = Field(
            None, description="Path of the student: a TorchScript (.pt) or torch.export (.pt2) "
            "file taking the teacher's inputs and giving outputs of the teacher's shapes "
            "(optiserve.passes.distillation.save_student writes one from an nn.Module). "
            "Unset: derived from the teacher with `width`.")
        width: float = Field(
            0.5, gt=0, le=1, description="Derived student: the fraction of channels / neurons "
            "kept in every layer the structured pruner can follow (others keep theirs).")
        init: Literal["teacher", "random"] = Field(
            "teacher", description="Derived student's starting weights: the teacher's most "
            "important channels (converges in far fewer steps), or fresh random weights.")
        round_to: int | None = Field(
            None, ge=1, description="Derived student: channel counts are multiples of this, "
            "as in structured_pruning (default 16 on AVX-512 CPUs, else 8).")
        loss: Literal["auto", "kl", "cosine", "mse"] = Field(
            "auto", description="kl: the teacher's softened class scores (+ cross-entropy on "
            "the labels, if any); cosine or mse: to the teacher's outputs (embeddings: cosine "
            "when they are compared by cosine similarity). auto: kl when the training data "
            "has integer labels for the model's class scores, else mse.")
        temperature: float = Field(
            4.0, gt=0, description="kl: softmax temperature; higher shows the student more of "
            "the teacher's ranking of the wrong classes.")
        alpha: float = Field(
            0.7, ge=0, le=1, description="kl with labels: weight of the soft (teacher) loss; "
            "1 - alpha goes to cross-entropy on the hard labels.")
        steps: int = Field(500, ge=1, description="Optimizer steps of training.")
        learning_rate: float | None = Field(
            None, gt=0, description="Adam learning rate; default 1e-3 for a student starting "
            "from the teacher's weights, 3e-3 for fresh weights (random, or a given file).")
        seed: int = Field(0, description="Seed of the batch order and of random weights.")

    def train(self, artifact: Artifact, config: Config, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        torch, data, total, args, teacher = job.torch, job.data, job.total, job.args, job.gm
        sig = artifact.signature
        if config.student:
            student, made = load_student(torch, Path(config.student).expanduser(), args)
        else:
            student, made = derive_student(torch, teacher, args, config, ctx)
        check_outputs(torch, teacher, student, args)
        reference = outputs(torch, teacher, data, sig)
        kind, hard = distill_plan(config.loss, reference, job.labels)
        trainer = _DistillTrainer(torch, student, data, reference, kind, sig, config, hard, ctx)
        before = trainer.evaluate()
        until, by_run = deadline(ctx, config.max_seconds, job.started)
        done = trainer.train(until)
        after = trainer.evaluate()
        agreement = _agreement(kind, reference, outputs(torch, student, data, sig))
        sizes = (model_stats(torch, teacher, args), model_stats(torch, student, args))
        drop_unused(student)
        out = save_program(torch, student, sig, data, ctx.workdir / "distillation.pt2")
        how = (f"KL at T={config.temperature:g}" + (
            f" x {config.alpha:g} + cross-entropy on the labels x {1 - config.alpha:g}"
            if hard is not None else " (no labels: soft targets only)")
            if kind == "kl" else LOSSES[kind])
        note = (f"distillation: {made}; {done} steps ({how}, {trainer.n}"
                f"{f' of {total}' if total > trainer.n else ''} rows of "
                f"{ctx.training.description or 'the training data'}"
                f"{stopped_note(done, config.steps, by_run, config.max_seconds)}), loss "
                f"{before:.3g} -> {after:.3g}; {agreement}; teacher -> student "
                f"{stats_note(*sizes)}")
        return artifact.then(out, self.name, config, format="pt2", notes=[note],
                             meta=stats_meta(*sizes))


# -- the student ------------------------------------------------------------------------------
def save_student(module: Any, example_inputs: Any, path: str | Path) -> Path:
    """Write an nn.Module as a torch.export program (.pt2, dynamic batch) that the
    distillation pass takes as `student`: the form the registry's models are read in."""
    torch = require("torch", extra="torch", feature="Saving a distillation student")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    module.eval()
    program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args),
                                  strict=False)
    path = Path(path)
    torch.export.save(program, str(path))
    return path


def load_student(torch: Any, path: Path, args: tuple) -> tuple[Any, str]:
    """(the student file as a trainable FX graph, how it was made)."""
    if not path.is_file():
        raise ConfigError(f"The distillation student '{path}' is not a file.",
                          hint="Give `student` the path of a TorchScript (.pt) or torch.export "
                          "(.pt2) file, or leave it unset to derive one with `width`.")
    fmt = "pt2" if path.suffix == ".pt2" else "torchscript"
    try:
        student = graph_module(torch, path, fmt, args)
    except PassSkipped as exc:
        raise ConfigError(f"The distillation student '{path}' could not be read as {fmt}: "
                          f"{exc}.", hint="Write it with optiserve.passes.distillation."
                          "save_student(module, example_inputs, 'student.pt2').") from None
    return student, f"student {path.name} ({fmt}, as given)"


def derive_student(torch: Any, teacher: Any, args: tuple, config: Distillation.Config,
                   ctx: PassContext) -> tuple[Any, str]:
    """The teacher with `width` of the channels of every layer the structured pruner can
    follow (the most important ones by L1 norm), re-initialised when init is random."""
    round_to = config.round_to or default_round_to(ctx)
    student = copy.deepcopy(teacher)
    groups = channel_groups(torch, student, args)
    keep_of = {g.key: kept_count(g.size, config.width, round_to)
               for g in prunable(groups, round_to)}
    changed = shrink(torch, student, groups, keep_of, "l1")
    if not changed and config.init == "teacher":
        raise PassSkipped(f"a student at width {config.width:g} would be the teacher itself: "
                          f"no layer could shrink{left_alone(groups, round_to)}")
    if config.init == "random":
        reinitialise(torch, student, config.seed)
    stuck = [g.label for g in groups if g.blocked and not g.pinned]
    return student, (
        f"student derived from the teacher at width {config.width:g} ({config.init} weights, "
        "channels " + (", ".join(f"'{k}' {a} -> {b}" for k, (a, b) in changed.items())
                       or "unchanged") + ")"
        + (f", full width where the pruner cannot follow the channels: {stuck}" if stuck else ""))


def reinitialise(torch: Any, gm: Any, seed: int) -> None:
    """Fresh weights for every Conv/Linear, as nn.Linear / nn.Conv2d initialise theirs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for node in gm.graph.nodes:
            parts = layer_parts(node)
            if parts is None or getattr(parts[0], "op", None) != "get_attr":
                continue
            weight = _attr(gm, parts[0].target)
            bound = 1 / math.sqrt(max(1, weight[0].numel()))  # kaiming_uniform(a=sqrt(5))
            weight.uniform_(-bound, bound, generator=gen)
            if getattr(parts[1], "op", None) == "get_attr":
                _attr(gm, parts[1].target).uniform_(-bound, bound, generator=gen)


def _attr(gm: Any, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def check_outputs(torch: Any, teacher: Any, student: Any, args: tuple) -> None:
    """The student must run on the teacher's inputs and give outputs of the teacher's shapes:
    otherwise a ConfigError naming both, before any training."""
    with torch.no_grad():
        want = [list(o.shape) for o in as_list(teacher(*args))]
        try:
            got = [list(o.shape) for o in as_list(student(*args))]
        except Exception as exc:  # a student of another signature fails in many ways
            raise ConfigError(f"The distillation student does not run on the teacher's inputs "
                              f"{[list(a.shape) for a in args]}: {first_line(exc, 200)}.",
                              hint="The student must take the same inputs as the teacher."
                              ) from None
    if got != want:
        raise ConfigError(f"The distillation student's outputs have shapes {got}; the "
                          f"teacher's have {want} (on a batch of {len(args[0])} rows).",
                          hint="The student must give as many outputs as the teacher, of the "
                          "same shapes (the same number of classes, the same embedding "
                          "size), so it can learn to give the same values.")


# -- the loss ---------------------------------------------------------------------------------
def distill_plan(loss: str, reference: list[np.ndarray],
                 labels: Any) -> tuple[str, np.ndarray | None]:
    """(loss kind, hard labels for the cross-entropy term or None)."""
    out, y = reference[0], None if labels is None else np.asarray(labels)
    scores = len(reference) == 1 and out.ndim == 2 and out.shape[1] > 1 and out.dtype.kind == "f"
    classes = scores and y is not None and y.dtype.kind in "iu" and y.shape == (len(out),) \
        and y.min() >= 0 and y.max() < out.shape[1]
    if loss == "auto":
        loss = "kl" if classes else "mse"
    if loss == "kl" and not scores:
        raise PassSkipped("loss kl needs one 2-D output of class scores; the teacher gives "
                          f"{[list(t.shape) for t in reference]} (use cosine or mse)")
    if not any(t.dtype.kind == "f" for t in reference):
        raise PassSkipped("distillation needs a float output; the teacher's outputs are "
                          + ", ".join(str(t.dtype) for t in reference))
    return loss, (y.astype(np.int64) if loss == "kl" and classes else None)


class _DistillTrainer(Trainer):
    """The shared loop with a distillation loss against the teacher's outputs."""

    def __init__(self, torch, student, data, reference, kind, signature, config, hard, ctx):
        fresh = config.student is not None or config.init == "random"
        super().__init__(torch, student, data, reference, kind, signature, steps=config.steps,
                         batch_size=config.batch_size,
                         learning_rate=config.learning_rate or (3e-3 if fresh else 1e-3),
                         seed=config.seed, name="distillation", ctx=ctx)
        self.temperature, self.alpha = config.temperature, config.alpha
        self.hard = None if hard is None else torch.from_numpy(hard)

    def loss(self, idx: Any) -> Any:
        outs, fn = as_list(self.module(*(x[idx] for x in self.inputs))), self.torch.nn.functional
        pairs = [(o.float(), t[idx].float()) for o, t in zip(outs, self.targets)
                 if t.dtype.is_floating_point]
        if self.kind == "kl":
            (s, t), temp = pairs[0], self.temperature
            soft = fn.kl_div(fn.log_softmax(s / temp, 1), fn.log_softmax(t / temp, 1),
                             reduction="batchmean", log_target=True) * temp * temp
            if self.hard is None:
                return soft
            return self.alpha * soft + (1 - self.alpha) * fn.cross_entropy(s, self.hard[idx])
        if self.kind == "cosine":
            return sum(1 - fn.cosine_similarity(s.flatten(1), t.flatten(1), dim=1).mean()
                       for s, t in pairs)
        return sum(fn.mse_loss(s, t) for s, t in pairs)


def _agreement(kind: str, teacher: list[np.ndarray], student: list[np.ndarray]) -> str:
    """'the student's top class is the teacher's on 97.3 % of the rows' / mean cosine."""
    if kind == "kl":
        same = (teacher[0].argmax(1) == student[0].argmax(1)).mean()
        return f"the student's top class is the teacher's on {100 * same:.1f} % of those rows"
    t, s = teacher[0].reshape(len(teacher[0]), -1), student[0].reshape(len(student[0]), -1)
    cos = (t * s).sum(1) / np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1),
                                      1e-12)
    return f"mean cosine to the teacher's output {cos.mean():.4f} on those rows"
