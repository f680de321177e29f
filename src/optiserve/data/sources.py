"""Read validation data from CSV, Parquet or NPZ files, or from SQL on a named data source."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from optiserve.core.deps import require
from optiserve.core.errors import ConfigError, DatasetError, first_line
from optiserve.core.settings import Settings
from optiserve.data.binding import Dataset, bind

Columns = dict[str, np.ndarray]


class DatasetSpec(BaseModel):
    """Where validation (or calibration) data comes from: the seed's `validation_dataset`."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["sql", "file"] = Field(description="'sql' (a query) or 'file' (a path).")
    query: str | None = Field(None, description="A single SELECT, for source 'sql'.")
    path: str | None = Field(None, description="A CSV, Parquet or NPZ file, for source 'file'.")
    label_column: str | None = Field(
        None, description="Column (or NPZ array) holding the labels; none = compare outputs "
        "with the original model's.")
    data_source: str | None = Field(
        None, description="Named SQL data source; default OPTISERVE_DEFAULT_DATA_SOURCE.")

    @model_validator(mode="after")
    def _one_location(self) -> DatasetSpec:
        if self.source == "sql" and not self.query:
            raise ValueError("source 'sql' needs a query")
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs a path")
        return self


def read(spec: DatasetSpec, settings: Settings, *, base_dir: Path | None = None) -> Columns:
    """Columns (or NPZ arrays) by name."""
    if spec.source == "sql":
        from optiserve.data.sql import read_sql

        name, url = settings.data_source_url(spec.data_source)
        if url == settings.builtin_demo_url:  # created on first use; never a user's database
            from optiserve.data.demo_source import ensure_demo_source

            ensure_demo_source(url)
        return read_sql(url, spec.query or "", max_rows=settings.sql_max_rows,
                        timeout_s=settings.sql_timeout_s, source=name)
    path = Path(spec.path or "")
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        exists = path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        exists = False
    if not exists:
        raise DatasetError(f"Validation file '{str(path)[:200]}' does not exist.",
                           hint="Give the path of a .csv, .parquet or .npz file.")
    suffix = path.suffix.lower()
    readers = {".csv": _csv, ".parquet": _parquet, ".npz": _npz}
    if suffix not in readers:
        raise DatasetError(f"Validation file '{path}' has an unknown type '{suffix}'.",
                           hint="Use .csv, .parquet or .npz.")
    try:
        return readers[suffix](path)
    except DatasetError:
        raise
    except Exception as exc:  # parsers raise many types for malformed files
        raise DatasetError(f"Cannot read '{path}': {first_line(exc, 200)}",
                           hint=f"Check that it is a valid {suffix[1:]} file.") from None


def _csv(path: Path) -> Columns:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    if not header or not rows:
        raise DatasetError(f"CSV file '{path}' has no header or no rows.")
    cols = {}
    for i, name in enumerate(header):
        values = [r[i] if i < len(r) else "" for r in rows]
        try:
            cols[name] = np.asarray(values, dtype=np.float64)
        except ValueError:
            cols[name] = np.asarray(values)
    return cols


def _parquet(path: Path) -> Columns:
    pq = require("pyarrow.parquet", extra="parquet", feature="Reading Parquet files")
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names}


def _npz(path: Path) -> Columns:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load(spec: DatasetSpec, signature, settings: Settings, *, feature_names=None,
         role: str = "", default_label: str | None = None) -> Dataset:
    """Read a spec and bind it to a model's signature: the one way data reaches a model.
    `default_label` (the label column recorded with the model) is used when the spec names
    none and the data has that column."""
    where = spec.query if spec.source == "sql" else spec.path
    columns = read(spec, settings)
    label = spec.label_column or (default_label if default_label in columns else None)
    described = f"{role + ' ' if role else ''}{spec.source}: {where}"
    if label and not spec.label_column:
        described += f" (labels: '{label}', recorded with the model)"
    return bind(columns, signature, label_column=label, feature_names=feature_names,
                description=described)


def confine(spec: DatasetSpec | None, root: Path) -> DatasetSpec | None:
    """For requests from the network: a file path must lie inside `root` (relative paths are
    taken from there). Returns the spec with the resolved absolute path."""
    if spec is None or spec.source != "file":
        return spec
    return spec.model_copy(update={"path": confine_path(spec.path or "", root)})


def confine_path(given: str, root: Path, what: str = "Validation file") -> str:
    """`given` resolved inside `root` (relative paths are taken from there), or DatasetError."""
    root = root.resolve()
    try:
        path = (root / given).resolve()
    except (ValueError, OSError) as exc:  # NUL bytes, names too long
        raise DatasetError(f"{what} path {given[:80]!r} is not usable: "
                           f"{first_line(exc, 100)}.",
                           hint="Give a plain path relative to OPTISERVE_DATA_DIR.") from None
    if not path.is_relative_to(root):
        raise DatasetError(f"{what} '{given}' is outside the data folder.",
                           hint=f"Over HTTP, files are read only from {root} "
                           "(OPTISERVE_DATA_DIR); give a path relative to it.")
    return str(path)


def parse_spec(*, sql: str | None, path: str | None, label: str | None,
               data_source: str | None) -> DatasetSpec | None:
    """Build a spec from CLI-style options (exactly one of sql / path)."""
    if sql and path:
        raise ConfigError("Give validation data as SQL or as a file, not both.")
    if not (sql or path):
        return None
    return DatasetSpec(source="sql" if sql else "file", query=sql, path=path,
                       label_column=label, data_source=data_source)
