"""`optimizations: ["auto"]` end to end, and the bad input that must cost only the candidates it
concerns: the run goes on with the others and the report says why."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import optiserve
from tests.builders import mlp_onnx

pytestmark = pytest.mark.slow


@pytest.fixture
def mlp(sqlite_registry, tmp_path):
    optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)
    rows = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=rows)
    return {"source": "file", "path": str(tmp_path / "val.npz")}


def _optimize(registry, validation, **kwargs):
    return optiserve.optimize("mlp", registry=registry, validation_dataset=validation,
                              accuracy_threshold=0.9, iterations=5, warmup=1, **kwargs)


def test_auto_measures_every_kind_and_says_what_it_left_out(sqlite_registry, mlp):
    result = _optimize(sqlite_registry, mlp, optimizations=["auto"], batch_sizes=[1, 32])
    labels = [c.artifact.label for c in result.candidates]
    methods = {p["config"].get("method") for c in result.candidates for p in c.artifact.passes
               if p["name"] == "quantization"}
    assert methods == {"dynamic", "static"}
    assert any(label.startswith("openvino") for label in labels)
    assert {c.runtime for c in result.candidates} == {"onnxruntime", "openvino"}
    notes = " | ".join(result.notes)
    assert "auto left out fp16 and tensorrt: no GPU here" in notes
    assert "auto left out qat: it trains, and the request has no training_dataset" in notes
    assert "chosen: " in notes  # why the winner won, in numbers
    details = result.details()["details"]
    assert details["hardware"]["cores"] >= 1 and "summary" in details["hardware"]
    assert set(details["fastest_by_batch_size"]) == {"1", "32"}
    assert result.chosen.gate.passed


def test_bad_calibration_data_skips_only_static_int8(sqlite_registry, mlp, tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 3), np.float32))  # 3 features, not 64
    result = _optimize(sqlite_registry, mlp, optimizations=["quantization"],
                       calibration_dataset={"source": "file", "path": str(tmp_path / "calib.npz")})
    methods = {c.artifact.passes[-1]["config"]["method"] for c in result.candidates}
    assert methods == {"dynamic"} and result.status == "completed"
    notes = " | ".join(result.notes)
    assert "the calibration data cannot be used" in notes and "64" in notes
    assert "static INT8 needs calibration data" in notes


def test_empty_calibration_set_skips_only_static_int8(sqlite_registry, mlp, tmp_path):
    (tmp_path / "calib.csv").write_text(",".join(f"f{i}" for i in range(64)) + "\n")
    result = _optimize(sqlite_registry, mlp, optimizations=["quantization"],
                       calibration_dataset={"source": "file", "path": str(tmp_path / "calib.csv")})
    assert {c.artifact.passes[-1]["config"]["method"] for c in result.candidates} == {"dynamic"}
    assert any("calibration data" in n and "no rows" in n for n in result.notes)


def test_missing_openvino_costs_only_its_candidates(sqlite_registry, mlp, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an absent package looks like
    result = _optimize(sqlite_registry, mlp, optimizations=["quantization", "openvino"],
                       quantization_config={"method": "dynamic"})
    assert all(c.runtime == "onnxruntime" for c in result.candidates)
    assert any("openvino skipped" in n and "pip install" in n for n in result.notes)


def test_a_gpu_pass_on_this_cpu_is_skipped_with_the_reason(sqlite_registry, mlp):
    result = _optimize(sqlite_registry, mlp, optimizations=["quantization", "tensorrt"],
                       quantization_config={"method": "dynamic"})
    assert result.status == "completed"
    skips = [n for n in result.notes if n.startswith("tensorrt skipped")]
    assert len(skips) == 1 and "GPU" in skips[0]  # once, not once per candidate


def test_training_data_without_rows_skips_qat_only(sqlite_registry, mlp, tmp_path):
    (tmp_path / "train.csv").write_text(",".join(f"f{i}" for i in range(64)) + "\n")
    result = _optimize(sqlite_registry, mlp, optimizations=["quantization"],
                       quantization_config={"method": "dynamic"},
                       training_dataset={"source": "file", "path": str(tmp_path / "train.csv")})
    assert result.status == "completed"
    assert any("training data" in n and "no rows" in n for n in result.notes)


def test_preflight_warns_before_int8_on_a_cpu_without_vnni(sqlite_registry, mlp):
    """The same run as on this machine, on the hardware facts of an AVX2-only x86 CPU."""
    from optiserve.api import parse_request
    from optiserve.core.hardware import Hardware
    from optiserve.optimizer.pipeline import Optimizer

    class OldCPU(Optimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.hardware = Hardware(arch="x86_64", cpu="an AVX2 CPU", cores=2, flags=("avx2",))

    request = parse_request({"model_id": "mlp", "optimizations": ["quantization"],
                             "quantization_config": {"method": "static", "per_channel": True},
                             "validation_dataset": mlp, "accuracy_threshold": 0.9,
                             "iterations": 3, "warmup": 0})
    result = OldCPU(sqlite_registry, request).run()
    assert result.notes[0].startswith("preflight: this CPU has no VNNI")
    cand = result.candidates[0]
    assert "reduce_range on" in " ".join(cand.artifact.notes)  # 7-bit weights picked for it
    assert "U8S8" in " ".join(cand.artifact.notes)
