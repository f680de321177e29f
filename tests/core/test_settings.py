"""Settings from the environment: the seed's variable names and defaults, validation, display."""

from __future__ import annotations

from pathlib import Path

import pytest

from optiserve.core.errors import ConfigError, UnknownNameError
from optiserve.core.settings import load_settings


def test_seed_defaults(optiserve_home: Path):
    s = load_settings()
    assert s.optimization_max_time_minutes == 30
    assert s.optimization_accuracy_threshold == 0.99
    assert s.tensorrt_workspace_size_gb == 4
    assert s.onnx_opset_version == 17
    assert s.home == optiserve_home


@pytest.mark.parametrize("var, value, field, expected", [
    ("OPTIMIZATION_MAX_TIME_MINUTES", "5", "optimization_max_time_minutes", 5.0),
    ("OPTIMIZATION_ACCURACY_THRESHOLD", "0.95", "optimization_accuracy_threshold", 0.95),
    ("OPTIMIZATION_ACCURACY_THRESHOLD", "1", "optimization_accuracy_threshold", 1.0),
    ("TENSORRT_WORKSPACE_SIZE_GB", "8", "tensorrt_workspace_size_gb", 8.0),
    ("ONNX_OPSET_VERSION", "13", "onnx_opset_version", 13),
    ("OPTISERVE_SQL_MAX_ROWS", "10", "sql_max_rows", 10),
    ("OPTISERVE_THREADS", "3", "threads", 3),
])
def test_seed_variable_names_are_read(monkeypatch, var, value, field, expected):
    monkeypatch.setenv(var, value)
    assert getattr(load_settings(), field) == expected


def test_home_database_and_artifact_urls(monkeypatch, tmp_path):
    home = tmp_path / "elsewhere"
    monkeypatch.setenv("OPTISERVE_HOME", str(home))
    s = load_settings()
    assert s.registry_url == f"sqlite:///{(home / 'registry.db').resolve()}"
    assert s.artifacts_location == str((home / "artifacts").resolve())

    monkeypatch.setenv("OPTISERVE_DATABASE_URL", "postgresql+psycopg://u@db:5432/reg")
    monkeypatch.setenv("OPTISERVE_ARTIFACT_URL", "s3://bucket/artifacts")
    s = load_settings()
    assert s.registry_url == "postgresql+psycopg://u@db:5432/reg"
    assert s.artifacts_location == "s3://bucket/artifacts"


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "1.0001"])
def test_threshold_outside_zero_one_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("OPTIMIZATION_ACCURACY_THRESHOLD", value)
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        load_settings()


@pytest.mark.parametrize("var, value", [
    ("OPTIMIZATION_ACCURACY_THRESHOLD", "most"),
    ("ONNX_OPSET_VERSION", "5"),
    ("OPTIMIZATION_MAX_TIME_MINUTES", "-1"),
    ("TENSORRT_WORKSPACE_SIZE_GB", "0"),
])
def test_invalid_values_name_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert var in str(info.value) and repr(value) in str(info.value)


def test_data_sources_from_environment(monkeypatch, optiserve_home):
    monkeypatch.setenv("OPTISERVE_DATA_SOURCE_WAREHOUSE", "postgresql://ro@wh/db")
    s = load_settings()
    sources = s.data_sources()
    assert sources["warehouse"] == "postgresql://ro@wh/db"
    assert sources["demo"] == f"sqlite:///{(optiserve_home / 'demo' / 'demo.db').resolve()}"
    assert s.data_source_url("WAREHOUSE") == ("warehouse", "postgresql://ro@wh/db")
    assert s.data_source_url(None)[0] == "demo"  # the default data source


def test_unknown_data_source_lists_known_ones():
    with pytest.raises(UnknownNameError) as info:
        load_settings().data_source_url("nope")
    assert "nope" in str(info.value) and "demo" in str(info.value)


def test_redacted_hides_passwords(monkeypatch):
    monkeypatch.setenv("OPTISERVE_DATABASE_URL", "postgresql+psycopg://reg:s3cret@db:5432/reg")
    monkeypatch.setenv("OPTISERVE_DATA_SOURCE_WH", "postgresql://ro:hunter2@wh/db")
    monkeypatch.setenv("OPTISERVE_DATA_SOURCE_NOPW", "postgresql://ro@wh/db")
    shown = load_settings().redacted()
    assert shown["OPTISERVE_DATABASE_URL"] == "postgresql+psycopg://reg:***@db:5432/reg"
    assert shown["OPTISERVE_DATA_SOURCE_WH"] == "postgresql://ro:***@wh/db"
    assert shown["OPTISERVE_DATA_SOURCE_NOPW"] == "postgresql://ro@wh/db"
    assert "s3cret" not in repr(shown) and "hunter2" not in repr(shown)
    # The seed's four variables are shown under their own names.
    assert shown["OPTIMIZATION_ACCURACY_THRESHOLD"] == 0.99
    assert shown["ONNX_OPSET_VERSION"] == 17


def test_redacted_hides_password_in_artifact_url(monkeypatch):
    monkeypatch.setenv("OPTISERVE_ARTIFACT_URL", "sftp://deploy:t0ps3cret@files/artifacts")
    shown = load_settings().redacted()
    assert "t0ps3cret" not in repr(shown)
    assert shown["OPTISERVE_ARTIFACT_URL"] == "sftp://deploy:***@files/artifacts"


def test_settings_are_frozen():
    from pydantic import ValidationError

    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.onnx_opset_version = 18
    assert s.onnx_opset_version == 17


def test_only_documented_variables_are_read(monkeypatch):
    """A field's own name is not a variable: $HOME, $DATABASE_URL, $THREADS must not leak in."""
    from optiserve.core.settings import load_settings

    monkeypatch.delenv("OPTISERVE_HOME")
    monkeypatch.setenv("HOME", "/somewhere/else")
    monkeypatch.setenv("DATABASE_URL", "postgresql://leak@host/db")
    monkeypatch.setenv("THREADS", "77")
    s = load_settings()
    assert str(s.home) == ".optiserve"
    assert s.database_url is None and s.threads != 77
    assert load_settings(threads=3).threads == 3  # overrides by field name still work
