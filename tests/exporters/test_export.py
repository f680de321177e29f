"""Exports: TorchScript, ONNX Runtime mobile (.ort) and OpenVINO IR, each made from a real model,
opened in its own runtime, verified against the source, timed and registered with lineage."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from optiserve import api
from optiserve.core.errors import ConfigError, SignatureMismatchError, UnknownNameError
from optiserve.data.sources import DatasetSpec
from optiserve.exporters.base import ExportError, Tolerance
from optiserve.exporters.export import export_version, reachable
from optiserve.runtimes.base import load_runtime
from tests.cli.test_cli import cli, one_line_error
from tests.server import conftest as server_conftest

make_server = server_conftest.make_server  # a real server on a loopback port, as tests/server use

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")

FAST = {"iterations": 5, "batch_sizes": (1, 4)}


class SmallCNN(torch.nn.Module):
    """Conv + BatchNorm + Dropout: eval mode and Conv+BN folding both matter here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if h.shape[0] > 1000:  # control flow only scripting keeps
            h = h * 0
        return self.fc(self.drop(h.flatten(1)))


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    net = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.train()  # handed over in training mode: the export must enforce eval()


def _digits_npz(tmp_path, digits):
    path = tmp_path / "digits.npz"
    np.savez(path, x=digits.X_val.reshape(-1, 1, 8, 8))
    return DatasetSpec(source="file", path=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trace", "script"])
def test_torchscript_from_a_module_is_eval_frozen_and_matches_eager(sqlite_registry, cnn, mode,
                                                                    tmp_path):
    x = torch.randn(4, 1, 8, 8)
    res = api.export(cnn, "torchscript", name="cnn", example_inputs=(x,), options={"mode": mode},
                     registry=sqlite_registry, output=tmp_path / "out", **FAST)
    assert cnn.training, "the caller's module is left as given"
    v = res.version
    assert (v.format, v.framework, v.parent) == ("torchscript", "torch", 1)
    assert v.passes[-1]["name"] == "export" and v.passes[-1]["set"]["format"] == "torchscript"
    assert res.verification["passed"] and res.verification["outputs"]["output"][
        "max_abs_error"] < 1e-4
    assert f"torch.jit.{mode}" in res.notes[0] and "frozen" in res.notes[0]
    loaded = torch.jit.load(res.files[0])
    with torch.inference_mode():
        eager = cnn.eval()(x)
        # deterministic: Dropout is off, BatchNorm uses its running statistics
        assert torch.allclose(loaded(x), eager, atol=1e-5) and torch.equal(loaded(x), loaded(x))
    assert set(res.latency) == {"source", "export"} and set(res.latency["export"]) == {1, 4}
    assert v.meta["exported_from"] == "cnn:1" and "export" in v.meta
    # an export is served or optimized only when named: "cnn" is still the ready version 1
    assert v.status == "exported" and sqlite_registry.resolve("cnn").version == 1


@pytest.mark.slow
def test_torchscript_from_a_torch_export_program(sqlite_registry, cnn):
    program = torch.export.export(cnn.eval(), (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", max=1000)}})
    api.register("prog", program, registry=sqlite_registry)
    res = api.export("prog", "torchscript", registry=sqlite_registry, iterations=5,
                     batch_sizes=(2, 4))
    assert res.source.format == "pt2" and res.version.format == "torchscript"
    assert "torch.export program" in res.notes[0]


def test_scripting_a_stored_file_needs_the_module(sqlite_registry, cnn):
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    program = torch.export.export(cnn.eval(), (torch.randn(2, 1, 8, 8),))
    api.register("cnn", program, registry=sqlite_registry)
    with pytest.raises(ExportError, match="Scripting needs the Python nn.Module") as err:
        api.export("cnn", "torchscript", options={"mode": "script"}, registry=sqlite_registry)
    assert "mode 'trace'" in err.value.hint
    assert len(sqlite_registry.versions("cnn")) == 2


@pytest.mark.slow
def test_ort_mobile_from_a_torch_model_with_operator_config(sqlite_registry, cnn, digits,
                                                            tmp_path):
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    res = api.export("cnn", "ort", data=_digits_npz(tmp_path, digits), output=tmp_path / "o",
                     registry=sqlite_registry, **FAST)
    v = res.version
    assert (v.format, v.parent) == ("ort", 1)
    assert [p["name"] for p in v.passes] == ["onnx_conversion", "export"]
    assert res.verification["rows"].startswith("397 rows of")
    stats = res.verification["outputs"]["output"]
    assert stats["max_abs_error"] < 1e-4 and stats["argmax_agreement"] == 1.0
    ort_file, ops_file = sorted(res.files)[0], sorted(res.files)[1]
    assert ort_file.endswith("model.ort")
    assert open(ort_file, "rb").read(8)[4:8] == b"ORTM"  # the flatbuffer's file identifier
    ops = open(ops_file).read()
    assert "Conv" in ops and "Gemm" in ops and v.meta["ort_operators"] >= 3
    # the registered version runs in ONNX Runtime from the .ort file
    with load_runtime(sqlite_registry.path(v), v.signature, format="ort", threads=1) as rt:
        out = rt.predict({"x": digits.X_val[:3].reshape(3, 1, 8, 8)})
    assert next(iter(out.values())).shape == (3, 10)


@pytest.mark.slow
def test_ort_mobile_from_scikit_learn_keeps_labels_exact(sqlite_registry, logreg, breast_cancer):
    api.register("lr", logreg, registry=sqlite_registry)
    res = api.export("lr", "ort", registry=sqlite_registry, **FAST)
    outputs = res.verification["outputs"]
    assert outputs["label"]["agreement"] == 1.0
    assert outputs["probabilities"]["max_abs_error"] < 1e-4


@pytest.mark.slow
def test_openvino_ir_writes_xml_and_bin(sqlite_registry, cnn, tmp_path):
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    res = api.export("cnn", "openvino", output=tmp_path / "ir", registry=sqlite_registry, **FAST)
    assert sorted(p.rsplit("/", 1)[1] for p in res.files) == ["model.bin", "model.xml"]
    assert res.version.format == "openvino"
    with zipfile.ZipFile(sqlite_registry.path(res.version)) as z:
        assert sorted(z.namelist()) == ["model.bin", "model.xml"]
    assert res.verification["outputs"]["output"]["max_abs_error"] < 1e-4
    assert "synthetic rows" in res.verification["rows"]


@pytest.mark.slow
def test_openvino_static_int8_is_held_to_cosine(sqlite_registry, cnn, digits, tmp_path):
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    res = api.export("cnn", "openvino", options={"int8": "static"},
                     data=_digits_npz(tmp_path, digits), registry=sqlite_registry, **FAST)
    stats = res.verification["outputs"]["output"]
    assert res.verification["tolerance"] == "mean cosine >= 0.95"
    assert 0.95 <= stats["mean_cosine"] < 1.0 and stats["max_abs_error"] > 1e-4
    assert "INT8" in " ".join(res.notes)


@pytest.mark.slow
def test_an_export_is_served_when_named_and_never_by_latest(make_server, cnn, digits):
    """A deployment's "latest" keeps the ready version; a "specific" policy serves the .ort
    file in ONNX Runtime, with the same outputs as the source."""
    live = make_server(jobs=False)
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=live.registry)
    exported = api.export("cnn", "ort", registry=live.registry, **FAST).version
    http = live.client()
    x = digits.X_val[:3].reshape(3, 1, 8, 8)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    assert http.put("/api/v1/deployments/cnn", json={"model": "cnn"}).status_code == 200
    assert http.post("/v2/models/cnn/infer", json=body).json()["model_version"] == "1"
    r = http.put("/api/v1/deployments/cnn", json={
        "model": "cnn", "versions": {"specific": [exported.version]}})
    assert r.status_code == 200, r.text
    r = http.post("/v2/models/cnn/infer", json=body)
    assert r.status_code == 200 and r.json()["model_version"] == str(exported.version), r.text
    got = np.asarray(r.json()["outputs"][0]["data"]).reshape(3, 10)
    with torch.inference_mode():
        np.testing.assert_allclose(got, cnn.eval()(torch.from_numpy(x)).numpy(), atol=1e-4)


# -- bad input: a clear error, nothing stored -------------------------------------------------
def test_tree_model_cannot_reach_openvino_and_is_told_ort(sqlite_registry, forest):
    api.register("forest", forest, registry=sqlite_registry)
    with pytest.raises(ExportError, match="TreeEnsemble") as err:
        api.export("forest", "openvino", registry=sqlite_registry)
    assert "'ort'" in err.value.hint
    assert len(sqlite_registry.versions("forest")) == 1


@pytest.mark.parametrize("fmt", ["torchscript", "tflite"])
def test_a_format_the_framework_cannot_reach_lists_those_it_can(sqlite_registry, logreg, fmt):
    api.register("lr", logreg, registry=sqlite_registry)
    with pytest.raises(ExportError, match=f"the {fmt} export is made from") as err:
        api.export("lr", fmt, registry=sqlite_registry)
    assert "ort, openvino" in err.value.hint
    assert reachable("pkl") == ["ort", "openvino"]
    assert len(sqlite_registry.versions("lr")) == 1


def test_unknown_format_and_bad_option_fail_before_any_work(sqlite_registry, logreg):
    api.register("lr", logreg, registry=sqlite_registry)
    with pytest.raises(UnknownNameError, match="export format 'coreml'"):
        api.export("lr", "coreml", registry=sqlite_registry)
    with pytest.raises(ConfigError, match="Option 'optimization_level' of the ort export"):
        api.export("lr", "ort", options={"optimization_level": "max"}, registry=sqlite_registry)
    with pytest.raises(ConfigError, match="Option 'colour'"):
        api.export("lr", "ort", options={"colour": 1}, registry=sqlite_registry)
    assert len(sqlite_registry.versions("lr")) == 1


@pytest.mark.slow
def test_an_export_outside_its_tolerance_is_refused_and_not_stored(sqlite_registry, cnn,
                                                                   monkeypatch, digits, tmp_path):
    """A real INT8 IR held to a float tolerance: the numbers are in the error, nothing stored."""
    from optiserve.exporters import openvino_ir

    real = openvino_ir.OpenVINOExporter.export

    def strict(self, source, config):
        done = real(self, source, config)
        done.tolerance = Tolerance(atol=1e-6)
        return done

    monkeypatch.setattr(openvino_ir.OpenVINOExporter, "export", strict)
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    with pytest.raises(ExportError, match=r"max abs error \S+ > max abs error <= 1e-06.*"
                                          r"Nothing was stored"):
        export_version(sqlite_registry, "cnn", "openvino", options={"int8": "static"},
                       data=_digits_npz(tmp_path, digits), iterations=5)
    assert len(sqlite_registry.versions("cnn")) == 1


@pytest.mark.slow
def test_calibration_rows_apart_from_check_rows_and_a_caller_tolerance(sqlite_registry, cnn,
                                                                       digits, tmp_path):
    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=digits.X_train[:200].reshape(-1, 1, 8, 8))
    res = api.export("cnn", "openvino", options={"int8": "static"},
                     data=_digits_npz(tmp_path, digits),
                     calibration={"source": "file", "path": str(calib)},
                     tolerance={"min_cosine": 0.9, "min_label_agreement": 0.8},
                     registry=sqlite_registry, **FAST)
    assert "calibrated on 100 rows of 200 rows of calib" in " ".join(res.notes)
    assert res.verification["rows"].startswith("397 rows of")
    assert res.verification["tolerance"] == "mean cosine >= 0.9, arg-max agreement >= 80%"
    with pytest.raises(ConfigError, match="Unknown tolerance 'cosine'"):
        api.export("cnn", "ort", tolerance={"cosine": 0.9}, registry=sqlite_registry)


def test_outputs_are_paired_by_position_when_names_differ():
    """Converters rename outputs (TFLite's StatefulPartitionedCall:0): pairs go by position."""
    from optiserve.exporters.export import _pair

    a, b = np.ones((2, 3)), np.zeros((2, 3))
    assert list(_pair({"logits": a}, {"Identity:0": b})) == ["logits"]


@pytest.mark.slow
def test_cli_export_writes_files_and_json(tmp_path, optiserve_home, logreg):
    import pickle

    model = tmp_path / "lr.pkl"
    model.write_bytes(pickle.dumps(logreg))
    assert cli("register", "lr", str(model), home=optiserve_home).returncode == 0
    out = tmp_path / "mobile"
    proc = cli("export", "lr", "--format", "ort", "-O", "optimization_level=extended",
               "--output", str(out), "--iterations", "5", "--batch-sizes", "1", "--json",
               home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["format"] == "ort" and body["version"] == 2 and body["runtime"] == "onnxruntime"
    assert body["verification"]["passed"] and (out / "model.ort").is_file()
    assert set(body["latency_ms"]) == {"source", "export"}
    table = cli("export", "lr:1", "--format", "ort", "--iterations", "5", "--batch-sizes",
                "1", home=optiserve_home)
    assert table.returncode == 0 and "registered lr:3" in table.stdout and "speedup" in \
        table.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--format", "coreml"], "Unknown export format 'coreml'"),
    (["--format", "torchscript"], "the torchscript export is made from"),
    (["--format", "ort", "-O", "nonsense"], "is not NAME=VALUE"),
    (["--format", "ort", "--tolerance", "max_error=1"], "Unknown tolerance 'max_error'"),
    (["--format", "ort", "--label-column", "label"], "no --data was given. Give the check rows"),
])
def test_cli_export_mistakes_are_one_line(tmp_path, optiserve_home, logreg, args, says):
    import pickle

    model = tmp_path / "lr.pkl"
    model.write_bytes(pickle.dumps(logreg))
    assert cli("register", "lr", str(model), home=optiserve_home).returncode == 0
    proc = cli("export", "lr", *args, home=optiserve_home)
    assert proc.returncode == 2 and says in one_line_error(proc)


@pytest.mark.slow
def test_cli_export_npz_keys_that_miss_the_input_say_so_and_label_column_fixes_it(
        tmp_path, optiserve_home, logreg, breast_cancer):
    """An NPZ whose arrays are not named after the model's input: one line naming the arrays
    found, the input expected and the fix (no numpy traceback); --label-column is the fix."""
    import pickle

    model = tmp_path / "lr.pkl"
    model.write_bytes(pickle.dumps(logreg))
    assert cli("register", "lr", str(model), home=optiserve_home).returncode == 0
    check = tmp_path / "check.npz"
    np.savez(check, features=breast_cancer.X_val, label=breast_cancer.y_val)
    args = ("export", "lr", "--format", "ort", "--data", str(check), "--iterations", "5",
            "--batch-sizes", "1")
    proc = cli(*args, home=optiserve_home)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "arrays [features:float64[169, 30], label:int64[169]]" in line  # found
    assert "expects [input:float64[-1, 30]]" in line  # expected
    assert "np.savez(path, input=...)" in line and "--label-column label" in line  # the fix
    fixed = cli(*args, "--label-column", "label", "--json", home=optiserve_home)
    assert fixed.returncode == 0, fixed.stderr
    body = json.loads(fixed.stdout)
    assert body["verification"]["rows"].startswith("169 rows of check file")
    assert body["verification"]["passed"]
    typo = cli(*args, "--label-column", "labels", home=optiserve_home)
    assert "Label column 'labels' is not in the data" in one_line_error(typo)
    assert "Columns found: features, label." in one_line_error(typo)


@pytest.mark.slow
def test_api_export_label_column_and_the_one_recorded_with_the_model(sqlite_registry, logreg,
                                                                     breast_cancer, tmp_path):
    check = tmp_path / "check.npz"
    np.savez(check, x=breast_cancer.X_val[:50], y=breast_cancer.y_val[:50])
    api.register("lr", logreg, registry=sqlite_registry)
    res = api.export("lr", "ort", data={"source": "file", "path": str(check)},
                     label_column="y", registry=sqlite_registry, **FAST)
    assert res.verification["passed"] and res.verification["rows"].startswith("50 rows")
    with pytest.raises(SignatureMismatchError, match=r"\[x:float64\[50, 30\], y:int64\[50\]\]"
                       ) as info:  # without it: refused, saying so
        api.export("lr:1", "ort", data={"source": "file", "path": str(check)},
                   registry=sqlite_registry, **FAST)
    assert "label_column='y'" in info.value.hint
    # a model registered with its label column sets that column aside by itself
    api.register("lr2", logreg, registry=sqlite_registry, label_column="y")
    res = api.export("lr2", "ort", data={"source": "file", "path": str(check)},
                     registry=sqlite_registry, **FAST)
    assert res.verification["passed"]


@pytest.mark.slow
def test_ort_mobile_targets_this_machine_unless_told(sqlite_registry, cnn, tmp_path):
    """Default target_platform: the machine exporting (amd64 on x86, arm on ARM); the x86
    file then carries ONNX Runtime's NCHWc layout, which the portable ARM file must not."""
    from optiserve.exporters.ort_mobile import host_platform

    api.register("cnn", cnn, example_inputs=(torch.randn(2, 1, 8, 8),), registry=sqlite_registry)
    host = host_platform()
    other = "arm" if host == "amd64" else "amd64"
    default = api.export("cnn", "ort", registry=sqlite_registry, output=tmp_path / "d", **FAST)
    told = api.export("cnn:1", "ort", options={"target_platform": other},
                      registry=sqlite_registry, output=tmp_path / "o", **FAST)
    assert default.version.passes[-1]["config"]["target_platform"] == host
    assert f"optimizations for {host} (this machine)" in default.notes[-1]
    assert told.version.passes[-1]["set"]["target_platform"] == other
    assert f"optimizations for {other}, not this {host} machine" in told.notes[-1]
    ops = {res.version.passes[-1]["config"]["target_platform"]:
           (tmp_path / d / "model.required_operators.config").read_text()
           for res, d in ((default, "d"), (told, "o"))}
    assert "com.microsoft.nchwc" in ops["amd64"] and "com.microsoft.nchwc" not in ops["arm"]
