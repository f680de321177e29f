"""End to end on a small torch MLP (digits) with NPZ validation data: every candidate gated,
the fastest passing one chosen."""

from __future__ import annotations

import numpy as np
import pytest

import optiserve

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_digits_mlp_onnx_and_quantization(sqlite_registry, digits_net, digits, tmp_path):
    optiserve.register("digits", digits_net, registry=sqlite_registry,
                       example_inputs=(torch.from_numpy(digits.X_val[:4]),))
    npz = tmp_path / "val.npz"
    np.savez(npz, pixels=digits.X_val, y=digits.y_val)
    result = optiserve.optimize(
        "digits", registry=sqlite_registry, optimizations=["onnx_conversion", "quantization"],
        validation_dataset={"source": "file", "path": str(npz), "label_column": "y"},
        iterations=20, warmup=2)
    details = result.details()["details"]
    cands = details["candidates"]

    assert result.status == "completed"
    assert [c["label"] for c in cands] == [
        "onnx_conversion",
        "onnx_conversion > quantization(method=dynamic, per_channel=False)",
        "onnx_conversion > quantization(method=dynamic, per_channel=True)",
        "onnx_conversion > quantization(method=static, per_channel=False, "
        "calibrate_method=minmax)",
        "onnx_conversion > quantization(method=static, per_channel=True, "
        "calibrate_method=minmax)",
    ]  # static INT8 calibrated on the validation rows, and MinMax was enough: no retry
    assert all(c["gate"] is not None and c["metric"] == "accuracy" for c in cands)
    assert all(c["n"] == len(digits.y_val) for c in cands)

    # The original is measured by torch itself: its accuracy is the module's.
    with torch.no_grad():
        ref = digits_net(torch.from_numpy(digits.X_val)).argmax(1).numpy()
    assert details["original"]["value"] == pytest.approx((ref == digits.y_val).mean())
    assert details["original"]["value"] > 0.85
    assert cands[0]["parity"]["label_agreement"] == 1.0  # FP32 ONNX: same predictions

    passing = [i for i, c in enumerate(cands) if c["gate"]["passed"]]
    assert 0 in passing
    chosen = details["chosen"]
    assert chosen in passing
    p50 = {i: cands[i]["latency"]["batch_1"]["p50_ms"] for i in passing}
    assert p50[chosen] == min(p50.values())
    assert result.response["optimized"]["latency_ms"] == pytest.approx(p50[chosen], abs=1e-4)

    latest = sqlite_registry.get("digits")
    assert latest.version == 2 and latest.parent == 1 and latest.format == "onnx"
    assert latest.passes == cands[chosen]["passes"]
    assert result.response["original"]["format"] == "torchscript"
