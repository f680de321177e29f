"""The optimize request: the seed's body (`POST /api/v1/inference/optimize`), plus options."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from optiserve.data.sources import DatasetSpec


# Bounds of the timing options, shared by every request that times (optimize, benchmark).
BatchSize = Annotated[int, Field(ge=1, le=4096)]
MAX_BATCH_SIZES, MAX_ITERATIONS, MAX_WARMUP = 16, 100_000, 10_000

# The seed document's request body, verbatim: the OpenAPI example, the demo's request (with its
# own model name) and the server tests' proof that the contract holds.
SEED_REQUEST: dict[str, Any] = {
    "model_id": "model-xyz789",
    "optimizations": ["onnx_conversion", "quantization"],
    "quantization_config": {"method": "dynamic", "precision": "int8"},
    "validation_dataset": {"source": "sql",
                           "query": "SELECT * FROM ml_features.customer_churn LIMIT 1000"},
    "accuracy_threshold": 0.99,
}


class OptimizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [SEED_REQUEST]})

    model_id: str = Field(description="Registered model name (MODEL or MODEL:VERSION).")
    optimizations: list[str] = Field(
        default_factory=lambda: ["onnx_conversion", "quantization"],
        description="Passes to apply, in order. \"auto\" stands for every pass that can pay "
        "off on this machine: the search measures them and keeps the fastest that passes.")
    quantization_config: dict[str, Any] | None = Field(
        None, description="Options of the quantization pass, e.g. {method, precision}.")
    pass_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options of any pass, by pass name.")
    validation_dataset: DatasetSpec | None = Field(
        None, description="Validation data; none = compare outputs on synthetic inputs.")
    calibration_dataset: DatasetSpec | None = Field(
        None, description="Rows for passes that calibrate (static INT8, OpenVINO INT8); "
        "default: the validation rows.")
    training_dataset: DatasetSpec | None = Field(
        None, description="Labelled rows for passes that train (quantization-aware "
        "training); without labels they learn to match the original model's outputs.")
    accuracy_threshold: float | None = Field(
        None, gt=0, le=1, description="Keep >= this fraction of the original metric; default "
        "OPTIMIZATION_ACCURACY_THRESHOLD.")
    batch_sizes: list[BatchSize] = Field(
        default_factory=lambda: [1], min_length=1, max_length=MAX_BATCH_SIZES,
        description="Batch sizes to benchmark. The fastest passing candidate has the best "
        "geometric mean over these sizes of p50 / the best p50 "
        "at that size; the report's latency_ms is p50 at the first size.")
    iterations: int = Field(200, ge=1, le=MAX_ITERATIONS,
                            description="Timed calls per candidate and batch size.")
    warmup: int = Field(20, ge=0, le=MAX_WARMUP, description="Untimed calls first.")

    def configs(self) -> dict[str, dict[str, Any]]:
        merged = dict(self.pass_configs)
        if self.quantization_config:
            merged["quantization"] = {**merged.get("quantization", {}),
                                      **self.quantization_config}
        return merged
