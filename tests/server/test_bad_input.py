"""Each bad input the issue names: a clear 4xx with {"error": ...}, and nothing stored."""

from __future__ import annotations

import numpy as np
import pytest

from tests.builders import linear_onnx
from tests.server.test_models import upload

OPT = "/api/v1/inference/optimize"


@pytest.fixture
def lin(server):
    """A registered 4-feature linear ONNX model, and validation data in the data folder."""
    assert upload(server.client(), "lin", linear_onnx().SerializeToString()).status_code == 201
    folder = server.settings.data_folder
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "val.npz", x=np.random.default_rng(0).standard_normal((32, 4)).astype(
        np.float32))
    return server


def _no_new_runs_or_versions(live):
    assert live.registry.runs.list() == []
    assert [v.version for v in live.registry.versions("lin")] == [1]


def _error(r, code: int, *needles: str) -> str:
    assert r.status_code == code, (r.status_code, r.text)
    message = r.json()["error"]
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


def test_malformed_json(lin):
    r = lin.client().post(OPT, content=b'{"model_id": "lin", ', headers={
        "Content-Type": "application/json"})
    _error(r, 400, "not valid JSON")
    _no_new_runs_or_versions(lin)


def test_unknown_field(lin):
    _error(lin.client().post(OPT, json={"model_id": "lin", "optimisations": ["quantization"]}),
           422, "Unknown field 'optimisations'")
    _no_new_runs_or_versions(lin)


def test_unknown_model(lin):
    _error(lin.client().post(OPT, json={"model_id": "nope"}), 404, "No model 'nope'", "lin")
    _no_new_runs_or_versions(lin)


def test_unknown_optimization_name(lin):
    _error(lin.client().post(OPT, json={"model_id": "lin", "optimizations": ["quantisation"]}),
           400, "Unknown optimization 'quantisation'", "quantization")
    _no_new_runs_or_versions(lin)


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0, 1.5, -0.2])
def test_threshold_out_of_range(lin, threshold):
    _error(lin.client().post(OPT, json={"model_id": "lin", "accuracy_threshold": threshold}),
           422, "accuracy_threshold")
    _no_new_runs_or_versions(lin)


def test_sql_error(lin):
    body = {"model_id": "lin", "validation_dataset": {
        "source": "sql", "query": "SELECT * FROM ml_features.no_such_table"}}
    _error(lin.client().post(OPT, json=body), 400, "no_such_table")
    body["validation_dataset"]["query"] = "DELETE FROM ml_features.customer_churn"
    _error(lin.client().post(OPT, json=body), 400, "Refused SQL")
    _no_new_runs_or_versions(lin)


def test_sql_source_is_named_never_a_url(lin):
    body = {"model_id": "lin", "validation_dataset": {
        "source": "sql", "query": "SELECT 1", "data_source": "postgresql://evil/db"}}
    _error(lin.client().post(OPT, json=body), 400, "Unknown data source")
    _no_new_runs_or_versions(lin)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "../home/registry.db"])
def test_path_outside_the_data_folder(lin, path):
    body = {"model_id": "lin", "validation_dataset": {"source": "file", "path": path}}
    _error(lin.client().post(OPT, json=body), 400, "outside the data folder",
           "OPTISERVE_DATA_DIR")
    _no_new_runs_or_versions(lin)


def test_student_model_outside_the_data_folder_is_refused(lin):
    """A distillation student is a model file the server would load: data folder only."""
    body = {"model_id": "lin", "optimizations": ["distillation"],
            "pass_configs": {"distillation": {"student": "/tmp/student.pt2"}}}
    _error(lin.client().post(OPT, json=body), 400, "Student model file '/tmp/student.pt2' is "
           "outside the data folder")
    _no_new_runs_or_versions(lin)


def test_symlink_out_of_the_data_folder_is_refused(lin, tmp_path):
    outside = tmp_path / "secret.npz"
    np.savez(outside, x=np.zeros((2, 4), np.float32))
    (lin.settings.data_folder / "link.npz").symlink_to(outside)
    body = {"model_id": "lin", "validation_dataset": {"source": "file", "path": "link.npz"}}
    _error(lin.client().post(OPT, json=body), 400, "outside the data folder")


@pytest.mark.slow
def test_file_in_the_data_folder_is_accepted(lin):
    body = {"model_id": "lin", "optimizations": ["graph_optimization"], "iterations": 5,
            "warmup": 1, "validation_dataset": {"source": "file", "path": "val.npz"}}
    r = lin.client().post(OPT + "?wait=true", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"


def test_data_that_does_not_fit_the_model(lin):
    np.savez(lin.settings.data_folder / "wide.npz", x=np.zeros((8, 7), np.float32))
    body = {"model_id": "lin", "validation_dataset": {"source": "file", "path": "wide.npz"}}
    _error(lin.client().post(OPT, json=body), 400, "the model expects [-1, 4]")
    _no_new_runs_or_versions(lin)


def test_unknown_optimization_id(lin):
    c = lin.client()
    _error(c.get("/api/v1/inference/optimizations/opt-000000000000"), 404, "No optimization")
    _error(c.delete("/api/v1/inference/optimizations/opt-000000000000"), 404, "No optimization")


def test_bad_benchmark_requests(lin):
    c = lin.client()
    _error(c.post("/api/v1/inference/benchmark", json={"model_id": "lin", "iterations": 0}),
           422, "iterations")
    _error(c.post("/api/v1/inference/benchmark", json={"model_id": "lin", "batch_sizes": []}),
           422, "batch_sizes")
    _error(c.post("/api/v1/inference/benchmark", json={"model_id": "ghost"}), 404, "ghost")


def test_unknown_endpoint_is_json_404(lin):
    _error(lin.client().get("/api/v1/nothing"), 404, "No such endpoint")


def test_odd_values_are_4xx_not_500(lin):
    c = lin.client()
    nul = {"model_id": "lin", "validation_dataset": {"source": "file", "path": "a\u0000b.npz"}}
    _error(c.post(OPT, json=nul), 400, "not usable")
    long = {"model_id": "lin", "validation_dataset": {"source": "file", "path": "a" * 5000}}
    assert c.post(OPT, json=long).status_code == 400
    _error(c.post(OPT, json={"model_id": "lin:\u00b2"}), 400, "is not a number")
    _error(c.post(OPT, json={"model_id": "lin", "batch_sizes": [10_000_000]}), 422,
           "batch_sizes")
    _error(c.post(OPT, json={"model_id": "lin", "iterations": 10**9}), 422, "iterations")
    r = upload(c, "ts", b"PK\x03\x04 not really", "m.pt", inputs=["x:float32[-2,3]"])
    assert 400 <= r.status_code < 500
    _no_new_runs_or_versions(lin)


@pytest.mark.parametrize("spec", ["x:float32[-2,3]", "x:float32[0,3]", "x:float32[100000,100000]"])
def test_unusable_input_dimensions_are_a_config_error(spec):
    from optiserve.convert.torch import parse_input_spec
    from optiserve.core.errors import ConfigError

    with pytest.raises(ConfigError, match="dimension that is not usable"):
        parse_input_spec(spec)
