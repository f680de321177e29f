"""TensorFlow and Keras: `.keras` files, SavedModels and keras.Model objects in; ONNX out (tf2onnx).

A Keras 3 model is stored as its `.keras` file (a zip of config.json, metadata.json and
model.weights.h5), loaded with Keras' safe mode on, so no Python code in the file runs. A
SavedModel is a folder; the registry stores one file per version, so it is stored as a zip of
the folder, written deterministically (sorted names, fixed dates): the same folder gives the
same sha256. The original runs in TensorFlow itself (runtimes/tensorflow.py): that is the
baseline a converted model is measured against.

TensorFlow is imported only inside these functions (`import optiserve` must stay light), with
its C++ log spam lowered first (TF_CPP_MIN_LOG_LEVEL=2, unless the user set it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.convert.formats import Imported
from optiserve.core.deps import require
from optiserve.core.errors import ConversionError, ModelLoadError, first_line
from optiserve.core.quiet import fd_to_log
from optiserve.core.types import Signature, TensorSpec

SAVED_MODEL_PB = "saved_model.pb"
SERVING = "serving_default"
_KERAS_MEMBERS = {"config.json", "metadata.json"}
#: ONNX domains whose operators ONNX Runtime runs without onnx.defs knowing their schema
_RUNTIME_DOMAINS = {"com.microsoft"}
_UNSUPPORTED_HINT = ("Replace the layer that uses them with ops tf2onnx converts, or serve the "
                     "model as it is, in TensorFlow (`optiserve deploy` runs .keras files and "
                     "SavedModels). TensorFlow Lite is the other way out where its builtins or "
                     "TF Select ops cover them (`optiserve export --format tflite`).")
_SAVEDMODEL_HINT = ("Write it with tf.saved_model.save(obj, DIR) or model.export(DIR) (Keras), "
                    "and register the folder or a zip of it.")


def import_tf(feature: str):
    """TensorFlow, imported quietly: its C++ INFO/WARNING lines would drown the CLI output.
    TF_CPP_MIN_LOG_LEVEL does not reach the lines absl writes before it is initialized
    ("oneDNN custom operations are on"), so the import's stderr goes to the debug log."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        with fd_to_log("tensorflow import"):
            return require("tensorflow", extra="tensorflow", feature=feature)
    return require("tensorflow", extra="tensorflow", feature=feature)


def _keras(feature: str):
    import_tf(feature)
    return require("keras", extra="tensorflow", feature=feature)


# -- sniffing (no TensorFlow import) ------------------------------------------------------------
def sniff_zip(names: list[str]) -> str | None:
    """'keras' or 'savedmodel' from a zip's member names, else None."""
    if _savedmodel_root(names) is not None:
        return "savedmodel"
    if _KERAS_MEMBERS <= set(names):
        return "keras"
    return None


def _savedmodel_root(names: list[str]) -> str | None:
    """Where saved_model.pb lies in a zip: '' (its root) or 'folder/' (a zipped folder)."""
    if SAVED_MODEL_PB in names:
        return ""
    nested = [n for n in names if n.endswith("/" + SAVED_MODEL_PB) and n.count("/") == 1]
    return nested[0][: -len(SAVED_MODEL_PB)] if len(nested) == 1 else None


def is_savedmodel_dir(path: Path) -> bool:
    return (path / SAVED_MODEL_PB).is_file() or (path / "saved_model.pbtxt").is_file()


def zip_savedmodel(folder: Path, out: Path) -> Path:
    """The folder as a zip with saved_model.pb at its root; same folder, same bytes."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            info = zipfile.ZipInfo(f.relative_to(folder).as_posix(), (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(f, "rb") as src, z.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return out


@contextlib.contextmanager
def unpacked_savedmodel(path: Path) -> Iterator[Path]:
    """The SavedModel folder of a stored zip (extracted into a temporary folder, removed after),
    or the folder itself when given one."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="optiserve-savedmodel-") as tmp:
        yield Path(tmp) / _unzip(path, Path(tmp))


def _unzip(path: Path, dest: Path) -> str:
    """Extract a SavedModel zip into `dest`; the folder in it that holds saved_model.pb."""
    try:
        with zipfile.ZipFile(path) as z:
            root = _savedmodel_root(z.namelist())
            if root is None:
                raise ModelLoadError(str(path), "the zip archive holds no saved_model.pb",
                                     hint=_SAVEDMODEL_HINT)
            _extract(z, dest, path)
            return root
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(str(path), f"the SavedModel zip is corrupted ({first_line(exc)})",
                             hint="Zip the SavedModel folder again.") from None


def _extract(z: zipfile.ZipFile, dest: Path, path: Path) -> None:
    """Extract every member, refusing names that would land outside `dest` (zip slip)."""
    base = dest.resolve()
    for name in z.namelist():
        target = (dest / name).resolve()
        if not target.is_relative_to(base):
            raise ModelLoadError(str(path), f"the zip member '{name}' points outside the archive",
                                 hint="Zip the SavedModel folder again with relative paths.")
    z.extractall(dest)


# -- loading ------------------------------------------------------------------------------------
def load_keras(path: Path) -> Any:
    """The keras.Model of a `.keras` file, loaded in safe mode and without its training setup
    (compile=False: the optimizer, loss and metrics are not needed to run it, and custom ones
    would not load)."""
    keras = _keras("Loading a Keras model")
    path = Path(path)
    with contextlib.ExitStack() as stack:
        if path.suffix != ".keras":  # Keras refuses any other file name
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="optiserve-keras-")))
            path = Path(shutil.copyfile(path, tmp / "model.keras"))
        try:
            return keras.saving.load_model(path, compile=False)
        except Exception as exc:  # Keras raises ValueError, TypeError, OSError, zip errors ...
            if "Lambda" in str(exc) and "arbitrary code" in str(exc):
                raise ModelLoadError(
                    str(path), "it holds a Lambda layer, whose Python code Keras' safe mode "
                    "refuses to run when loading a file",
                    hint="Replace the Lambda with a custom layer registered with "
                    "@keras.saving.register_keras_serializable, or export a SavedModel with "
                    "model.export(DIR) and register that folder.") from None
            raise ModelLoadError(
                str(path), f"Keras {keras.__version__} cannot load it ({first_line(exc, 200)})",
                hint="Save it again with model.save('m.keras'). A subclassed model or custom "
                "layer must be registered with @keras.saving.register_keras_serializable where "
                "it is loaded; or export a SavedModel with model.export(DIR) and register "
                "that folder.") from None


def load_savedmodel(folder: Path, shown: Path) -> tuple[Any, Any]:
    """(the loaded SavedModel, its serving function); errors name `shown`, the user's path."""
    tf = import_tf("Loading a TensorFlow SavedModel")
    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:  # TF raises OSError, ValueError, its own errors ...
        raise ModelLoadError(str(shown), "TensorFlow cannot load the SavedModel "
                             f"({first_line(exc, 200)})", hint=_SAVEDMODEL_HINT) from None
    return loaded, serving_function(loaded, shown)


def serving_function(loaded: Any, shown: Path) -> Any:
    """The `serving_default` signature, or the only signature there is."""
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if SERVING in signatures:
        return signatures[SERVING]
    if len(signatures) == 1:
        return next(iter(signatures.values()))
    known = ", ".join(sorted(signatures)) or "none"
    raise ModelLoadError(str(shown), f"the SavedModel has no '{SERVING}' signature "
                         f"(signatures: {known})",
                         hint="Save it with signatures={'serving_default': fn} "
                         "(tf.saved_model.save) or with model.export(DIR) (Keras).")


# -- signatures ---------------------------------------------------------------------------------
def _dtype_name(dtype: Any) -> str:
    """numpy dtype name of a TF/Keras dtype ('str' for strings, as in the ONNX signatures)."""
    name = getattr(dtype, "name", dtype)
    if name == "string":
        return "str"
    return np.dtype(getattr(dtype, "as_numpy_dtype", name)).name


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(-1 if d is None else int(d) for d in shape)


def output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def keras_signature(model: Any, path: Path) -> Signature:
    """Inputs as the model declares them (batch dynamic); outputs named after the model's
    output dict keys, else `output` / `output_i`."""
    keras = _keras("Loading a Keras model")
    inputs = list(getattr(model, "inputs", None) or [])
    if not inputs:
        raise ModelLoadError(str(path), "the Keras model declares no inputs",
                             hint="Build it with keras.Input(...) (functional or Sequential "
                             "with an Input layer) before saving.")
    specs = tuple(TensorSpec(name=t.name, dtype=_dtype_name(t.dtype),
                             shape=(-1, *_dims(t.shape[1:]))) for t in inputs)
    outs = list(model.outputs)
    structure = _declared(model, "output")
    names = (keras.tree.flatten({k: k for k in structure})
             if isinstance(structure, dict) else output_names(len(outs)))
    out_specs = tuple(TensorSpec(name=n, dtype=_dtype_name(t.dtype),
                                 shape=(-1, *_dims(t.shape[1:]))) for n, t in zip(names, outs))
    return Signature(inputs=specs, outputs=out_specs)


def savedmodel_signature(fn: Any, path: Path) -> Signature:
    """The serving signature's inputs and outputs, by their names, in sorted order (the order
    TensorFlow flattens them in)."""
    _, kwargs = fn.structured_input_signature
    specs = []
    for name in sorted(kwargs):
        spec = kwargs[name]
        if spec.shape.rank is None:
            raise ModelLoadError(str(path), f"its serving input '{name}' has an unknown rank",
                                 hint="Save it with a tf.TensorSpec of known rank, e.g. "
                                 "tf.TensorSpec([None, 4], tf.float32).")
        specs.append(TensorSpec(name=name, dtype=_dtype_name(spec.dtype), shape=_dims(spec.shape)))
    outputs = fn.structured_outputs
    if isinstance(outputs, dict):
        pairs = sorted(outputs.items())
    else:
        flat = import_tf("Loading a TensorFlow SavedModel").nest.flatten(outputs)
        pairs = list(zip(output_names(len(flat)), flat))
    out_specs = tuple(TensorSpec(name=n, dtype=_dtype_name(t.dtype),
                                 shape=_dims(t.shape) if t.shape.rank is not None else (-1,))
                      for n, t in pairs)
    return Signature(inputs=tuple(specs), outputs=out_specs)


# -- import -------------------------------------------------------------------------------------
def import_keras_file(path: Path) -> Imported:
    model = load_keras(path)
    keras = _keras("Loading a Keras model")
    return Imported(path=Path(path), format="keras", signature=keras_signature(model, path),
                    meta={"estimator": f"keras.{type(model).__name__}",
                          "keras_version": keras.__version__})


def import_savedmodel(path: Path) -> Imported:
    """A SavedModel folder (zipped into a temporary file removed with the Imported) or zip."""
    path = Path(path)
    if path.is_dir() and not is_savedmodel_dir(path):
        raise ModelLoadError(str(path), "it is a folder but not a TensorFlow SavedModel "
                             f"(no {SAVED_MODEL_PB} in it)",
                             hint="Register a model file, or a folder written by "
                             "tf.saved_model.save / model.export (Keras).")
    with unpacked_savedmodel(path) as folder:
        _, fn = load_savedmodel(folder, path)
        signature = savedmodel_signature(fn, path)
    stored = path
    if path.is_dir():
        tmp = tempfile.mkdtemp(prefix="optiserve-savedmodel-")
        stored = zip_savedmodel(path, Path(tmp) / "model.savedmodel.zip")
    imported = Imported(path=stored, format="savedmodel", signature=signature,
                        meta={"estimator": "tf.saved_model",
                              "tensorflow_version": import_tf("SavedModels").__version__})
    if stored != path:  # the zip lives as long as the Imported that points at it
        weakref.finalize(imported, shutil.rmtree, str(stored.parent), True)
    return imported


def is_keras_object(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "keras" for c in type(obj).__mro__)


def is_tensorflow_object(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] in ("keras", "tensorflow") for c in type(obj).__mro__)


def import_keras_object(obj: Any, workdir: Path) -> Imported:
    """A keras.Model saved as `.keras`; any other tf.Module saved as a SavedModel."""
    if not is_keras_object(obj):
        tf = import_tf("Registering a TensorFlow model")
        folder = workdir / "savedmodel"
        try:
            tf.saved_model.save(obj, str(folder))
        except Exception as exc:
            raise ModelLoadError(type(obj).__name__, "tf.saved_model.save cannot save it "
                                 f"({first_line(exc, 200)})", hint=_SAVEDMODEL_HINT) from None
        return import_savedmodel(folder)
    path = workdir / "model.keras"
    try:
        obj.save(str(path))
    except Exception as exc:  # unbuilt or unserializable models
        raise ModelLoadError(type(obj).__name__, f"Keras cannot save it ({first_line(exc, 200)})",
                             hint="Build the model (keras.Input or one call) and make custom "
                             "layers serializable (get_config).") from None
    return import_keras_file(path)


def _declared(model: Any, what: str) -> Any:
    """The model's `input` / `output` structure (a tensor, list or dict), or None: a reloaded
    Sequential has only `inputs` / `outputs`, and asking it raises AttributeError."""
    try:
        return getattr(model, what)
    except (AttributeError, ValueError):
        return None


# -- calling ------------------------------------------------------------------------------------
def keras_caller(model: Any, signature: Signature):
    """f(tensors in signature order) -> {output name: tensor}, calling the model as Keras does
    at inference (training=False), with its inputs packed as it declared them (one tensor, a
    list or a dict)."""
    keras = _keras("Running a Keras model")
    names = [o.name for o in signature.outputs]

    structure = _declared(model, "input")

    def call(*tensors):
        packed = (keras.tree.pack_sequence_as(structure, list(tensors)) if structure is not None
                  else tensors[0] if len(tensors) == 1 else list(tensors))
        return dict(zip(names, keras.tree.flatten(model(packed, training=False))))

    return call


def savedmodel_caller(fn: Any, signature: Signature):
    """f(tensors in signature order) -> {output name: tensor} through the serving function."""
    in_names = [s.name for s in signature.inputs]
    out_names = [s.name for s in signature.outputs]

    def call(*tensors):
        result = fn(**dict(zip(in_names, tensors)))
        if isinstance(result, dict):
            return {n: result[n] for n in out_names}
        return dict(zip(out_names, import_tf("Running a SavedModel").nest.flatten(result)))

    return call


def tensor_specs(signature: Signature) -> list:
    """tf.TensorSpec per input, -1 as None: one trace serves every batch size."""
    tf = import_tf("Running a TensorFlow model")
    return [tf.TensorSpec([None if d == -1 else d for d in s.shape],
                          tf.string if s.dtype == "str" else tf.as_dtype(s.dtype), name=s.name)
            for s in signature.inputs]


# -- conversion ---------------------------------------------------------------------------------
def to_onnx(path: Path, format: str, signature: Signature, out: Path, opset: int) -> int:
    """Convert with tf2onnx; returns the opset used (capped at what tf2onnx supports). The ONNX
    inputs and outputs carry the signature's names and order, dynamic where it is -1."""
    tf = import_tf("Converting TensorFlow to ONNX")
    tf2onnx = require("tf2onnx", extra="tensorflow", feature="Converting TensorFlow to ONNX")
    used = min(opset, max(tf2onnx.constants.OPSET_TO_IR_VERSION))
    specs = tensor_specs(signature)
    with contextlib.ExitStack() as stack:
        if format == "keras":
            call = keras_caller(load_keras(path), signature)
        elif format == "savedmodel":
            folder = stack.enter_context(unpacked_savedmodel(path))
            # `loaded` must outlive the tracing below: the signature holds its variables weakly
            loaded, fn = load_savedmodel(folder, path)  # noqa: F841
            call = savedmodel_caller(fn, signature)
        else:
            raise ConversionError(f"'{format}' is not a TensorFlow format (keras, savedmodel).")
        try:
            with _quiet_tf2onnx():
                proto, _ = tf2onnx.convert.from_function(tf.function(call), input_signature=specs,
                                                         opset=used)
        except Exception as exc:  # tracing and tf2onnx raise many types
            raise ConversionError(f"tf2onnx {tf2onnx.__version__} cannot convert this {format} "
                                  f"model: {error_line(exc)}", hint=_UNSUPPORTED_HINT) from None
    _refuse_unconverted(proto, tf2onnx.__version__, used)
    _order_outputs(proto, [s.name for s in signature.outputs])
    out.write_bytes(proto.SerializeToString())
    return used


def error_line(exc: BaseException) -> str:
    """The line of a TensorFlow error that says what went wrong: errors raised while tracing
    start with 'in user code:' and a stack, and end with the real 'SomeError: ...' line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Z]\w*(Error|Exception): ", ln)]
    return named[-1][:300] if named else first_line(exc)


@contextlib.contextmanager
def _quiet_tf2onnx() -> Iterator[None]:
    """tf2onnx logs every op it cannot convert, and goes on; the error raised after says it."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def unconverted_ops(proto: Any) -> dict[str, int]:
    """TensorFlow ops tf2onnx left in the graph as they were (it keeps going when it has no
    handler for one): op types no ONNX schema knows, subgraphs included, with their counts."""
    import onnx

    found: dict[str, int] = {}
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            for a in node.attribute:
                graphs += [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            if node.domain in _RUNTIME_DOMAINS or onnx.defs.has(node.op_type, node.domain):
                continue
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def _refuse_unconverted(proto: Any, version: str, opset: int) -> None:
    ops = unconverted_ops(proto)
    if ops:
        listed = ", ".join(f"{op} (x{n})" for op, n in sorted(ops.items()))
        raise ConversionError(f"tf2onnx {version} has no ONNX conversion (opset {opset}) for "
                              f"the TensorFlow op(s) {listed}.", hint=_UNSUPPORTED_HINT)


def _order_outputs(proto: Any, names: list[str]) -> None:
    """Graph outputs in the signature's order (tf2onnx sorts dict outputs by name, so
    output_10 would come before output_2)."""
    by_name = {o.name: o for o in proto.graph.output}
    if set(by_name) != set(names):
        raise ConversionError(f"tf2onnx produced outputs {sorted(by_name)}, expected {names}.")
    ordered = [type(by_name[n])() for n in names]
    for copy, n in zip(ordered, names):
        copy.CopyFrom(by_name[n])
    del proto.graph.output[:]
    proto.graph.output.extend(ordered)
