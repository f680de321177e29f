"""A synthetic, seeded customer-churn table for the built-in `demo` data source (created by
optiserve under OPTISERVE_HOME on first use; a user's own database is never written to).

The data is made up (documented generator, fixed seed): churn rises with short tenure, high
monthly charges, month-to-month contracts, support calls and late payments. It exists so the
seed's request (`SELECT * FROM ml_features.customer_churn LIMIT 1000`) runs anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text

FEATURES = ["tenure_months", "monthly_charges", "total_charges", "contract_months",
            "support_calls", "num_products", "late_payments", "has_fiber", "age"]
LABEL = "churned"
ROWS = 5000


def generate(rows: int = ROWS, seed: int = 42) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tenure = rng.integers(0, 73, rows)
    monthly = np.round(rng.uniform(18, 120, rows), 2)
    contract = rng.choice([1, 12, 24], rows, p=[0.5, 0.3, 0.2])
    calls = rng.poisson(1.5, rows)
    products = rng.integers(1, 6, rows)
    late = rng.poisson(0.7, rows)
    fiber = rng.integers(0, 2, rows)
    age = rng.integers(18, 81, rows)
    total = np.round(tenure * monthly * rng.uniform(0.9, 1.1, rows), 2)
    logit = (1.2 - 0.05 * tenure + 0.02 * (monthly - 60) - 0.06 * contract + 0.35 * calls
             - 0.2 * products + 0.5 * late + 0.4 * fiber - 0.01 * (age - 45))
    churned = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    cols = dict(zip(FEATURES, [tenure, monthly, total, contract, calls, products, late, fiber,
                               age]))
    return {**cols, LABEL: churned}


def ensure_demo_source(url: str) -> None:
    """Create the demo database (and its ml_features schema) if it is not there yet."""
    if url.startswith("sqlite:///"):
        main = Path(url.removeprefix("sqlite:///"))
        main.parent.mkdir(parents=True, exist_ok=True)
        target = main.parent / "ml_features.db"
        if target.exists() and main.exists():
            return
        _write(f"sqlite:///{target}", table="customer_churn")
        create_engine(url).connect().close()  # the main file the data source opens
    else:
        _write(url, table="ml_features.customer_churn", schema="ml_features")


def _write(url: str, *, table: str, schema: str | None = None) -> None:
    data = generate()
    engine = create_engine(url, future=True)
    cols = ", ".join(f"{c} {'DOUBLE PRECISION' if data[c].dtype.kind == 'f' else 'INTEGER'}"
                     for c in data)
    try:
        with engine.begin() as conn:
            if schema:
                conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
            exists = conn.execute(text(f"SELECT 1 FROM {table} LIMIT 1")).first() is not None \
                if _has_table(conn, table) else False
            if exists:
                return
            conn.execute(text(f"CREATE TABLE IF NOT EXISTS {table} ({cols})"))
            rows = [{c: v.item() for c, v in zip(data, values)} for values in zip(*data.values())]
            names = ", ".join(data)
            params = ", ".join(f":{c}" for c in data)
            conn.execute(text(f"INSERT INTO {table} ({names}) VALUES ({params})"), rows)
    finally:
        engine.dispose()


def _has_table(conn, table: str) -> bool:
    from sqlalchemy import inspect

    schema, _, name = table.rpartition(".")
    return inspect(conn).has_table(name, schema=schema or None)
