"""TensorFlow Lite export and the LiteRT runtime, on a small CNN trained on sklearn's digits.

Each precision is converted from a real `.keras` file (and a SavedModel), run by the LiteRT
runtime at batch 1 and 7, and held to the exporter's stated tolerance against Keras eager on
held-out digits. Ops TFLite lacks are found with real TensorFlow ops (Cumprod, Erfinv)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from optiserve.core.errors import ConfigError, DatasetError
from optiserve.core.settings import Settings
from optiserve.exporters.base import ExportError, Source, Tolerance

pytestmark = pytest.mark.integration
tf = pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")
keras = pytest.importorskip("keras")

from optiserve.convert.tensorflow import (keras_signature, savedmodel_signature,  # noqa: E402
                                          serving_function, zip_savedmodel)
from optiserve.exporters.tflite import TOLERANCES, TFLiteExporter  # noqa: E402
from optiserve.runtimes.base import load_runtime  # noqa: E402
from optiserve.runtimes.litert import LiteRTRuntime  # noqa: E402

CHECK_ROWS = 200


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    """Conv + BatchNorm + pooling, trained 12 epochs on 1 400 digits (about 93 % held out)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="pixels")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(10, name="logits")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1400], digits.target[:1400], epochs=12, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("digits") / "cnn.keras"
    model.save(path)
    check = x[1400:1400 + CHECK_ROWS]
    return SimpleNamespace(model=model, path=path, signature=keras_signature(model, path),
                           calibration=x[:100], check=check,
                           reference=model(check, training=False).numpy())


def _source(model, tmp_path, rows, described="100 rows of sklearn digits", fmt="keras"):
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return Source(path=model.path, format=fmt, signature=model.signature, meta={},
                  rows={model.signature.inputs[0].name: rows}, rows_described=described,
                  workdir=workdir, settings=Settings())


def _export(model, tmp_path, rows=None, **options):
    exporter = TFLiteExporter()
    rows = model.calibration if rows is None else rows
    return exporter.export(_source(model, tmp_path, rows), exporter.parse_config(options))


def _within(ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> None:
    """The Tolerance's three tests, as its docstring states them."""
    if tol.atol is not None:
        assert np.all(np.abs(out - ref) <= tol.atol + tol.rtol * np.abs(ref)), \
            f"max abs error {np.abs(out - ref).max():.3g}"
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    if tol.min_cosine is not None:
        assert cos.mean() >= tol.min_cosine, f"mean cosine {cos.mean():.5f}"
    if tol.min_label_agreement is not None:
        agree = np.mean(ref.argmax(1) == out.argmax(1))
        assert agree >= tol.min_label_agreement, f"arg-max agreement {agree:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["float32", "dynamic", "float16", "int8"])
def test_each_precision_runs_any_batch_within_its_tolerance(digits_cnn, tmp_path, quantization):
    exported = _export(digits_cnn, tmp_path, quantization=quantization)
    assert exported.tolerance == TOLERANCES[quantization]
    assert exported.signature == digits_cnn.signature  # the float API is kept
    assert f"TF {tf.__version__}" in exported.notes[0]
    with load_runtime(exported.path, exported.signature, format="tflite", threads=1) as rt:
        assert isinstance(rt, LiteRTRuntime)
        everything = rt.predict({"pixels": digits_cnn.check})["output"]
        one = rt.predict({"pixels": digits_cnn.check[:1]})["output"]
        seven = rt.predict({"pixels": digits_cnn.check[3:10]})["output"]
    assert everything.dtype == one.dtype == np.float32
    assert one.shape == (1, 10) and seven.shape == (7, 10)
    np.testing.assert_allclose(one, everything[:1], atol=1e-5)
    np.testing.assert_allclose(seven, everything[3:10], atol=1e-5)
    _within(digits_cnn.reference, everything, exported.tolerance)


def test_int8_has_integer_io_tensors_behind_a_float_api(digits_cnn, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    exported = _export(digits_cnn, tmp_path, quantization="int8")
    interpreter = Interpreter(model_path=str(exported.path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == out["dtype"] == np.int8
    # calibrated on pixels in [0, 1]: 256 int8 steps of about 1/255, 0.0 at -128
    scale, zero_point = inp["quantization"]
    assert scale == pytest.approx(1 / 255, rel=0.01) and zero_point == -128
    assert out["quantization"][0] > 0
    assert exported.meta["tflite"]["quantized_tensors"]["pixels"]["dtype"] == "int8"
    assert "full-integer INT8 with int8 input/output, calibrated on 100 rows of the check " \
           "rows, 100 rows of sklearn digits" in exported.notes[0]
    with LiteRTRuntime(exported.path, exported.signature, threads=1, format="tflite") as rt:
        got = rt.predict({"pixels": digits_cnn.check[:5].astype(np.float64)})
    assert got["output"].dtype == np.float32


@pytest.mark.slow
def test_int8_calibrates_on_the_rows_it_is_given(digits_cnn, tmp_path):
    """Rows four times brighter widen the input range four times; synthetic rows say so."""
    exported = _export(digits_cnn, tmp_path, rows=digits_cnn.calibration * 4,
                       quantization="int8", representative_rows=20)
    scale = exported.meta["tflite"]["quantized_tensors"]["pixels"]["scale"]
    assert scale == pytest.approx(4 / 255, rel=0.01)
    assert "calibrated on 20 rows of the check rows" in exported.notes[0]

    source = _source(digits_cnn, tmp_path, digits_cnn.calibration[:10],
                     described="10 synthetic rows (normal floats)")
    exporter = TFLiteExporter()
    synthetic = exporter.export(source, exporter.parse_config({"quantization": "int8"}))
    assert any("synthetic rows is only as good as those rows" in n for n in synthetic.notes)


@pytest.mark.slow
def test_int8_softmax_output_is_named_with_the_logits_way_out(digits_cnn, tmp_path):
    """TFLite quantizes a softmax output on a fixed 1/256 scale; the note says what that
    costs. The logits model (no softmax) gets no such note."""
    probs = keras.Model(digits_cnn.model.input,
                        keras.layers.Softmax(name="probs")(digits_cnn.model.output))
    path = tmp_path / "probs.keras"
    probs.save(path)
    model = SimpleNamespace(path=path, signature=keras_signature(probs, path),
                            calibration=digits_cnn.calibration)
    exported = _export(model, tmp_path, quantization="int8")
    name = model.signature.outputs[0].name
    assert exported.meta["tflite"]["quantized_tensors"][name]["scale"] == pytest.approx(1 / 256)
    assert any(n.startswith(f"output {name} holds softmax probabilities on TFLite's fixed "
                            "int8 scale") and "classifier_activation=None" in n
               for n in exported.notes)
    logits = _export(digits_cnn, tmp_path, quantization="int8")
    assert not any("softmax" in n for n in logits.notes)


def test_int8_with_float_io_keeps_float32_tensors(digits_cnn, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    exported = _export(digits_cnn, tmp_path, quantization="int8", int8_io=False)
    interpreter = Interpreter(model_path=str(exported.path))
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert exported.meta["tflite"]["quantized_tensors"] == {}


def test_int8_without_rows_asks_for_calibration_rows(digits_cnn, tmp_path):
    with pytest.raises(ExportError, match="needs representative rows") as info:
        _export(digits_cnn, tmp_path, rows=digits_cnn.calibration[:0], quantization="int8")
    assert "Pass calibration rows" in str(info.value)


@pytest.mark.slow
def test_runtime_keeps_one_interpreter_per_batch_shape(digits_cnn, tmp_path):
    exported = _export(digits_cnn, tmp_path)
    with LiteRTRuntime(exported.path, exported.signature, threads=1, format="tflite") as rt:
        for size in (1, 7, 1, 7, 7):
            rt.predict({"pixels": digits_cnn.check[:size]})
        assert sorted(k[0][0] for k in rt._by_shape) == [1, 7]
        with pytest.raises(DatasetError, match="Input 'pixels' is missing"):
            rt.predict({"x": digits_cnn.check[:1]})
        with pytest.raises(DatasetError, match="cannot take inputs of shape pixels"):
            rt.predict({"pixels": np.zeros((2, 8, 8, 3), np.float32)})
        assert rt.metadata()["interpreter"].startswith("LiteRT (ai-edge-litert")


def test_runtime_falls_back_to_tf_lite_without_ai_edge_litert(digits_cnn, tmp_path,
                                                              monkeypatch):
    from optiserve.core.errors import MissingExtraError
    from optiserve.runtimes import litert

    exported = _export(digits_cnn, tmp_path, quantization="int8")
    with LiteRTRuntime(exported.path, exported.signature, threads=1, format="tflite") as rt:
        want = rt.predict({"pixels": digits_cnn.check[:7]})["output"]

    def missing(module, *, extra, feature):
        raise MissingExtraError(module, extra, feature)

    monkeypatch.setattr(litert, "require", missing)
    with LiteRTRuntime(exported.path, exported.signature, threads=1, format="tflite") as rt:
        got = rt.predict({"pixels": digits_cnn.check[:7]})["output"]
        assert rt.metadata()["interpreter"].startswith("tf.lite.Interpreter (TensorFlow 2.")
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_savedmodel_exports_like_keras(digits_cnn, tmp_path):
    folder = tmp_path / "savedmodel"
    digits_cnn.model.export(str(folder), verbose=False)
    path = zip_savedmodel(folder, tmp_path / "cnn.savedmodel.zip")
    signature = savedmodel_signature(serving_function(tf.saved_model.load(str(folder)), folder),
                                     folder)
    model = SimpleNamespace(path=path, signature=signature)
    exporter = TFLiteExporter()
    exported = exporter.export(_source(model, tmp_path, digits_cnn.calibration, fmt="savedmodel"),
                               exporter.parse_config({}))
    assert "from the SavedModel's serving signature" in exported.notes[0]
    with LiteRTRuntime(exported.path, signature, threads=1, format="tflite") as rt:
        out = rt.predict({signature.inputs[0].name: digits_cnn.check})
    _within(digits_cnn.reference, out[signature.outputs[0].name], exported.tolerance)


@pytest.mark.slow
def test_many_inputs_and_outputs_keep_their_names(tmp_path):
    """TFLite sorts signature names as strings (output_10 before output_2) and lists its
    output tensors in no useful order: each output must still reach its own name."""
    keras.utils.set_random_seed(1)
    a, b = keras.Input((3,), name="zeta"), keras.Input((5,), name="alpha")
    h = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], [keras.layers.Dense(i + 1)(h) for i in range(12)])
    path = tmp_path / "multi.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    rows = {"zeta": rng.standard_normal((6, 3), np.float32),
            "alpha": rng.standard_normal((6, 5), np.float32)}
    signature = keras_signature(model, path)
    source = Source(path=path, format="keras", signature=signature, meta={}, rows=rows,
                    rows_described="6 random rows", workdir=tmp_path, settings=Settings())
    exported = TFLiteExporter().export(source, TFLiteExporter.parse_config({}))
    want = model([rows["zeta"], rows["alpha"]], training=False)
    with LiteRTRuntime(exported.path, signature, threads=1, format="tflite") as rt:
        got = rt.predict(rows)
    assert list(got) == [f"output_{i}" for i in range(12)]
    for i, ref in enumerate(want):
        np.testing.assert_allclose(got[f"output_{i}"], ref.numpy(), atol=1e-5)


@keras.saving.register_keras_serializable(package="optiserve_tests")
class Cumprod(keras.layers.Layer):
    """tf.math.cumprod: a TF Select op (TFLite builtins lack it)."""

    def call(self, x):
        return tf.math.cumprod(x, axis=1)


@keras.saving.register_keras_serializable(package="optiserve_tests")
class Erfinv(keras.layers.Layer):
    """tf.math.erfinv: in neither TFLite builtins nor TF Select."""

    def call(self, x):
        return tf.math.erfinv(tf.tanh(x) * 0.5)


def _with_layer(layer, tmp_path):
    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(layer()(inp)))
    path = tmp_path / "op.keras"
    model.save(path)
    return SimpleNamespace(path=path, signature=keras_signature(model, path),
                           calibration=np.ones((4, 6), np.float32))


def test_op_outside_builtins_is_named_with_the_ways_out(tmp_path):
    model = _with_layer(Cumprod, tmp_path)
    with pytest.raises(ExportError) as info:
        _export(model, tmp_path)
    message = str(info.value)
    assert "TensorFlow Lite builtins lack the TensorFlow op(s) Cumprod." in message
    assert "select_tf_ops=true" in message and "--format ort" in message
    # the file converts with TF Select ops, but no interpreter here has the Flex delegate
    with pytest.raises(ExportError) as info:
        _export(model, tmp_path, select_tf_ops=True)
    message = str(info.value)
    assert "uses the TF Select (Flex) op(s) Cumprod" in message
    assert "has no Flex delegate" in message and "cannot be verified or served here" in message


def test_op_without_any_tflite_kernel_says_select_ops_would_not_help(tmp_path):
    with pytest.raises(ExportError) as info:
        _export(_with_layer(Erfinv, tmp_path), tmp_path, select_tf_ops=True)
    assert "no kernel for the TensorFlow op(s) Erfinv" in str(info.value)
    assert "select_tf_ops would not help" in str(info.value)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="Option 'quantization' of the tflite export"):
        TFLiteExporter.parse_config({"quantization": "int4"})
    with pytest.raises(ConfigError, match="representative_rows"):
        TFLiteExporter.parse_config({"representative_rows": 0})
    with pytest.raises(ConfigError, match="Options of 'tflite': quantization, int8_io"):
        TFLiteExporter.parse_config({"bits": 8})
