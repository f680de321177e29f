"""The optimize request: the seed's body (`POST /api/v1/inference/optimize`), plus options."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from optiserve.data.sources import DatasetSpec


class OptimizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(description="Registered model name (MODEL or MODEL:VERSION).")
    optimizations: list[str] = Field(
        default_factory=lambda: ["onnx_conversion", "quantization"],
        description="Passes to apply, in order.")
    quantization_config: dict[str, Any] | None = Field(
        None, description="Options of the quantization pass, e.g. {method, precision}.")
    pass_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options of any pass, by pass name.")
    validation_dataset: DatasetSpec | None = Field(
        None, description="Validation data; none = compare outputs on synthetic inputs.")
    calibration_dataset: DatasetSpec | None = Field(
        None, description="Rows for passes that calibrate (OpenVINO INT8); default: the "
        "validation rows.")
    accuracy_threshold: float | None = Field(
        None, gt=0, le=1, description="Keep >= this fraction of the original metric; default "
        "OPTIMIZATION_ACCURACY_THRESHOLD.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=16, description="Batch sizes to benchmark. The fastest "
        "passing candidate has the best geometric mean over these sizes of p50 / the best p50 "
        "at that size; the report's latency_ms is p50 at the first size.")
    iterations: int = Field(200, ge=1, le=100_000, description="Timed calls per candidate and batch size.")
    warmup: int = Field(20, ge=0, le=10_000, description="Untimed calls first.")

    def configs(self) -> dict[str, dict[str, Any]]:
        merged = dict(self.pass_configs)
        if self.quantization_config:
            merged["quantization"] = {**merged.get("quantization", {}),
                                      **self.quantization_config}
        return merged
