"""Convert the original model to ONNX and check it with onnx.checker.

Parity with the original (max abs / relative error, label agreement) is measured by the
pipeline on the validation rows for every candidate, this one included. XGBoost and LightGBM
conversions are also checked here against the framework's own predict on the sample rows,
because their ONNX tree operators compute in float32: the note reports the difference and
starts with "parity warning:" above convert.trees.PARITY_TOLERANCE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optiserve.convert.onnx_io import check, signature_of, write_meta
from optiserve.core.errors import ConversionError
from optiserve.passes.base import Artifact, Pass, PassConfig, PassContext, PassSkipped


class OnnxConversion(Pass):
    name = "onnx_conversion"
    formats = None  # any

    class Config(PassConfig):
        opset: int | None = Field(None, ge=7, le=23,
                                  description="ONNX opset; default ONNX_OPSET_VERSION.")
        dtype: Literal["float32", "float64"] = Field(
            "float32", description="scikit-learn only (trees are float32): tensor type of the "
            "converted model. "
            "float64 matches scikit-learn's arithmetic where the ONNX operators allow it.")
        exporter: Literal["auto", "torchscript", "dynamo"] = Field(
            "auto", description="PyTorch only: torch.onnx exporter. auto tries the TorchScript "
            "exporter first (its graphs fuse best in ONNX Runtime), then dynamo.")
        sparse_weights: bool = Field(
            False, description="PyTorch only: store weights of at least 70 % zeros (a pruned "
            "model's) as ONNX sparse initializers, a smaller file with the same outputs. ONNX "
            "Runtime reads them; graph_optimization, quantization and OpenVINO cannot, so set "
            "it only where onnx_conversion is the last pass.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        if artifact.format == "onnx":
            raise PassSkipped("the model is already ONNX")
        opset = config.opset or ctx.settings.onnx_opset_version
        out = ctx.workdir / "converted.onnx"
        notes: list[str] = []
        if artifact.format in ("pkl", "skops"):
            from optiserve.convert.sklearn import load_estimator, to_onnx

            from optiserve.convert.trees import is_tree_wrapper

            est = load_estimator(artifact.path, artifact.format)
            n = artifact.signature.inputs[0].shape[1]
            proto = to_onnx(est, n, dtype=config.dtype, opset=opset)
            write_meta(proto, {k: v for k, v in artifact.meta.items()
                               if k in ("num_heads", "hidden_size", "model_type")})
            out.write_bytes(proto.SerializeToString())
            notes.append(f"skl2onnx, {config.dtype} tensors, opset {opset}")
            if is_tree_wrapper(_final(est)):
                notes += _parity(lambda x: _wrapper_predict(est, x), out, ctx)
        elif artifact.format in ("xgboost", "xgboost_ubj", "lightgbm"):
            from optiserve.convert import trees

            n = artifact.signature.inputs[0].shape[1]
            proto, used = trees.to_onnx(artifact.path, artifact.format, n, opset=opset)
            out.write_bytes(proto.SerializeToString())
            capped = f" (onnxmltools supports up to {used})" if used < opset else ""
            notes.append(f"onnxmltools, float32 tensors, opset {used}{capped}")
            booster = trees.load_booster(artifact.path, artifact.format)
            ti = trees.info(booster)
            notes += _parity(lambda x: trees.predict(booster, x, ti, threads=1), out, ctx)
        elif artifact.format in ("torchscript", "pt2"):
            from optiserve.convert.torch import to_onnx

            used = to_onnx(artifact.path, artifact.format, artifact.signature, ctx.sample, out,
                           opset=opset, exporter=config.exporter)
            import onnx

            proto = onnx.load(str(out))
            write_meta(proto, {k: v for k, v in artifact.meta.items()
                               if k in ("num_heads", "hidden_size", "model_type")})
            onnx.save(proto, str(out))
            notes.append(f"torch.onnx.export ({used} exporter), opset {opset}")
            if config.sparse_weights:
                notes += _store_sparse(out, ctx.sample)
        elif artifact.format in ("keras", "savedmodel"):
            import tf2onnx

            from optiserve.convert.tensorflow import to_onnx

            used = to_onnx(artifact.path, artifact.format, artifact.signature, out, opset)
            capped = f" (tf2onnx supports up to {used})" if used < opset else ""
            notes.append(f"tf2onnx {tf2onnx.__version__}, opset {used}{capped}")
        else:
            raise ConversionError(f"No ONNX converter for format '{artifact.format}'.")
        model = check(out)
        return artifact.then(out, self.name, config, signature=signature_of(model), notes=notes)


_PARITY_ROWS = 10_000


def _final(est: Any) -> Any:
    steps = getattr(est, "steps", None)
    return _final(steps[-1][1]) if steps else est


def _wrapper_predict(est: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    if hasattr(est, "predict_proba"):
        return {"label": np.asarray(est.predict(x)), "probabilities": est.predict_proba(x)}
    pred = np.asarray(est.predict(x))
    return {"variable": pred.reshape(len(pred), -1)}


def _parity(native, path, ctx: PassContext) -> list[str]:
    """The tree parity note on the run's real rows (calibration, else validation data; else
    the sample batch), at most _PARITY_ROWS of them; none when the run has no rows."""
    from optiserve.convert.trees import parity
    from optiserve.runtimes.onnxruntime import OnnxRuntime

    rows = getattr(ctx.calibration, "inputs", None) or ctx.sample
    if not rows:
        return []
    x = np.asarray(next(iter(rows.values()))[:_PARITY_ROWS], dtype=np.float32)
    model = check(path)
    with OnnxRuntime(path, signature_of(model), threads=1, format="onnx") as rt:
        converted = rt.predict({model.graph.input[0].name: x})
    return [parity(native(x), converted)]


def _store_sparse(path: Path, sample: dict[str, np.ndarray]) -> list[str]:
    """Mostly-zero weights (a pruned model's) rewritten as ONNX sparse initializers where
    that makes the file smaller: the size gain of pruning, since dense kernels gain no speed.

    ONNX requires int64 indices, so a float32 weight costs 12 bytes per non-zero instead of 4
    per element: it pays only above 2/3 zeros. ONNX Runtime expands the weights when it loads
    the model (same outputs, memory and latency); the rewrite is kept only when it loads and
    gives the same outputs on the sample rows."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph, before = model.graph, path.stat().st_size
    inputs = {i.name for i in graph.input}
    dense, sparse = [], []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        nonzero = int(np.count_nonzero(arr))
        if arr.dtype.kind != "f" or arr.size < _SPARSE_MIN_ELEMENTS or init.name in inputs \
                or nonzero * (arr.itemsize + 8) > 0.9 * arr.nbytes:
            dense.append(init)
            continue
        flat = arr.reshape(-1)
        where = np.flatnonzero(flat).astype(np.int64)
        sparse.append(helper.make_sparse_tensor(
            numpy_helper.from_array(flat[where], init.name),
            numpy_helper.from_array(where, f"{init.name}_indices"), list(arr.shape)))
    if not sparse:
        return ["sparse_weights: no weight has enough zeros to be smaller stored sparse "
                "(ONNX's format, a value and an int64 index per non-zero, pays above about "
                "70 % zeros)"]
    del graph.initializer[:]
    graph.initializer.extend(dense)
    graph.sparse_initializer.extend(sparse)
    trial = path.with_name(f"sparse_{path.name}")
    onnx.save(model, str(trial))
    differs = _outputs_differ(path, trial, sample)
    if differs:
        trial.unlink()
        return [f"sparse_weights: kept the weights dense ({differs})"]
    trial.replace(path)
    return [f"stored {len(sparse)} initializers sparse: {_size(before)} -> "
            f"{_size(path.stat().st_size)} (ONNX Runtime expands them when it loads the "
            "model: same outputs, memory and latency)"]


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _outputs_differ(dense: Path, sparse: Path, sample: dict[str, np.ndarray]) -> str:
    """Why the sparse file cannot replace the dense one ('' when it can)."""
    import onnxruntime as ort

    try:
        runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            None, sample) for p in (dense, sparse)]
    except Exception as exc:  # ORT raises its own types
        return f"ONNX Runtime {ort.__version__} could not run it: {str(exc)[:200]}"
    if any(not np.array_equal(a, b) for a, b in zip(*runs)):
        return "ONNX Runtime's outputs changed"
    return ""


# Smaller weights (biases, a tiny head) are not worth an index array of their own.
_SPARSE_MIN_ELEMENTS = 1024
