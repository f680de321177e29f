"""Quantization-aware training: fake-quant fine-tuning in PyTorch, exported as an ONNX QDQ model.

The graph work (FX rewrite, BatchNorm folding, QDQ export with int8 weights) is in fake_quant.py;
this pass picks the loss, checks the training rows against the signature and trains: Adam on
the fake-quantized graph, observers frozen part-way so the last steps train against fixed
scales, stopped at max_seconds. The note reports the loss before (plain post-training
quantization from the same ranges) and after the fine-tuning.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optiserve.convert.onnx_io import check, signature_of
from optiserve.core.deps import require
from optiserve.passes.base import Artifact, Pass, PassContext, PassSkipped
from optiserve.passes.fake_quant import export_qdq, graph_module, insert_fake_quant, \
    quantized_layers

log = logging.getLogger(__name__)

_LOSSES = {"cross_entropy": "cross-entropy against the labels", "mse": "MSE against the labels",
           "distill": "MSE against the FP32 model's outputs"}


class QAT(Pass):
    """Fine-tunes a PyTorch model with fake quantization and exports an INT8 ONNX QDQ model."""

    name = "qat"
    extras = ("torch",)
    needs_onnx = False
    branches = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        steps: int = Field(200, ge=1, description="Optimizer steps of fake-quant fine-tuning.")
        batch_size: int = Field(32, ge=1, description="Training rows per step.")
        learning_rate: float = Field(1e-4, gt=0, description="Adam learning rate.")
        freeze_observers_at: float = Field(
            0.5, ge=0, le=1, description="Fraction of the steps after which the activation and "
            "weight ranges stop moving, so the last steps train against fixed scales.")
        loss: Literal["auto", "cross_entropy", "mse", "distill"] = Field(
            "auto", description="cross_entropy: against integer labels (class scores); mse: "
            "against float labels; distill: mean squared error to the FP32 model's outputs. "
            "auto: cross_entropy when the labels and the output allow it, else distill.")
        max_seconds: float = Field(
            300, gt=0, description="Stop training once the pass has run this long; the steps "
            "done so far are kept and the note says so.")
        quantize_output: bool = Field(
            True, description="Quantize the model's output too, so ONNX Runtime runs the last "
            "layer with an integer kernel; false keeps that layer in float (outputs exact to "
            "float precision, e.g. for regression or embeddings).")
        seed: int = Field(0, description="Seed of the batch order.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        if artifact.format not in ("torchscript", "pt2"):
            raise PassSkipped(f"it trains PyTorch models; this artifact is {artifact.format}")
        started = time.monotonic()
        torch = require("torch", extra="torch", feature="Quantization-aware training (qat)")
        data, labels, total = _training_rows(artifact, ctx, config)
        args = tuple(torch.from_numpy(data[s.name][:2]) for s in artifact.signature.inputs)
        gm = graph_module(torch, artifact.path, artifact.format, args)
        fp32 = _outputs(torch, gm, data, artifact.signature)
        kind, targets = _loss_plan(config.loss, fp32, labels)
        layers = insert_fake_quant(torch, gm, quantize_output=config.quantize_output)
        trainer = _Trainer(torch, gm, data, targets, kind, config, artifact.signature)
        before = trainer.evaluate()
        deadline = started + config.max_seconds
        by_run = ctx.deadline is not None and ctx.deadline < deadline
        done = trainer.train(deadline=ctx.deadline if by_run else deadline)
        after = trainer.evaluate()
        out = ctx.workdir / "qat_qdq.onnx"
        opset = max(13, ctx.settings.onnx_opset_version)  # per-channel Q/DQ needs opset 13
        export_qdq(torch, gm, args, artifact.signature, out, opset, meta=artifact.meta)
        model = check(out)
        counts = Counter(quantized_layers(model))
        stopped = "" if done >= config.steps else (
            ", stopped by OPTIMIZATION_MAX_TIME_MINUTES" if by_run
            else f", stopped by max_seconds={config.max_seconds:g}")
        note = (f"QAT: {done} steps of fake-quant fine-tuning ({_LOSSES[kind]}, "
                f"{trainer.n}{f' of {total}' if total > trainer.n else ''} rows of "
                f"{ctx.training.description or 'the training data'}"
                f"{stopped}), loss {before:.3g} -> {after:.3g}; ONNX QDQ opset {opset}: "
                + " + ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                + f" of {len(layers)} layers quantized")
        return artifact.then(out, self.name, config, format="onnx", signature=signature_of(model),
                             notes=[note])


# -- data -----------------------------------------------------------------------------------
def _training_rows(artifact: Artifact, ctx: PassContext, config: QAT.Config):
    """(inputs in the model's dtypes, labels, rows given): the inputs are checked against the
    signature, and only as many random rows are kept as steps x batch_size can read."""
    train = ctx.training
    if train is None:
        raise PassSkipped("qat needs training data: give training_dataset in the optimization "
                          "request (rows of the model's inputs; a label_column for cross-entropy)")
    if not train.inputs or min(len(v) for v in train.inputs.values()) == 0:
        raise PassSkipped(f"the training data has no rows ({train.description or 'empty'})")
    rows = {}
    for spec in artifact.signature.inputs:
        if spec.name not in train.inputs:
            raise PassSkipped(f"the training data has no input '{spec.name}' (it has "
                              f"{', '.join(sorted(train.inputs))})")
        arr, want = np.asarray(train.inputs[spec.name]), np.dtype(spec.dtype)
        if arr.ndim != len(spec.shape) or any(
                d not in (-1, g) for d, g in zip(spec.shape[1:], arr.shape[1:])):
            raise PassSkipped(f"training input '{spec.name}' has shape {list(arr.shape)}; the "
                              f"model expects {list(spec.shape)} (-1: any size)")
        if (arr.dtype.kind == "f") != (want.kind == "f"):
            raise PassSkipped(f"training input '{spec.name}' is {arr.dtype}; the model expects "
                              f"{want}")
        rows[spec.name] = arr.astype(want, copy=False)
    total, labels = train.n, train.labels
    if labels is not None and len(labels) != total:
        raise PassSkipped(f"the training data has {len(labels)} labels for {total} rows")
    keep = slice(None)
    if total > config.steps * config.batch_size:
        rng = np.random.default_rng(config.seed)
        keep = np.sort(rng.choice(total, config.steps * config.batch_size, replace=False))
    rows = {k: np.ascontiguousarray(v[keep]) for k, v in rows.items()}
    return rows, None if labels is None else np.asarray(labels)[keep], total


def _loss_plan(loss: str, fp32: list[np.ndarray], labels: Any) -> tuple[str, list[np.ndarray]]:
    """(loss kind, targets): which loss the training uses and what it compares against."""
    out, y = fp32[0], None if labels is None else np.asarray(labels)
    scores = len(fp32) == 1 and out.ndim == 2 and out.shape[1] > 1 and out.dtype.kind == "f"
    classes = y is not None and y.dtype.kind in "iu" and y.shape == (len(out),)
    if loss == "auto":
        loss = "cross_entropy" if scores and classes else "distill"
    if loss == "cross_entropy":
        if not (scores and classes):
            raise PassSkipped(
                "loss cross_entropy needs one 2-D output of class scores and one integer label "
                f"per row; the model gives {[list(t.shape) for t in fp32]}, the labels are "
                f"{'missing' if y is None else f'{y.dtype} {list(y.shape)}'}")
        if y.min() < 0 or y.max() >= out.shape[1]:
            raise PassSkipped(f"labels run from {y.min()} to {y.max()}; the model scores "
                              f"{out.shape[1]} classes")
        return loss, [y.astype(np.int64)]
    if loss == "mse":
        if y is None or len(fp32) != 1 or y.size != out.size or y.dtype.kind not in "fiu":
            raise PassSkipped(f"loss mse needs numeric labels shaped like the model's output "
                              f"{list(out.shape)}; the labels are "
                              f"{'missing' if y is None else list(y.shape)}")
        return loss, [y.astype(np.float32).reshape(out.shape)]
    if not any(t.dtype.kind == "f" for t in fp32):
        raise PassSkipped("distillation needs a float output; the model's outputs are "
                          + ", ".join(str(t.dtype) for t in fp32))
    return "distill", fp32


def _outputs(torch: Any, gm: Any, data: dict[str, np.ndarray], signature) -> list[np.ndarray]:
    """The FP32 model's outputs on every training row."""
    n, chunks = len(next(iter(data.values()))), []
    with torch.no_grad():
        for start in range(0, n, 256):
            outs = gm(*(torch.from_numpy(data[s.name][start:start + 256])
                        for s in signature.inputs))
            chunks.append([o.numpy() for o in _as_list(outs)])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _as_list(outs: Any) -> list:
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]


# -- training --------------------------------------------------------------------------------
class _Trainer:
    """Adam on the fake-quantized graph; losses measured on a fixed subset of the rows."""

    def __init__(self, torch, gm, data, targets, kind, config, signature):
        self.torch, self.gm, self.config, self.kind = torch, gm, config, kind
        self.inputs = [torch.from_numpy(data[s.name]) for s in signature.inputs]
        self.targets = [torch.from_numpy(t) for t in targets]
        self.n = len(self.inputs[0])
        self.fake_quants = [m for name, m in gm.named_children() if name.startswith("qat_")]
        self.calibrated = False

    def loss(self, idx: Any) -> Any:
        outs, fn = _as_list(self.gm(*(x[idx] for x in self.inputs))), self.torch.nn.functional
        if self.kind == "cross_entropy":
            return fn.cross_entropy(outs[0], self.targets[0][idx])
        return sum(fn.mse_loss(o.float(), t[idx].float()) for o, t in zip(outs, self.targets)
                   if t.dtype.is_floating_point)

    def evaluate(self) -> float:
        """Mean loss on up to 512 rows at the current scales (the first call sets them from
        16 batches first: the loss plain post-training quantization would start from)."""
        torch = self.torch
        batches = torch.arange(min(self.n, 512)).split(self.config.batch_size)
        with torch.no_grad():
            if not self.calibrated:
                for idx in batches[:16]:
                    self.gm(*(x[idx] for x in self.inputs))
                self.calibrated = True
            observing = [bool(f.observer_enabled[0]) for f in self.fake_quants]
            for f in self.fake_quants:
                f.disable_observer()
            total = sum(float(self.loss(idx)) * len(idx) for idx in batches)
            for f, on in zip(self.fake_quants, observing):
                f.enable_observer(on)
        return total / sum(len(idx) for idx in batches)

    def train(self, deadline: float) -> int:
        """Steps done: all of them, or fewer when `deadline` (time.monotonic) passed."""
        torch, cfg = self.torch, self.config
        opt = torch.optim.Adam([p for p in self.gm.parameters() if p.requires_grad],
                               lr=cfg.learning_rate)
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.empty(0, dtype=torch.long)
        freeze_at = int(cfg.steps * cfg.freeze_observers_at)
        for step in range(cfg.steps):
            if time.monotonic() > deadline:
                log.warning("qat: stopped after %d of %d steps (time limit)", step, cfg.steps)
                break
            if step == freeze_at:
                for f in self.fake_quants:
                    f.disable_observer()
            if len(order) < cfg.batch_size:
                order = torch.cat([order, torch.randperm(self.n, generator=gen)])
            idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
            opt.zero_grad()
            loss = self.loss(idx)
            loss.backward()
            opt.step()
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                log.info("qat: step %d/%d, %s loss %.4f", step + 1, cfg.steps, self.kind,
                         loss.item())
        else:
            step = cfg.steps
        for f in self.fake_quants:
            f.disable_observer()
        return step
