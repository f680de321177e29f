"""Errors build their own messages; require() names the feature and the pip command."""

from __future__ import annotations

import pytest

from optiserve.core.deps import available, require
from optiserve.core.errors import (
    ConfigError, GateFailedError, MissingExtraError, ModelLoadError, ModelNotFound,
    OptiserveError, SQLRefusedError, UnknownNameError,
)
from optiserve.server.errors import http_status


def test_every_error_is_an_optiserve_error():
    for cls in (ConfigError, MissingExtraError, ModelNotFound, ModelLoadError, UnknownNameError,
                SQLRefusedError, GateFailedError):
        assert issubclass(cls, OptiserveError)


def test_model_not_found_lists_known_models_sorted():
    err = ModelNotFound("churn", known=["zeta", "alpha"])
    assert str(err).startswith("No model 'churn' in the registry.")
    assert "Known models: alpha, zeta." in str(err)
    assert http_status(err) == 404
    assert "has no models yet" in str(ModelNotFound("x"))


def test_unknown_name_lists_choices():
    err = UnknownNameError("optimization", "prune", ["quantization", "onnx_conversion"])
    assert str(err) == ("Unknown optimization 'prune'. "
                        "Choose one of: onnx_conversion, quantization.")


def test_sql_refused_shortens_query():
    err = SQLRefusedError("SELECT\n   " + "x, " * 100 + "1", "it is long")
    assert "SELECT x, x," in str(err) and "it is long" in str(err)
    assert len(err.message) < 160


def test_require_missing_module_names_extra_and_feature():
    with pytest.raises(MissingExtraError) as info:
        require("optiserve_no_such_module", extra="torch", feature="Frobnicating")
    msg = str(info.value)
    assert "Frobnicating" in msg and "pip install 'optiserve[torch]'" in msg


def test_require_returns_module_and_available():
    assert require("json", extra="x", feature="y").dumps([1]) == "[1]"
    assert available("json") and not available("optiserve_no_such_module")
