"""What every pass that trains a PyTorch model shares: its rows, its loss, its loop, its output.

Training-time passes (qat, pruning, lottery_ticket, structured_pruning, distillation, low_rank)
work on the PyTorch original, the source of truth for changes a graph converter cannot make.
Each is a `TrainingPass` with a `TrainingConfig`: its `run()` checks the format, loads torch,
reads the training rows and the model as an FX GraphModule (fx.graph_module: BatchNorm folded,
Conv/Linear weights trainable) into a `TrainingJob`, and hands that to the pass's `train()`,
which trains it on `ctx.training` with:

- **rows** checked against the signature (`training_rows`): a mismatch skips the pass with the
  input, shape or dtype named, never a crash mid-training;
- **a loss** (`loss_plan`): cross-entropy on integer labels when the model scores classes, MSE
  on float labels, else *distill*: MSE to the unchanged model's outputs (no labels needed);
- **a loop** (`Trainer`): Adam, a fixed batch order, stopped at the step count, the pass's
  `max_seconds` or the run's deadline (OPTIMIZATION_MAX_TIME_MINUTES), whichever comes first,
  with the loss shown on the progress bar and an `after_step` hook (pruning masks re-applied);

and save the result as a torch.export program with a dynamic batch (`save_program`), so the
next pass (another training pass, onnx_conversion, then quantization) chains on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from optiserve.convert.formats import TORCH_FORMATS
from optiserve.core.deps import require
from optiserve.core.errors import first_line
from optiserve.core.types import Signature
from optiserve.passes.base import Artifact, Pass, PassConfig, PassContext, PassSkipped
from optiserve.passes.fx import graph_module

log = logging.getLogger(__name__)

LOSSES = {"cross_entropy": "cross-entropy against the labels", "mse": "MSE against the labels",
          "distill": "MSE against the original model's outputs"}
# -- data -----------------------------------------------------------------------------------
def training_rows(artifact: Artifact, ctx: PassContext, name: str, *, keep: int | None = None,
                  seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
    """(inputs in the model's dtypes, labels, rows given): the inputs are checked against the
    signature, and at most `keep` random rows are kept (as many as the steps can read)."""
    train = ctx.training
    if train is None:
        raise PassSkipped(f"{name} needs training data: give training_dataset in the "
                          "optimization request (rows of the model's inputs; a label_column "
                          "for cross-entropy), or a DataLoader to optiserve.optimize()")
    if not train.inputs or min(len(v) for v in train.inputs.values()) == 0:
        raise PassSkipped(f"the training data has no rows ({train.description or 'empty'})")
    rows = {}
    for spec in artifact.signature.inputs:
        if spec.name not in train.inputs:
            raise PassSkipped(f"the training data has no input '{spec.name}' (it has "
                              f"{', '.join(sorted(train.inputs))})")
        arr, want = np.asarray(train.inputs[spec.name]), np.dtype(spec.dtype)
        wrong = spec.mismatch(arr.shape)
        if wrong:
            raise PassSkipped(f"training input '{spec.name}' {wrong}")
        if (arr.dtype.kind == "f") != (want.kind == "f"):
            raise PassSkipped(f"training input '{spec.name}' is {arr.dtype}; the model expects "
                              f"{want}")
        rows[spec.name] = arr.astype(want, copy=False)
    total, labels = train.n, train.labels
    if labels is not None and len(labels) != total:
        raise PassSkipped(f"the training data has {len(labels)} labels for {total} rows")
    chosen = slice(None)
    if keep is not None and total > keep:
        chosen = np.sort(np.random.default_rng(seed).choice(total, keep, replace=False))
    rows = {k: np.ascontiguousarray(v[chosen]) for k, v in rows.items()}
    return rows, None if labels is None else np.asarray(labels)[chosen], total


class TrainingConfig(PassConfig):
    """The training options every training pass has (a pass overrides a default where its
    training differs: a smaller learning rate for fine-tuning, another loss set)."""

    batch_size: int = Field(32, ge=1, description="Training rows per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    loss: Literal["auto", "cross_entropy", "mse", "distill"] = Field(
        "auto", description="cross_entropy: against integer labels (class scores); mse: "
        "against float labels; distill: mean squared error to the original model's outputs. "
        "auto: cross_entropy when the labels and the output allow it, else distill.")
    max_seconds: float = Field(
        300, gt=0, description="Stop training once the pass has run this long; the steps "
        "done so far are kept and the note says so.")
    seed: int = Field(0, description="Seed of the batch order.")


@dataclass
class TrainingJob:
    """What a training pass's `train()` starts from."""

    torch: Any
    data: dict[str, np.ndarray]  # the training inputs, in the model's dtypes
    labels: np.ndarray | None
    total: int  # rows given (data holds at most the rows the steps can read)
    args: tuple  # two rows as tensors, to trace and check shapes with
    gm: Any  # the model as an FX GraphModule
    started: float  # time.monotonic() when the pass started (for max_seconds)


class TrainingPass(Pass):
    """A pass that trains the PyTorch model. `run()` is the template every one follows; a pass
    says what torch is needed for (`feature`), how many rows to keep, and trains in
    `train()`."""

    formats = TORCH_FORMATS
    feature: ClassVar[str]  # named when torch is missing, e.g. "Structured pruning"
    Config: ClassVar[type[TrainingConfig]] = TrainingConfig

    def rows(self, artifact: Artifact, config: Any, ctx: PassContext
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
        """(inputs, labels, rows given): by default as many rows as the steps read."""
        return training_rows(artifact, ctx, self.name, keep=config.steps * config.batch_size,
                             seed=config.seed)

    def run(self, artifact: Artifact, config: Any, ctx: PassContext) -> Artifact:
        self.check_format(artifact)
        started = time.monotonic()
        torch = require("torch", extra="torch", feature=self.feature)
        data, labels, total = self.rows(artifact, config, ctx)
        args = tuple(torch.from_numpy(data[s.name][:2]) for s in artifact.signature.inputs)
        gm = graph_module(torch, artifact.path, artifact.format, args)
        return self.train(artifact, config, ctx,
                          TrainingJob(torch, data, labels, total, args, gm, started))

    def train(self, artifact: Artifact, config: Any, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        raise NotImplementedError


def loss_plan(loss: str, reference: list[np.ndarray],
              labels: Any) -> tuple[str, list[np.ndarray]]:
    """(loss kind, targets): which loss the training uses and what it compares against.
    `reference` holds the unchanged model's outputs on the training rows."""
    out, y = reference[0], None if labels is None else np.asarray(labels)
    scores = len(reference) == 1 and out.ndim == 2 and out.shape[1] > 1 and out.dtype.kind == "f"
    classes = y is not None and y.dtype.kind in "iu" and y.shape == (len(out),)
    if loss == "auto":
        loss = "cross_entropy" if scores and classes else "distill"
    if loss == "cross_entropy":
        if not (scores and classes):
            raise PassSkipped(
                "loss cross_entropy needs one 2-D output of class scores and one integer label "
                f"per row; the model gives {[list(t.shape) for t in reference]}, the labels "
                f"are {'missing' if y is None else f'{y.dtype} {list(y.shape)}'}")
        if y.min() < 0 or y.max() >= out.shape[1]:
            raise PassSkipped(f"labels run from {y.min()} to {y.max()}; the model scores "
                              f"{out.shape[1]} classes")
        return loss, [y.astype(np.int64)]
    if loss == "mse":
        if y is None or len(reference) != 1 or y.size != out.size or y.dtype.kind not in "fiu":
            raise PassSkipped(f"loss mse needs numeric labels shaped like the model's output "
                              f"{list(out.shape)}; the labels are "
                              f"{'missing' if y is None else list(y.shape)}")
        return loss, [y.astype(np.float32).reshape(out.shape)]
    if not any(t.dtype.kind == "f" for t in reference):
        raise PassSkipped("training to match the original needs a float output; the model's "
                          "outputs are " + ", ".join(str(t.dtype) for t in reference))
    return "distill", reference


def outputs(torch: Any, module: Any, data: dict[str, np.ndarray],
            signature: Signature) -> list[np.ndarray]:
    """A module's outputs on every row, in chunks of 256."""
    n, chunks = len(next(iter(data.values()))), []
    with torch.no_grad():
        for start in range(0, n, 256):
            outs = module(*(torch.from_numpy(data[s.name][start:start + 256])
                            for s in signature.inputs))
            chunks.append([o.detach().numpy() for o in as_list(outs)])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def as_list(outs: Any) -> list:
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]


# -- training --------------------------------------------------------------------------------
class Trainer:
    """Adam on `module` against `targets`; losses measured on a fixed subset of the rows.

    `steps`, `batch_size`, `learning_rate` and `seed` come from the pass's config; `name` is
    shown on the progress bar with the loss."""

    def __init__(self, torch: Any, module: Any, data: dict[str, np.ndarray],
                 targets: list[np.ndarray], kind: str, signature: Signature, *, steps: int,
                 batch_size: int, learning_rate: float, seed: int, name: str,
                 ctx: PassContext | None = None):
        self.torch, self.module, self.kind, self.name, self.ctx = torch, module, kind, name, ctx
        self.steps, self.batch_size, self.learning_rate, self.seed = (steps, batch_size,
                                                                      learning_rate, seed)
        self.inputs = [torch.from_numpy(data[s.name]) for s in signature.inputs]
        self.targets = [torch.from_numpy(t) for t in targets]
        self.n = len(self.inputs[0])

    def loss(self, idx: Any) -> Any:
        outs, fn = as_list(self.module(*(x[idx] for x in self.inputs))), self.torch.nn.functional
        if self.kind == "cross_entropy":
            return fn.cross_entropy(outs[0], self.targets[0][idx])
        return sum(fn.mse_loss(o.float(), t[idx].float()) for o, t in zip(outs, self.targets)
                   if t.dtype.is_floating_point)

    def batches(self, rows: int = 512) -> list:
        return list(self.torch.arange(min(self.n, rows)).split(self.batch_size))

    def evaluate(self) -> float:
        """Mean loss on up to 512 rows."""
        batches = self.batches()
        with self.torch.no_grad():
            total = sum(float(self.loss(idx)) * len(idx) for idx in batches)
        return total / sum(len(idx) for idx in batches)

    def train(self, deadline: float, *, steps: int | None = None,
              after_step: Callable[[int], None] | None = None,
              before_step: Callable[[int], None] | None = None) -> int:
        """Steps done: all `steps` (default: the config's), or fewer when `deadline`
        (time.monotonic) passed. `after_step(step)` runs after each optimizer step."""
        torch, steps = self.torch, self.steps if steps is None else steps
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise PassSkipped(f"{self.name}: the model has no trainable weights")
        opt = torch.optim.Adam(params, lr=self.learning_rate)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.empty(0, dtype=torch.long)
        shown = max(1, steps // 20)
        for step in range(steps):
            if time.monotonic() > deadline:
                log.warning("%s: stopped after %d of %d steps (time limit)", self.name, step,
                            steps)
                return step
            if before_step:
                before_step(step)
            if len(order) < self.batch_size:
                order = torch.cat([order, torch.randperm(self.n, generator=gen)])
            idx, order = order[:self.batch_size], order[self.batch_size:]
            opt.zero_grad()
            loss = self.loss(idx)
            loss.backward()
            opt.step()
            if after_step:
                after_step(step)
            if step % shown == 0 or step == steps - 1:
                self.show(f"{self.name}: step {step + 1}/{steps}, {self.kind} loss "
                          f"{loss.item():.4f}")
        return steps

    def show(self, message: str) -> None:
        log.info(message)
        if self.ctx is not None and self.ctx.progress is not None:
            self.ctx.progress(message, 0)


def deadline(ctx: PassContext, max_seconds: float, started: float) -> tuple[float, bool]:
    """(when to stop, whether the run's limit is the nearer one)."""
    own = started + max_seconds
    by_run = ctx.deadline is not None and ctx.deadline < own
    return (ctx.deadline if by_run else own), by_run


def stopped_note(done: int, steps: int, by_run: bool, max_seconds: float) -> str:
    if done >= steps:
        return ""
    return (", stopped by OPTIMIZATION_MAX_TIME_MINUTES" if by_run
            else f", stopped by max_seconds={max_seconds:g}")


# -- output ---------------------------------------------------------------------------------
def save_program(torch: Any, module: Any, signature: Signature, data: dict[str, np.ndarray],
                 out: Path) -> Path:
    """The trained module as a torch.export program (.pt2) with a dynamic batch dimension,
    so onnx_conversion and the next training pass can read it."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(data[s.name][:2]))
                 for s in signature.inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {s.name: {0: batch} for s in signature.inputs}
    module.eval()
    try:
        with torch.no_grad():
            program = _export(torch, module, args, signature, dynamic)
    except Exception as exc:  # torch.export raises many types
        raise PassSkipped(f"the trained model could not be saved as a torch.export program "
                          f"({first_line(exc, 200)})") from None
    torch.export.save(program, str(out))
    return out


def _export(torch: Any, module: Any, args: tuple, signature: Signature, dynamic: dict) -> Any:
    """torch.export with the signature's names as keyword dims; a GraphModule from an earlier
    program names its inputs positionally, so it gets a tuple of dims instead."""
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception:  # noqa: BLE001 - retried once with positional dims
        dims = tuple(dynamic[s.name] for s in signature.inputs)
        return torch.export.export(module, args, dynamic_shapes=dims, strict=False)


# -- size ------------------------------------------------------------------------------------
def model_stats(torch: Any, gm: Any, args: tuple) -> dict[str, int]:
    """Parameters (non-zero ones too) and multiply-accumulates per row of the Conv and Linear
    layers of an FX GraphModule, from shapes propagated on `args`."""
    from torch.fx.passes.shape_prop import ShapeProp

    from optiserve.passes.fx import CONV, aten_op, get_attr

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    used = [get_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users]
    tensors = [t for t in used if isinstance(t, torch.Tensor) and t.is_floating_point()]
    params = sum(int(t.numel()) for t in tensors)
    nonzero = sum(int((t != 0).sum()) for t in tensors)
    macs = 0
    rows = max(1, int(args[0].shape[0]))
    for node in gm.graph.nodes:
        kind = aten_op(node)
        if kind not in (*CONV, "linear"):
            continue
        meta = node.meta.get("tensor_meta")
        weight = node.args[1]
        shape = getattr(getattr(weight, "meta", {}).get("tensor_meta"), "shape", None)
        if meta is None or shape is None:
            continue
        out = int(np.prod(meta.shape)) // rows
        per_output = int(np.prod(shape[1:]))  # in/groups x kernel (conv) or in (linear)
        macs += out * per_output
    return {"params": params, "nonzero_params": nonzero, "macs": macs}


def stats_meta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """The artifact's `model_stats` fact (the report's size columns): each count before and
    after the pass."""
    return {"model_stats": {k: [before[k], after[k]] for k in before}}


def stats_note(before: dict[str, int], after: dict[str, int]) -> str:
    """'parameters 57,290 -> 14,826, MACs per row 8.18M -> 2.32M'."""
    def m(x: int) -> str:
        return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,}"
    text = f"parameters {before['params']:,} -> {after['params']:,}"
    if after.get("nonzero_params", after["params"]) != after["params"]:
        text += f" ({after['nonzero_params']:,} non-zero)"
    return text + f", MACs per row {m(before['macs'])} -> {m(after['macs'])}"
