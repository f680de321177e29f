"""Importing model files: the format comes from the bytes; every bad file is a ModelLoadError."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import onnx
import pytest

from optiserve.api import register
from optiserve.convert.detect import import_file, import_object, sniff
from optiserve.core.errors import ConfigError, ModelLoadError
from tests.builders import files_under, linear_onnx, save_onnx


def test_onnx_file_signature_and_opsets(tmp_path):
    path = save_onnx(linear_onnx(4, 3), tmp_path / "m.onnx")
    imported = import_file(path)
    assert imported.format == "onnx" and imported.framework == "onnx"
    assert sniff(path) == "onnx"
    (x,), (y,) = imported.signature.inputs, imported.signature.outputs
    assert (x.name, x.dtype, x.shape) == ("x", "float32", (-1, 4))
    assert (y.name, y.dtype, y.shape) == ("y", "float32", (-1, 3))
    assert imported.meta["opsets"] == {"ai.onnx": 17}


def test_register_onnx_file_and_proto(sqlite_registry, tmp_path):
    path = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    from_file = register("lin", path, registry=sqlite_registry)
    from_proto = register("lin", linear_onnx(), registry=sqlite_registry)
    assert (from_file.version, from_proto.version) == (1, 2)
    assert from_file.format == from_proto.format == "onnx"
    assert from_file.sha256 == from_proto.sha256  # the proto serializes to the same bytes
    assert onnx.load(str(sqlite_registry.path(from_proto))).graph.node[0].op_type == "MatMul"


def test_corrupted_onnx_is_a_model_load_error(tmp_path):
    path = tmp_path / "broken.onnx"
    # Starts like a protobuf ModelProto (tag 0x08) so the ONNX checker, not the sniffer, fails.
    path.write_bytes(b"\x08" + np.random.default_rng(0).bytes(512))
    with pytest.raises(ModelLoadError, match="not a valid ONNX model") as info:
        import_file(path)
    assert str(path) in str(info.value)


def test_truncated_onnx_is_a_model_load_error(tmp_path):
    data = linear_onnx().SerializeToString()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        import_file(path)


def test_random_bytes_are_a_model_load_error(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(b"\x13\x37" + np.random.default_rng(1).bytes(256))
    with pytest.raises(ModelLoadError, match="not an ONNX, pickle, TorchScript"):
        import_file(path)


def test_pickle_renamed_to_onnx_mentions_the_extension(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    with pytest.raises(ModelLoadError) as info:
        import_file(path)
    msg = str(info.value)
    assert "extension says onnx" in msg and "contents are pkl" in msg and "Rename" in msg


def test_onnx_renamed_to_pkl_mentions_the_extension(tmp_path):
    path = save_onnx(linear_onnx(), tmp_path / "model.pkl")
    with pytest.raises(ModelLoadError, match="extension says pkl but its contents are onnx"):
        import_file(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.touch()
    with pytest.raises(ModelLoadError, match="the file is empty"):
        import_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        import_file(tmp_path / "nope.onnx")


def test_directory_that_is_not_a_savedmodel_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a TensorFlow SavedModel"):
        import_file(tmp_path)


def test_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "weights.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="zip archive but neither TorchScript"):
        import_file(path)


@pytest.mark.integration  # unpickling goes through scikit-learn's loader
def test_pickle_of_a_non_estimator(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(ModelLoadError, match="holds a list, not a fitted"):
        import_file(path)


@pytest.mark.integration
@pytest.mark.parametrize("seed", range(5))
def test_corrupted_pickle_is_a_model_load_error(tmp_path, seed):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x80\x04" + np.random.default_rng(seed).bytes(300))
    with pytest.raises(ModelLoadError):
        import_file(path)


def test_unknown_python_object(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model optiserve knows"):
        import_object({"not": "a model"}, tmp_path)


def test_failed_register_stores_nothing(sqlite_registry, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08garbage")
    with pytest.raises(ModelLoadError):
        register("m", bad, registry=sqlite_registry)
    with pytest.raises(ConfigError):
        register("bad name", save_onnx(linear_onnx(), tmp_path / "ok.onnx"),
                 registry=sqlite_registry)
    assert sqlite_registry.models() == []
    assert files_under(sqlite_registry.store.root) == []


def _ort_reads(ir_version: int) -> bool:
    import onnxruntime as ort

    try:
        ort.InferenceSession(linear_onnx(ir_version=ir_version).SerializeToString(),
                             providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


@pytest.mark.skipif(_ort_reads(onnx.IR_VERSION),
                    reason="this ONNX Runtime reads the newest ONNX IR version")
def test_onnx_with_ir_version_newer_than_runtime_is_a_user_error(sqlite_registry, tmp_path):
    from optiserve.api import benchmark
    from optiserve.core.errors import OptiserveError

    # onnx.helper writes its newest IR version by default: an easy file to end up with.
    path = save_onnx(linear_onnx(ir_version=onnx.IR_VERSION), tmp_path / "new.onnx")
    with pytest.raises(OptiserveError, match="IR version"):
        register("new", path, registry=sqlite_registry)
        benchmark("new", registry=sqlite_registry, batch_sizes=[1], iterations=2, warmup=0)
