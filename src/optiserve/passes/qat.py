"""Quantization-aware training: fake-quant fine-tuning in PyTorch, exported as an ONNX QDQ model.

The graph work (fake-quant rewrite, QDQ export with int8 weights) is in fake_quant.py; this
pass picks the loss, checks the training rows against the signature and trains: Adam on the
fake-quantized graph, observers frozen part-way so the last steps train against fixed scales,
stopped at max_seconds. The note reports the loss before (plain post-training
quantization from the same ranges) and after the fine-tuning.
"""

from __future__ import annotations

from collections import Counter

from pydantic import Field

from optiserve.convert.onnx_io import check, signature_of
from optiserve.passes.base import Artifact, PassContext
from optiserve.passes.fake_quant import export_qdq, insert_fake_quant, quantized_layers
from optiserve.passes.training import (LOSSES, Trainer, TrainingConfig, TrainingJob, TrainingPass,
                                       deadline, loss_plan, outputs, stopped_note)


class QAT(TrainingPass):
    """Fine-tunes a PyTorch model with fake quantization and exports an INT8 ONNX QDQ model."""

    name = "qat"
    feature = "Quantization-aware training (qat)"
    kind = "branch"

    class Config(TrainingConfig):
        steps: int = Field(200, ge=1, description="Optimizer steps of fake-quant fine-tuning.")
        learning_rate: float = Field(1e-4, gt=0, description="Adam learning rate (fine-tuning).")
        freeze_observers_at: float = Field(
            0.5, ge=0, le=1, description="Fraction of the steps after which the activation and "
            "weight ranges stop moving, so the last steps train against fixed scales.")
        quantize_output: bool = Field(
            True, description="Quantize the model's output too, so ONNX Runtime runs the last "
            "layer with an integer kernel; false keeps that layer in float (outputs exact to "
            "float precision, e.g. for regression or embeddings).")
        reduce_range: bool | None = Field(
            None, description="7-bit weights ([-64, 63]): trained so, because on x86 CPUs "
            "without VNNI ONNX Runtime's u8 x s8 kernel saturates on 8-bit weights. Unset: on "
            "exactly there (the hardware preflight decides), as for the quantization pass.")

    def train(self, artifact: Artifact, config: Config, ctx: PassContext, job: TrainingJob
              ) -> Artifact:
        torch, data, args, gm = job.torch, job.data, job.args, job.gm
        fp32 = outputs(torch, gm, data, artifact.signature)
        kind, targets = loss_plan(config.loss, fp32, job.labels)
        reduce_range = (ctx.hardware.int8_reduce_range if config.reduce_range is None
                        else config.reduce_range)
        layers = insert_fake_quant(torch, gm, quantize_output=config.quantize_output,
                                   weight_bits=7 if reduce_range else 8)
        trainer = _QATTrainer(torch, gm, data, targets, kind, config, artifact.signature, ctx)
        before = trainer.evaluate()
        until, by_run = deadline(ctx, config.max_seconds, job.started)
        done = trainer.train(until)
        after = trainer.evaluate()
        out = ctx.workdir / "qat_qdq.onnx"
        opset = max(13, ctx.settings.onnx_opset_version)  # per-channel Q/DQ needs opset 13
        export_qdq(torch, gm, args, artifact.signature, out, opset, meta=artifact.meta)
        model = check(out)
        counts = Counter(quantized_layers(model))
        stopped = stopped_note(done, config.steps, by_run, config.max_seconds)
        note = (f"QAT: {done} steps of fake-quant fine-tuning ({LOSSES[kind]}, "
                f"{trainer.n}{f' of {job.total}' if job.total > trainer.n else ''} rows of "
                f"{ctx.training.description or 'the training data'}"
                f"{stopped}), loss {before:.3g} -> {after:.3g}; ONNX QDQ opset {opset}: "
                + " + ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                + f" of {len(layers)} layers quantized, "
                + ("7-bit weights (reduce_range: no VNNI here)" if reduce_range
                   else "8-bit weights"))
        return artifact.then(out, self.name, config, format="onnx", signature=signature_of(model),
                             notes=[note], meta={"precision": "int8"})


# -- training --------------------------------------------------------------------------------
class _QATTrainer(Trainer):
    """The shared loop on the fake-quantized graph, with the observers handled: the first
    evaluation sets the ranges from 16 batches (the loss plain post-training quantization would
    start from), and the ranges stop moving at `freeze_observers_at` of the steps."""

    def __init__(self, torch, gm, data, targets, kind, config, signature, ctx):
        super().__init__(torch, gm, data, targets, kind, signature, steps=config.steps,
                         batch_size=config.batch_size, learning_rate=config.learning_rate,
                         seed=config.seed, name="qat", ctx=ctx)
        self.freeze_at = int(config.steps * config.freeze_observers_at)
        self.fake_quants = [m for name, m in gm.named_children() if name.startswith("qat_")]
        self.calibrated = False

    def evaluate(self) -> float:
        with self.torch.no_grad():
            if not self.calibrated:
                for idx in self.batches()[:16]:
                    self.module(*(x[idx] for x in self.inputs))
                self.calibrated = True
        observing = [bool(f.observer_enabled[0]) for f in self.fake_quants]
        for f in self.fake_quants:
            f.disable_observer()
        try:
            return super().evaluate()
        finally:
            for f, on in zip(self.fake_quants, observing):
                f.enable_observer(on)

    def train(self, deadline: float, **_: object) -> int:
        def freeze(step: int) -> None:
            if step == self.freeze_at:
                for f in self.fake_quants:
                    f.disable_observer()
        done = super().train(deadline, before_step=freeze)
        for f in self.fake_quants:
            f.disable_observer()
        return done
