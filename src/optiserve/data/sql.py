"""SQL validation data: a single read-only SELECT on a named data source, row and time bounded.

Defence in depth: the statement is checked (one statement, SELECT/WITH, no writing keywords
outside string literals), and the connection itself is made read-only (SQLite query_only,
PostgreSQL read-only transaction with a statement timeout).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from optiserve.core.errors import DatasetError, SQLRefusedError, first_line

_WRITES = re.compile(
    r"\b(insert|update|delete|merge|drop|alter|create|truncate|grant|revoke|attach|detach|"
    r"pragma|copy|vacuum|reindex|call|exec|execute|do|lock|set|into)\b", re.I)


_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)


def _strip(query: str) -> str:
    """Drop comments and the contents of string literals/quoted identifiers, in one
    left-to-right pass (so '--' inside a literal is not taken for a comment, and back)."""
    def repl(m: re.Match) -> str:
        text = m.group(0)
        return "''" if text[0] == "'" else '""' if text[0] == '"' else " "
    return _TOKENS.sub(repl, query)


def check_select(query: str) -> str:
    """Return the query if it is one read-only SELECT; raise SQLRefusedError otherwise."""
    bare = _strip(query).strip().rstrip(";").strip()
    if not bare:
        raise SQLRefusedError(query, "it is empty")
    if ";" in bare:
        raise SQLRefusedError(query, "it holds more than one statement")
    first = bare.split(None, 1)[0].lower()
    if first not in ("select", "with"):
        raise SQLRefusedError(query, f"it is a {first.upper()} statement, not a SELECT")
    bad = _WRITES.search(bare)
    if bad:
        raise SQLRefusedError(query, f"it contains {bad.group(1).upper()}")
    return query.strip().rstrip(";")


def read_sql(url: str, query: str, *, max_rows: int, timeout_s: float,
             source: str) -> dict[str, np.ndarray]:
    """Run the SELECT and return its columns as numpy arrays."""
    query = check_select(query)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise DatasetError(f"Data source '{source}' points at a SQLite file that does not exist "
                           f"({url.removeprefix('sqlite:///')}).",
                           hint=f"Fix OPTISERVE_DATA_SOURCE_{source.upper()}.")
    engine = create_engine(url, future=True, connect_args=_connect_args(url))
    dialect = engine.dialect.name
    if dialect == "sqlite":
        event.listen(engine, "connect", _sqlite_readonly(url, timeout_s))
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                conn.execute(text("SET TRANSACTION READ ONLY"))
                conn.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))
            if engine.dialect.driver == "psycopg":
                # a server-side prepared statement holds exactly one statement, whatever the
                # text hides from check_select (dollar quotes, E'' strings): no "; COMMIT; ..."
                cur = conn.connection.driver_connection.cursor()
                cur.execute(query, prepare=True)
                columns = [d.name for d in cur.description or ()]
                rows = cur.fetchmany(max_rows + 1)
            else:
                result = conn.execute(text(query))
                columns = list(result.keys())
                rows = result.fetchmany(max_rows + 1)
            conn.rollback()
    except (SQLAlchemyError, *_driver_errors(engine)) as exc:
        msg = first_line(getattr(exc, "orig", exc))
        raise DatasetError(f"The query on data source '{source}' failed: {msg}",
                           hint="Check table and column names against the data source.") from None
    finally:
        engine.dispose()
    if len(rows) > max_rows:
        raise DatasetError(f"The query returned more than {max_rows} rows.",
                           hint="Add a LIMIT, or raise OPTISERVE_SQL_MAX_ROWS.")
    if not rows:
        raise DatasetError(f"The query on data source '{source}' returned no rows.",
                           hint="Validation needs at least one row.")
    return {c: _column([r[i] for r in rows]) for i, c in enumerate(columns)}


def _driver_errors(engine) -> tuple[type[Exception], ...]:
    error = getattr(engine.dialect.dbapi, "Error", None)
    return (error,) if isinstance(error, type) else ()


def _connect_args(url: str) -> dict:
    return {"uri": True} if url.startswith("sqlite") else {}


def _column(values: list) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object:
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.asarray([str(v) for v in values])
    return arr


def _sqlite_readonly(url: str, timeout_s: float):
    """SQLite has no schemas: each *.db file beside the main one is attached (read-only) under
    its stem, so `ml_features.customer_churn` reads table customer_churn of ml_features.db."""
    main = Path(url.removeprefix("sqlite:///"))
    siblings = sorted(p for p in main.parent.glob("*.db") if p != main) if main.name else []

    def on_connect(dbapi_conn, _record) -> None:
        for db in siblings:
            dbapi_conn.execute(f"ATTACH DATABASE 'file:{db}?mode=ro' AS \"{db.stem}\"")
        dbapi_conn.execute("PRAGMA query_only = ON")
        deadline = time.monotonic() + timeout_s
        # Abort a query that runs past the limit (checked every 10k VM steps).
        dbapi_conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    return on_connect
