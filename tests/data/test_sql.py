"""SQL validation data: one read-only SELECT on a named data source, bounded in rows."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from sqlalchemy import create_engine, event, text

from optiserve.core.errors import DatasetError, SQLRefusedError, UnknownNameError
from optiserve.core.settings import load_settings
from optiserve.data.sources import DatasetSpec, read
from optiserve.data.sql import _sqlite_readonly, check_select
from optiserve.data.demo_source import FEATURES, LABEL

DEMO_QUERY = "SELECT * FROM ml_features.customer_churn LIMIT 100"


def _sql(query: str, source: str | None = None, label: str | None = None) -> DatasetSpec:
    return DatasetSpec(source="sql", query=query, data_source=source, label_column=label)


def _demo_count(settings) -> int:
    read(_sql("SELECT 1 AS one"), settings)  # make sure the demo database exists
    db = settings.home / "demo" / "ml_features.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM customer_churn").fetchone()[0]


@pytest.fixture
def mydb(tmp_path, monkeypatch):
    """A sqlite file configured as data source 'mydb'."""
    folder = tmp_path / "mydb"
    folder.mkdir()
    path = folder / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (amount REAL, items INTEGER, note TEXT, returned INT)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                         [(10.5, 1, "ok", 0), (99.0, 3, "please delete me", 1), (5.25, 2, "", 0)])
    monkeypatch.setenv("OPTISERVE_DATA_SOURCE_MYDB", f"sqlite:///{path}")
    return path


def test_demo_source(settings):
    cols = read(_sql(DEMO_QUERY), settings)
    assert list(cols) == [*FEATURES, LABEL]
    assert all(len(v) == 100 for v in cols.values())
    assert set(np.unique(cols[LABEL])) <= {0, 1}
    assert cols["monthly_charges"].dtype == np.float64 and cols["age"].dtype.kind == "i"


def test_demo_source_is_seeded(settings, tmp_path, monkeypatch):
    first = read(_sql(DEMO_QUERY), settings)
    monkeypatch.setenv("OPTISERVE_HOME", str(tmp_path / "other-home"))
    second = read(_sql(DEMO_QUERY), load_settings())
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_named_sqlite_source(settings, mydb):
    cols = read(_sql("SELECT amount, items FROM orders ORDER BY amount", "MYDB"), settings)
    np.testing.assert_array_equal(cols["amount"], [5.25, 10.5, 99.0])
    assert cols["items"].tolist() == [2, 1, 3]


def test_delete_inside_a_string_literal_is_allowed(settings, mydb):
    cols = read(_sql("SELECT amount FROM orders WHERE note = 'please delete me'", "mydb"),
                settings)
    assert cols["amount"].tolist() == [99.0]
    assert check_select("SELECT 'drop table' AS x -- update\n FROM t") \
        == "SELECT 'drop table' AS x -- update\n FROM t"


@pytest.mark.parametrize("query, reason", [
    ("DELETE FROM orders", "DELETE statement"),
    ("delete from orders where 1=1;", "DELETE statement"),
    ("DROP TABLE orders", "DROP statement"),
    ("SELECT 1; DELETE FROM orders", "more than one statement"),
    ("WITH x AS (DELETE FROM orders RETURNING *) SELECT * FROM x", "contains DELETE"),
    ("PRAGMA writable_schema = ON", "PRAGMA statement"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH statement"),
    ("SELECT * INTO backup FROM orders", "contains INTO"),
    ("SELECT amount FROM orders FOR UPDATE", "contains UPDATE"),
    ("INSERT INTO orders VALUES (1, 1, '', 0)", "INSERT statement"),
    ("   ", "empty"),
    ("-- only a comment", "empty"),
])
def test_refused_statements(settings, mydb, query, reason):
    with pytest.raises(SQLRefusedError, match=reason):
        check_select(query)
    with pytest.raises(SQLRefusedError):
        read(_sql(query, "mydb"), settings)
    with sqlite3.connect(mydb) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 3


def test_refused_delete_leaves_the_demo_table_unchanged(settings):
    before = _demo_count(settings)
    with pytest.raises(SQLRefusedError):
        read(_sql("DELETE FROM ml_features.customer_churn"), settings)
    assert _demo_count(settings) == before == 5000


@pytest.mark.parametrize("query", [
    "SELECT '--' AS a; DELETE FROM orders",
    "SELECT '/*' AS a; DELETE FROM orders; SELECT '*/' AS b",
])
def test_comment_marker_inside_a_literal_does_not_hide_a_statement(query):
    with pytest.raises(SQLRefusedError):
        check_select(query)


def test_sqlite_connection_itself_is_read_only(settings, mydb):
    """Defence in depth: even a write that got past the checker fails on the connection."""
    engine = create_engine(f"sqlite:///{mydb}", connect_args={"uri": True})
    event.listen(engine, "connect", _sqlite_readonly(f"sqlite:///{mydb}", 5))
    try:
        with engine.connect() as conn:
            with pytest.raises(Exception, match="readonly|read-only|query_only"):
                conn.execute(text("DELETE FROM orders"))
    finally:
        engine.dispose()
    # And through read(): the second statement never runs.
    with pytest.raises(DatasetError):
        read(_sql("SELECT '--' AS a; DELETE FROM orders", "mydb"), settings)
    with sqlite3.connect(mydb) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 3


def test_sql_error_names_the_source(settings, mydb):
    with pytest.raises(DatasetError) as info:
        read(_sql("SELECT * FROM no_such_table", "mydb"), settings)
    assert "data source 'mydb'" in str(info.value) and "no_such_table" in str(info.value)


def test_empty_result_is_a_dataset_error(settings, mydb):
    with pytest.raises(DatasetError, match="returned no rows"):
        read(_sql("SELECT * FROM orders WHERE amount < 0", "mydb"), settings)


def test_more_rows_than_the_limit(monkeypatch, settings):
    monkeypatch.setenv("OPTISERVE_SQL_MAX_ROWS", "50")
    limited = load_settings()
    with pytest.raises(DatasetError, match="more than 50 rows") as info:
        read(_sql(DEMO_QUERY), limited)
    assert "OPTISERVE_SQL_MAX_ROWS" in str(info.value)
    assert len(read(_sql("SELECT * FROM ml_features.customer_churn LIMIT 50"), limited)["age"]) \
        == 50


def test_unknown_data_source(settings):
    with pytest.raises(UnknownNameError) as info:
        read(_sql("SELECT 1", "warehouse"), settings)
    assert "warehouse" in str(info.value) and "demo" in str(info.value)


def test_missing_sqlite_file_is_not_created(tmp_path, monkeypatch, settings):
    missing = tmp_path / "typo" / "warehouse.db"
    missing.parent.mkdir()
    monkeypatch.setenv("OPTISERVE_DATA_SOURCE_WH", f"sqlite:///{missing}")
    with pytest.raises(DatasetError) as info:
        read(_sql("SELECT * FROM t", "wh"), settings)
    assert not missing.exists()
    assert "warehouse.db" in str(info.value)


@pytest.mark.postgres
def test_postgres_source_is_read_only(pg_url, monkeypatch, settings):
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS readings"))
            conn.execute(text("CREATE TABLE readings (value double precision, ok integer)"))
            conn.execute(text("INSERT INTO readings VALUES (1.5, 1), (2.5, 0)"))
        monkeypatch.setenv("OPTISERVE_DATA_SOURCE_PG", pg_url)
        cols = read(_sql("SELECT value, ok FROM readings ORDER BY value", "pg"), settings)
        np.testing.assert_array_equal(cols["value"], [1.5, 2.5])
        # one statement only (a prepared statement), whatever the text hides from the checker:
        # a dollar quote hides "; COMMIT; DROP" from it, the server still refuses
        for query in ("SELECT '--' AS a; DELETE FROM readings",
                      "SELECT $$'$$ AS a; COMMIT; DROP TABLE readings; SELECT 1 AS x --'"):
            with pytest.raises(DatasetError, match="multiple commands|read-only|Refused"):
                read(_sql(query, "pg"), settings)
        with pytest.raises(DatasetError, match="data source 'pg'"):
            read(_sql("SELECT * FROM nope", "pg"), settings)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM readings")).scalar() == 2
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS readings"))
        engine.dispose()


def test_a_user_database_named_demo_is_never_written(settings, mydb, monkeypatch):
    """Only the built-in demo database is created on first use; a user's URL is read-only."""
    from sqlalchemy import create_engine, inspect

    from optiserve.core.errors import DatasetError
    from optiserve.core.settings import load_settings
    from optiserve.data.sources import DatasetSpec, read

    url = str(mydb) if str(mydb).startswith("sqlite") else f"sqlite:///{mydb}"
    monkeypatch.setenv("OPTISERVE_DATA_SOURCE_DEMO", url)
    spec = DatasetSpec(source="sql", query="SELECT * FROM ml_features.customer_churn")
    with pytest.raises(DatasetError):
        read(spec, load_settings())
    assert "ml_features" not in inspect(create_engine(url)).get_schema_names()
