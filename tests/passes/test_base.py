"""The pass registry and typed configs."""

from __future__ import annotations

import pytest

from optiserve.core.errors import ConfigError, UnknownNameError
from optiserve.passes import PASSES, get_pass


def test_every_registered_pass_loads_with_a_documented_config():
    for name in PASSES:
        cls = get_pass(name)
        assert cls.name == name
        for field, info in cls.Config.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
        assert cls.Config.model_config.get("extra") == "forbid"


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as info:
        get_pass("nope")
    msg = str(info.value)
    assert "Unknown optimization 'nope'" in msg
    for name in PASSES:
        assert name in msg


def test_unknown_option_names_the_pass_options():
    cls = get_pass("quantization")
    with pytest.raises(ConfigError) as info:
        cls.parse_config({"bits": 4})
    msg = str(info.value)
    assert "Option 'bits' of pass 'quantization'" in msg
    assert "per_channel" in msg and "weight_type" in msg and "nodes_to_exclude" in msg


def test_bad_option_value_is_a_config_error():
    with pytest.raises(ConfigError, match="Option 'method' of pass 'quantization'"):
        get_pass("quantization").parse_config({"method": "fp4"})
    with pytest.raises(ConfigError, match="Option 'opset'"):
        get_pass("onnx_conversion").parse_config({"opset": 3})


