"""POST /api/v1/models/{name}/predict with the real server: tabular records and tensors
checked against ONNX Runtime in-process, an image classifier checked against the same
preprocessing in numpy, and every bad input a clear 4xx {"error": ...}."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optiserve import api
from tests.builders import _model, linear_onnx

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

LABELS = ["cat", "dog", "bird", "fish", "frog"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE = {"resize": 20, "crop": [16, 16], "mean": list(MEAN), "std": list(STD)}


def cnn_onnx(classes: int = len(LABELS)):
    """[N, 3, 16, 16] float32 -> logits [N, classes]: Conv, Relu, global pooling, Gemm."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "K"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "KB"),
             numpy_helper.from_array(rng.standard_normal((4, classes)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["image", "K", "KB"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "B"], ["logits"])]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                     ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    return _model(graph)


def png(width: int = 40, height: int = 30, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (only its header; a decoder would fail later)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def expected_image(data: bytes) -> np.ndarray:
    """The declared preprocessing, step by step (torchvision's Resize(20), CenterCrop(16),
    ToTensor, Normalize)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    im = im.resize((int(20 * w / h), 20) if h < w else (20, int(20 * h / w)), Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - 16) / 2)), int(round((w - 16) / 2))
    im = im.crop((left, top, left + 16, top + 16))
    x = np.asarray(im, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def deploy(live, name: str, **settings):
    r = live.client().put(f"/api/v1/deployments/{name}", json=settings)
    assert r.status_code == 200, r.text
    return r.json()


def predict(live, name: str, **kw):
    return live.client().post(f"/api/v1/models/{name}/predict", **kw)


def image_post(live, name: str, data: bytes, field: str = "file", **kw):
    return predict(live, name, files={field: ("x.png", io.BytesIO(data), "image/png")}, **kw)


def error(r, code: int, *needles: str) -> str:
    assert r.status_code == code, (r.status_code, r.text)
    message = r.json()["error"]
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


@pytest.fixture
def live(make_server, tmp_path):
    """A server with 'lin' (4 features -> 3 outputs, no predict settings, batches of at most
    4) and 'cnn' (the image classifier with softmax and top-3 labels) deployed."""
    live = make_server(jobs=False)
    lin_path, cnn_path = tmp_path / "lin.onnx", tmp_path / "cnn.onnx"
    lin_path.write_bytes(linear_onnx().SerializeToString())
    cnn_path.write_bytes(cnn_onnx().SerializeToString())
    api.register("lin", lin_path, registry=live.registry)
    api.register("cnn", cnn_path, registry=live.registry)
    deploy(live, "lin", max_batch_size=4)
    deploy(live, "cnn", predict={"image": IMAGE, "softmax": True, "top_k": 3,
                                 "labels": LABELS})
    live.lin = ort.InferenceSession(str(lin_path), providers=["CPUExecutionProvider"])
    live.cnn = ort.InferenceSession(str(cnn_path), providers=["CPUExecutionProvider"])
    return live


# -- tabular --------------------------------------------------------------------------------
@pytest.mark.slow
def test_records_and_tensors_match_onnxruntime(live):
    X = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    want = live.lin.run(None, {"x": X})[0]
    # 10 records for a deployment batching at most 4: split, batched, joined in order
    records = [{f"f{i}": float(v) for i, v in enumerate(row)} for row in X]
    r = predict(live, "lin", json={"records": records})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"]) == ("lin", "1")
    got = np.array([p["y"] for p in body["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # by input name, as tensors, and one example without its batch dimension
    for payload in ({"records": [{"x": X[0].tolist()}, {"x": X[1].tolist()}]},
                    {"inputs": {"x": X[:2].tolist()}}):
        preds = predict(live, "lin", json=payload).json()["predictions"]
        np.testing.assert_allclose([p["y"] for p in preds], want[:2], rtol=1e-5, atol=1e-5)
    one = predict(live, "lin", json={"inputs": {"x": X[0].tolist()}}).json()["predictions"]
    np.testing.assert_allclose(one[0]["y"], want[0], rtol=1e-5, atol=1e-5)
    # an explicit version, and integers for float features
    r = predict(live, "lin", params={"version": "1"}, json={"records": [
        {"a": 1, "b": 0, "c": 0, "d": 0}]})
    np.testing.assert_allclose(r.json()["predictions"][0]["y"],
                               live.lin.run(None, {"x": np.eye(1, 4, dtype=np.float32)})[0][0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_sklearn_records_by_feature_name_with_its_classes(make_server, breast_cancer):
    from sklearn.linear_model import LogisticRegression

    live = make_server(jobs=False)
    names = [f"feat_{i}" for i in range(30)]
    est = LogisticRegression(solver="liblinear").fit(breast_cancer.X_train,
                                                     breast_cancer.y_train)
    est.feature_names_in_ = np.array(names, dtype=object)
    api.register("bc", est, registry=live.registry)
    deploy(live, "bc", predict={"output": "probabilities", "top_k": 2})
    X = breast_cancer.X_val[:5]
    # columns in another order than trained: bound by name
    records = [{n: float(row[i]) for i, n in reversed(list(enumerate(names)))} for row in X]
    r = predict(live, "bc", json={"records": records})
    assert r.status_code == 200, r.text
    proba = est.predict_proba(X)
    for row, pred in zip(proba, r.json()["predictions"]):
        best = int(np.argmax(row))
        assert [p["index"] for p in pred] == [best, 1 - best]
        assert [p["label"] for p in pred] == [str(est.classes_[best]),
                                              str(est.classes_[1 - best])]
        np.testing.assert_allclose([p["score"] for p in pred], row[[best, 1 - best]],
                                   rtol=1e-6)
    del records[2]["feat_7"]
    records[0]["feat_x"] = 1.0
    error(predict(live, "bc", json={"records": records}), 400, "unknown 'feat_x'")
    del records[0]["feat_x"]
    error(predict(live, "bc", json={"records": records}), 400, "Record 2 lacks 'feat_7'")


# -- images ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_image_top_k_labels_match_numpy(live):
    data = png(40, 30)
    r = image_post(live, "cnn", data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"]) == ("cnn", "1")
    probs = softmax(live.cnn.run(None, {"image": expected_image(data)})[0].astype(np.float64))
    best = np.argsort(-probs[0])[:3]
    (pred,) = body["predictions"]
    assert [p["index"] for p in pred] == best.tolist()
    assert [p["label"] for p in pred] == [LABELS[i] for i in best]
    np.testing.assert_allclose([p["score"] for p in pred], probs[0, best], rtol=1e-4,
                               atol=1e-6)

    # portrait, grayscale and JPEG images go through the same steps
    for other in (png(30, 50, seed=1), png(33, 21, mode="L", seed=2)):
        r = image_post(live, "cnn", other)
        assert r.status_code == 200, r.text
        probs = softmax(live.cnn.run(None, {"image": expected_image(other)})[0]
                        .astype(np.float64))
        assert [p["index"] for p in r.json()["predictions"][0]] == \
            np.argsort(-probs[0])[:3].tolist()
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(64, 48))).save(buf, "JPEG")
    assert image_post(live, "cnn", buf.getvalue()).status_code == 200


def test_image_raw_logits_without_post_processing(live):
    deploy(live, "cnn", predict={"image": {**IMAGE, "layout": "NCHW"}})
    data = png(24, 24)
    r = image_post(live, "cnn", data)
    assert r.status_code == 200, r.text
    want = live.cnn.run(None, {"image": expected_image(data)})[0]
    np.testing.assert_allclose(r.json()["predictions"][0]["logits"], want[0], rtol=1e-4,
                               atol=1e-5)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_images(live):
    error(image_post(live, "cnn", b"this is not an image"), 400, "not an image")
    error(image_post(live, "cnn", b""), 400, "empty")
    error(image_post(live, "cnn", png(), field="picture"), 400, "no field 'file'")
    error(predict(live, "cnn", data={"file": "cat.png"}, files={"other": ("a", b"x")}), 400,
          "'file' is text")
    error(image_post(live, "cnn", huge_png_header(8000, 6000)), 400, "48 megapixels")
    error(image_post(live, "cnn", png()[:200]), 400, "truncated")
    error(image_post(live, "lin", png()), 400, "declares no image processing", "predict")
    error(predict(live, "nope", files={"file": ("x.png", png(), "image/png")}), 404, "nope")
    deploy(live, "cnn", predict={"image": {"crop": [16, 16]}})
    error(image_post(live, "cnn", png(10, 8)), 400, "smaller than the crop")


@pytest.mark.slow
def test_bad_json(live):
    post = lambda body, **kw: predict(live, "lin", json=body, **kw)  # noqa: E731
    error(post({}), 400, "neither 'records' nor 'inputs'")
    error(post({"rows": []}), 400, "Unknown field 'rows'")
    error(post([1, 2]), 400, "JSON array, not an object")
    error(post({"records": []}), 400, "non-empty list")
    error(post({"records": [[1, 2, 3, 4]]}), 400, "Record 0 is a JSON array")
    error(post({"records": [{"a": 1, "b": 2}]}), 400, "takes 4 features", "2 columns")
    error(post({"records": [{"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 1, "b": 2, "c": 3}]}),
          400, "Record 1 lacks 'd'")
    error(post({"records": [{"a": 1, "b": "high", "c": 3, "d": 4}]}), 400,
          "column 'b' of record 0", '"high"', "takes a number")
    error(post({"records": [{"a": 1, "b": None, "c": 3, "d": 4}]}), 400, "NaN")
    error(post({"records": [{"x": [1, 2, 3, 4], "z": 1}]}), 400, "unknown columns 'z'")
    error(post({"inputs": {"x": [[1, 2, 3, 4], [1, 2]]}}), 400, "different length")
    error(post({"inputs": {"z": [[1, 2, 3, 4]]}}), 400, "no input 'z'", "x")
    error(post({"inputs": {"x": [[1, 2, 3]]}}), 400, "shape")
    error(post({"inputs": {"x": [[[[[1]]]]]}}), 400, "shape")
    error(post({"inputs": {"x": [[1, 2, 3, {"a": 1}]]}}), 400, "takes a number")
    error(predict(live, "lin", content=b'{"records": [', headers={
        "Content-Type": "application/json"}), 400, "not valid JSON")
    error(predict(live, "lin", content=b"", headers={"Content-Type": "application/json"}),
          400, "empty")
    error(predict(live, "lin", content=b"f0,f1", headers={"Content-Type": "text/csv"}), 415,
          "text/csv")
    error(predict(live, "nope", json={"records": [{"a": 1}]}), 404, "No model 'nope'")
    error(predict(live, "lin", params={"version": "7"}, json={"inputs": {"x": [0] * 4}}), 404,
          "no version '7'")
    r = live.client(token=None).post("/api/v1/models/lin/predict", json={"inputs": {}})
    error(r, 401)


@pytest.mark.slow
def test_bad_predict_settings(live):
    c = live.client()
    r = c.put("/api/v1/deployments/cnn", json={"predict": {"image": {"mean": [0.5, 0.5]}}})
    error(r, 400, "predict.image", "'mean' has 2 values")
    error(c.put("/api/v1/deployments/cnn", json={"predict": {"image": {"crop": [16, 16]},
                                                              "topk": 3}}), 400, "topk")
    # settings that parse but do not fit the model: refused when deploying, and what was
    # deployed before keeps serving
    deploy(live, "cnn", predict={"image": IMAGE})
    error(c.put("/api/v1/deployments/cnn", json={"predict": {"image": IMAGE,
                                                              "labels": ["a", "b"]}}),
          400, "2 names", "5 classes")
    error(c.put("/api/v1/deployments/cnn", json={"predict": {"image": {"resize": [20, 20]}}}),
          400, "20x20", "16x16")
    assert image_post(live, "cnn", png()).status_code == 200
