"""The search layer reads pass configs: searched fields multiply, `when` narrows, `retry` waits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optiserve.optimizer.search import AUTO, chain, expand, fallbacks, searched_fields
from optiserve.passes.base import Pass


class Knobs(Pass):
    name = "knobs"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        method: Literal["fast", "careful"] | None = Field(
            None, description="m", json_schema_extra={"search": ["fast", "careful"]})
        per_channel: bool | None = Field(None, description="p",
                                         json_schema_extra={"search": [False, True]})
        calibration: Literal["a", "b", "c"] | None = Field(
            None, description="c", json_schema_extra={
                "search": ["a", "b", "c"], "when": {"method": "careful"}, "retry": True})
        other: int = Field(0, description="o")


def test_unset_fields_multiply_and_set_ones_do_not():
    assert set(searched_fields(Knobs)) == {"method", "per_channel", "calibration"}
    got = [(c.method, c.per_channel, c.calibration) for c in expand(Knobs, None)]
    # calibration only where method=careful, and only its first value up front
    assert got == [("fast", False, None), ("fast", True, None),
                   ("careful", False, "a"), ("careful", True, "a")]
    assert [(c.method, c.per_channel) for c in expand(Knobs, {"method": "fast",
                                                             "per_channel": True})] \
        == [("fast", True)]
    assert [c.other for c in expand(Knobs, {"other": 3})] == [3, 3, 3, 3]


def test_retry_fields_step_through_their_values_only_after_a_failure():
    first = expand(Knobs, {"method": "careful", "per_channel": True})
    assert [c.calibration for c in first] == ["a"]
    second = fallbacks(Knobs, {"method": "careful", "per_channel": True}, first[0])
    assert [c.calibration for c in second] == ["b"]
    third = fallbacks(Knobs, None, second[0])
    assert [c.calibration for c in third] == ["c"]
    assert fallbacks(Knobs, None, third[0]) == []  # nothing left to try
    # a value the user fixed is never changed, nor a field that does not apply
    assert fallbacks(Knobs, {"calibration": "a"}, first[0]) == []
    assert fallbacks(Knobs, None, Knobs.Config(method="fast", per_channel=True)) == []


def test_auto_spells_out_the_pass_list_once():
    assert chain(["auto"]) == list(AUTO)
    assert chain(["onnx_conversion", "auto"]) == list(AUTO)
    assert chain(["quantization"]) == ["quantization"]
