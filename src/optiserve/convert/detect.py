"""Decide a model's framework from its bytes (not only its extension) or its Python type.

A pickle is only ever loaded from a path the user named on this machine: pickles run code when
loaded, so nothing that arrives over a network is unpickled. scikit-learn models that do arrive
over a network come as skops files, which are loaded without unpickling and only when every type
they hold is trusted (see convert/sklearn.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from optiserve.convert.formats import Imported
from optiserve.core.errors import ModelLoadError

EXT_FORMAT = {".onnx": "onnx", ".pkl": "pkl", ".pickle": "pkl", ".joblib": "pkl",
               ".skops": "skops", ".pt": "torchscript", ".pth": "torchscript",
               ".jit": "torchscript", ".pt2": "pt2", ".json": "xgboost", ".ubj": "xgboost_ubj",
               ".txt": "lightgbm", ".keras": "keras"}
_SUPPORTED = ("Supported: .onnx, .pkl/.joblib (scikit-learn pickle), .skops (scikit-learn "
              "saved with skops.io.dump), .pt (TorchScript), .pt2 (torch.export), .json/.ubj "
              "(XGBoost booster.save_model), .txt (LightGBM booster.save_model), .keras "
              "(Keras 3 model.save), a TensorFlow SavedModel folder (or a zip of it).")


def sniff(path: Path) -> str:
    """The format a file's bytes say it is: onnx, pkl, skops, torchscript, pt2, xgboost,
    xgboost_ubj, lightgbm, keras or savedmodel (a zipped SavedModel folder)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ModelLoadError(str(path), "the file is empty")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            # A truncated zip has lost its directory: only the extension says what it was.
            named = {".skops": "skops", ".keras": "Keras"}.get(path.suffix.lower())
            what = (f"the {named} file is corrupted" if named else
                    "it starts like a zip archive (skops, TorchScript, torch.export, Keras, "
                    "SavedModel) but is corrupted")
            raise ModelLoadError(str(path), f"{what} ({exc})",
                                 hint="Save the model again; the file may be truncated.") from None
        from optiserve.convert.tensorflow import sniff_zip  # TensorFlow is not imported

        tensorflow = sniff_zip(names)  # .keras: config.json + metadata.json; saved_model.pb
        if tensorflow is not None:
            return tensorflow
        # skops (skops.io.dump) writes schema.json at the archive's root.
        if "schema.json" in names:
            return "skops"
        if any(n.endswith("serialized_exported_program.json") or n.endswith(".json")
               and "/models/" in n for n in names) or any("archive_format" in n for n in names):
            return "pt2"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        raise ModelLoadError(str(path), "it is a zip archive but neither TorchScript, a "
                             "torch.export program, a skops file, a Keras file nor a SavedModel",
                             hint="Save with skops.io.dump (scikit-learn), torch.jit.save, "
                             "torch.export.save or model.save('m.keras') (Keras).")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pkl"
    # ONNX is a protobuf: the first field of ModelProto is ir_version (tag 0x08).
    if head[:1] == b"\x08":
        return "onnx"
    from optiserve.convert.trees import sniff_tree

    tree = sniff_tree(path)
    if tree is not None:
        return tree
    raise ModelLoadError(str(path), "its contents are not an ONNX, pickle, TorchScript, "
                         "torch.export, skops, XGBoost or LightGBM file", hint=_SUPPORTED)


def import_file(path: str | Path, *, input_specs: list | None = None) -> Imported:
    """Identify and open a model file, or a SavedModel folder; errors name the file and what
    to do."""
    path = Path(path)
    if path.is_dir():  # the one model format that is a folder
        from optiserve.convert.tensorflow import import_savedmodel
        return import_savedmodel(path)
    if not path.is_file():
        raise ModelLoadError(str(path), "no such file")
    fmt = sniff(path)
    claimed = EXT_FORMAT.get(path.suffix.lower())
    if claimed is not None and claimed != fmt:
        raise ModelLoadError(
            str(path), f"its extension says {claimed} but its contents are {fmt}",
            hint="Rename the file to match its contents, or re-save it in the format you meant.")
    if fmt == "onnx":
        from optiserve.convert.onnx_io import import_onnx
        return import_onnx(path)
    if fmt == "pkl":
        from optiserve.convert.sklearn import import_pickle
        return import_pickle(path)
    if fmt == "skops":
        from optiserve.convert.sklearn import import_skops
        return import_skops(path)
    if fmt in ("xgboost", "xgboost_ubj", "lightgbm"):
        from optiserve.convert.trees import import_native
        return import_native(path, fmt)
    if fmt == "keras":
        from optiserve.convert.tensorflow import import_keras_file
        return import_keras_file(path)
    if fmt == "savedmodel":
        from optiserve.convert.tensorflow import import_savedmodel
        return import_savedmodel(path)
    from optiserve.convert.torch import import_torch_file
    return import_torch_file(path, fmt, input_specs=input_specs)


def import_object(obj: Any, workdir: Path, *, example_inputs: Any = None) -> Imported:
    """Identify an in-memory model (estimator, nn.Module, ExportedProgram, ModelProto,
    keras.Model, tf.Module)."""
    module = type(obj).__module__.split(".")[0]
    if module == "onnx":
        from optiserve.convert.onnx_io import import_onnx_proto
        return import_onnx_proto(obj, workdir)
    if module == "torch" or _is_torch_module(obj):
        from optiserve.convert.torch import import_torch_object
        return import_torch_object(obj, workdir, example_inputs=example_inputs)
    if module in ("xgboost", "lightgbm"):
        from optiserve.convert.trees import import_tree_object
        return import_tree_object(obj, workdir)
    from optiserve.convert.tensorflow import import_keras_object, is_tensorflow_object

    if is_tensorflow_object(obj):  # before scikit-learn: a keras.Model has fit and predict too
        return import_keras_object(obj, workdir)
    if module in ("sklearn", "imblearn") or (hasattr(obj, "fit") and hasattr(obj, "predict")):
        from optiserve.convert.sklearn import import_estimator
        return import_estimator(obj, workdir)
    raise ModelLoadError(repr(type(obj)), "this kind of Python object is not a model optiserve "
                         "knows", hint="Pass a scikit-learn estimator, an XGBoost/LightGBM "
                         "model, a torch nn.Module (with example_inputs), an ExportedProgram, an "
                         "onnx.ModelProto or a keras.Model.")


def _is_torch_module(obj: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") for c in type(obj).__mro__)
