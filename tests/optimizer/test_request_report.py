"""The request model and the report's formatting helpers."""

from __future__ import annotations

import pytest

from optiserve.api import parse_request

from optiserve.core.errors import ConfigError
from optiserve.optimizer.report import _pct
from optiserve.optimizer.request import OptimizeRequest


def test_seed_defaults():
    req = OptimizeRequest(model_id="m")
    assert req.optimizations == ["onnx_conversion", "quantization"]
    assert req.batch_sizes == [1] and req.accuracy_threshold is None
    assert (req.iterations, req.warmup) == (200, 20)


def test_quantization_config_merges_into_pass_configs():
    req = OptimizeRequest(model_id="m", quantization_config={"method": "dynamic"},
                          pass_configs={"quantization": {"per_channel": True},
                                        "graph_optimization": {"level": "basic"}})
    assert req.configs() == {"quantization": {"per_channel": True, "method": "dynamic"},
                             "graph_optimization": {"level": "basic"}}


def test_threshold_is_checked():
    with pytest.raises(ConfigError, match="accuracy_threshold' is invalid"):
        parse_request({"model_id": "m", "accuracy_threshold": 1.01})
    assert OptimizeRequest(model_id="m", accuracy_threshold=1.0).accuracy_threshold == 1.0


@pytest.mark.parametrize("before, after, text", [
    (100, 49, "51.0%"), (2.0, 2.0, "0.0%"), (1.0, 1.5, "-50.0%"), (0, 1, "n/a"),
])
def test_percent_reduction(before, after, text):
    assert _pct(before, after) == text
