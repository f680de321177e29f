"""Validation data files: CSV, Parquet and NPZ readers."""

from __future__ import annotations

import numpy as np
import pytest

from optiserve.core.errors import ConfigError, DatasetError
from optiserve.data.sources import DatasetSpec, parse_spec, read
from tests.builders import write_csv


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return rng.standard_normal((20, 3)), rng.integers(0, 2, 20)


def test_csv(tmp_path, settings, table):
    X, y = table
    path = write_csv(tmp_path / "v.csv", X, y, label="churned")
    cols = read(DatasetSpec(source="file", path=str(path)), settings)
    assert list(cols) == ["f0", "f1", "f2", "churned"]
    np.testing.assert_array_equal(cols["f1"], X[:, 1])  # repr() round-trips float64 exactly
    assert cols["churned"].dtype == np.float64 and (cols["churned"] == y).all()


def test_csv_text_column_stays_text(tmp_path, settings):
    path = tmp_path / "t.csv"
    path.write_text("city,x\nParis,1\nOslo,2\n")
    cols = read(DatasetSpec(source="file", path=str(path)), settings)
    assert cols["city"].tolist() == ["Paris", "Oslo"] and cols["x"].tolist() == [1.0, 2.0]


def test_csv_without_rows(tmp_path, settings):
    path = tmp_path / "empty.csv"
    path.write_text("a,b\n")
    with pytest.raises(DatasetError, match="no header or no rows"):
        read(DatasetSpec(source="file", path=str(path)), settings)


def test_parquet(tmp_path, settings, table):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    X, y = table
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1].astype(np.float32), "label": y}), path)
    cols = read(DatasetSpec(source="file", path=str(path)), settings)
    assert list(cols) == ["a", "b", "label"]
    np.testing.assert_array_equal(cols["a"], X[:, 0])
    assert cols["b"].dtype == np.float32 and cols["label"].dtype == np.int64


def test_corrupt_parquet_is_a_dataset_error(tmp_path, settings):
    pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="Cannot read") as info:
        read(DatasetSpec(source="file", path=str(path)), settings)
    assert "parquet" in str(info.value)


def test_npz(tmp_path, settings, table):
    X, y = table
    path = tmp_path / "v.npz"
    np.savez(path, pixels=X.astype(np.float32), y=y)
    cols = read(DatasetSpec(source="file", path=str(path)), settings)
    assert set(cols) == {"pixels", "y"} and cols["pixels"].shape == (20, 3)
    np.testing.assert_array_equal(cols["y"], y)


def test_relative_path_uses_base_dir(tmp_path, settings, table):
    write_csv(tmp_path / "v.csv", *table)
    cols = read(DatasetSpec(source="file", path="v.csv"), settings, base_dir=tmp_path)
    assert len(cols["f0"]) == 20


def test_missing_and_unknown_files(tmp_path, settings):
    with pytest.raises(DatasetError, match="does not exist"):
        read(DatasetSpec(source="file", path=str(tmp_path / "nope.csv")), settings)
    (tmp_path / "v.xlsx").write_bytes(b"x")
    with pytest.raises(DatasetError, match="unknown type '.xlsx'"):
        read(DatasetSpec(source="file", path=str(tmp_path / "v.xlsx")), settings)


def test_spec_needs_its_location():
    with pytest.raises(ValueError, match="needs a query"):
        DatasetSpec(source="sql")
    with pytest.raises(ValueError, match="needs a path"):
        DatasetSpec(source="file")
    with pytest.raises(ValueError):
        DatasetSpec(source="file", path="x.csv", sheet="1")  # extra fields are refused


def test_parse_spec_from_cli_options():
    assert parse_spec(sql=None, path=None, label=None, data_source=None) is None
    spec = parse_spec(sql="SELECT 1", path=None, label="y", data_source="wh")
    assert (spec.source, spec.query, spec.label_column, spec.data_source) == \
        ("sql", "SELECT 1", "y", "wh")
    with pytest.raises(ConfigError, match="not both"):
        parse_spec(sql="SELECT 1", path="x.csv", label=None, data_source=None)
