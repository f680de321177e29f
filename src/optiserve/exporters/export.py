"""Export a registered version to a deployment format: make, verify, time, register.

Every format goes through the same four steps, so none of them can skip one:

1. **make**: the format's exporter (exporters/<format>.py) writes the file from the version, after
   `onnx_conversion` when the exporter reads ONNX and the version is another framework's;
2. **verify**: the file is opened in its own runtime and its outputs on the check rows are
   compared with the source version's, in the source's runtime, against the exporter's stated
   tolerance. Outside it, nothing is stored and the error gives the numbers;
3. **time**: both are timed in fresh processes at the requested batch sizes;
4. **register**: the file becomes the next version of the model, with the source as its parent
   and the chain (conversion + export and their options) as its lineage, and the status
   `exported`: a deployment artifact for another runtime or device, so `MODEL` (the latest ready
   version) and a deployment's "latest N" policy never switch to it unasked; name it
   (`MODEL:N`, a "specific" policy) to optimize, export or serve it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.bench.isolated import benchmark_isolated
from optiserve.bench.latency import Latency
from optiserve.convert.formats import EXTENSIONS
from optiserve.core.errors import ConfigError
from optiserve.data.binding import Dataset
from optiserve.data.metrics import cosine_rows
from optiserve.data.sources import DatasetSpec, load
from optiserve.exporters.base import (EXPORTERS, ExportError, Exported, Exporter, Source, Tolerance,
                                   get_exporter)
from optiserve.registry.registry import Registry, VersionInfo
from optiserve.runtimes.base import load_runtime, runtime_for

#: formats onnx_conversion turns into ONNX
CONVERTIBLE = ("pkl", "skops", "xgboost", "xgboost_ubj", "lightgbm", "torchscript", "pt2",
               "keras", "savedmodel")
#: synthetic check rows when the caller gives no data
SYNTHETIC_ROWS = 32
#: most rows verified (and used to calibrate)
MAX_ROWS = 1000
#: the status of an exported version (see step 4 above)
EXPORTED = "exported"


@dataclass
class ExportResult:
    """The registered export, how close it came to its source, and both latencies."""

    version: VersionInfo
    source: VersionInfo
    verification: dict[str, Any]
    latency: dict[str, dict[int, Latency]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.version.model, "version": self.version.version,
                "artifact_id": self.version.artifact_id, "format": self.version.format,
                "runtime": runtime_for(self.version.format),
                "size_mb": round(self.version.size_mb, 3),
                "source": {"version": self.source.version, "format": self.source.format,
                           "size_mb": round(self.source.size_mb, 3)},
                "verification": self.verification, "notes": self.notes, "files": self.files,
                "latency_ms": {which: {str(bs): lat.as_dict() for bs, lat in by_bs.items()}
                               for which, by_bs in self.latency.items()}}


def reachable(format: str) -> list[str]:
    """The export formats a version in `format` can reach."""
    out = []
    for name in EXPORTERS:
        reads = get_exporter(name).reads
        if format in reads or ("onnx" in reads and format in CONVERTIBLE):
            out.append(name)
    return out


def export_version(registry: Registry, ref: str, format: str, *,
                   options: dict[str, Any] | None = None, data: DatasetSpec | None = None,
                   calibration: DatasetSpec | None = None,
                   tolerance: dict[str, Any] | None = None, output: str | Path | None = None, batch_sizes: tuple[int, ...] = (1, 32),
                   iterations: int = 200, obj: Any = None, progress=None,
                   label_column: str | None = None) -> ExportResult:
    """Export version `ref` ('name' or 'name:N') to `format`; see the module docstring.

    `data` gives the check rows; without it, synthetic rows built from the signature are used
    and the notes say so. Formats that quantize calibrate on `calibration` (default: the check
    rows, which makes the check optimistic: give both for an honest one). `tolerance` replaces
    the exporter's (atol, rtol, min_cosine, min_label_agreement). `output` is a folder the
    exported files are also written to. `obj` is the in-memory model the version
    was registered from (the Python API passes it, so TorchScript can script it).
    `label_column` names the labels in `data` (and in `calibration` when it has them): an
    export is checked against its source's outputs, so they are set aside, not used; the
    label column recorded with the model is set aside the same way when the data has it."""
    exporter_cls = get_exporter(format)
    config = exporter_cls.parse_config(options)
    if not batch_sizes or any(b < 1 for b in batch_sizes) or iterations < 1:
        raise ConfigError(f"Batch sizes {list(batch_sizes)} and iterations {iterations} must "
                          "be positive.")
    version = registry.resolve(ref)
    _check_reachable(version, exporter_cls)
    Tolerance().override(tolerance)  # a bad tolerance fails before any work
    folder = _output_folder(output) if output else None
    step = progress or (lambda stage: None)
    if label_column and data is not None and not data.label_column:
        data = data.model_copy(update={"label_column": label_column})
    labels = label_column or version.meta.get("label_column")
    with tempfile.TemporaryDirectory(prefix="optiserve-export-") as tmp:
        workdir = Path(tmp)
        rows, described = _rows(registry, version, data, default_label=labels)
        calib, calib_described = (_rows(registry, version, calibration, "calibration",
                                        default_label=labels)
                                  if calibration else ({}, ""))
        source = Source(path=registry.path(version), format=version.format,
                        signature=version.signature, meta=dict(version.meta), rows=rows,
                        rows_described=described, workdir=workdir, settings=registry.settings,
                        calibration=calib, calibration_described=calib_described, obj=obj)
        chain: list[dict] = []
        if version.format not in exporter_cls.reads:
            step("convert")
            source, chain = _to_onnx(source)
        step("export")
        exported = exporter_cls().export(source, config)
        exported.tolerance = exported.tolerance.override(tolerance)
        step("verify")
        verification = verify(registry, version, exported, format, rows, described)
        step("benchmark")
        latency = _time(registry, version, exported, format, rows, batch_sizes, iterations)
        step("register")
        notes = [*chain_notes(chain), *exported.notes]
        passes = [*chain, {"name": "export", "config": {"format": format,
                                                         **config.model_dump(mode="json")},
                           "set": {"format": format,
                                   **config.model_dump(mode="json", exclude_defaults=True)}}]
        meta = {**version.meta, **exported.meta, "exported_from": version.ref, "notes": notes,
                "export": {"verification": verification,
                           "latency_ms": {w: {str(b): v.as_dict() for b, v in by.items()}
                                          for w, by in latency.items()}}}
        stored = registry.add_version(
            version.model, exported.path, framework=exporter_cls.framework, format=format,
            signature=exported.signature, parent=version.version, passes=passes,
            metrics=_headline(verification), meta=meta, suffix=EXTENSIONS[format],
            status=EXPORTED)
        files = _write(exported, folder) if folder else []
    return ExportResult(version=stored, source=version, verification=verification,
                        latency=latency, notes=notes, files=files)


def _check_reachable(version: VersionInfo, exporter_cls: type[Exporter]) -> None:
    reads = exporter_cls.reads
    if version.format in reads or ("onnx" in reads and version.format in CONVERTIBLE):
        return
    others = [f for f in reachable(version.format) if f != exporter_cls.format]
    raise ExportError(
        f"{version.ref} is stored as {version.format} ({version.framework}); the "
        f"{exporter_cls.format} export is made from {', '.join(reads)}"
        + (" or a model that converts to ONNX" if "onnx" in reads else "") + ".",
        hint=(f"This model can be exported to: {', '.join(others)}." if others else
              "No export format takes this model; serve it as it is."))


def _rows(registry: Registry, version: VersionInfo, data: DatasetSpec | None,
          role: str = "check", *, default_label: str | None = None,
          ) -> tuple[dict[str, np.ndarray], str]:
    if data is not None:
        ds = load(data, version.signature, registry.settings,
                  feature_names=version.meta.get("feature_names"), role=role,
                  default_label=default_label)
        if ds.n == 0:
            raise ExportError(f"The {role} data ({ds.description}) has no rows.",
                              hint="Give a file or query with at least one row.")
        rows = {k: v[:MAX_ROWS] for k, v in ds.inputs.items()}
        return rows, f"{min(ds.n, MAX_ROWS)} rows of {ds.description}"
    rows = version.signature.example_inputs(SYNTHETIC_ROWS)
    return rows, (f"{SYNTHETIC_ROWS} synthetic rows (normal floats, ones for integer inputs); "
                  "pass data for real rows")


def _to_onnx(source: Source) -> tuple[Source, list[dict]]:
    """The source converted by the onnx_conversion pass, and the chain step it adds."""
    from optiserve.passes.base import Artifact, PassContext
    from optiserve.passes.onnx_conversion import OnnxConversion

    artifact = Artifact(path=source.path, format=source.format, signature=source.signature,
                        meta=source.meta)
    ctx = PassContext(workdir=source.workdir, settings=source.settings,
                      sample={k: v[:8] for k, v in source.rows.items()})
    conv = OnnxConversion()
    done = conv.run(artifact, conv.parse_config({}), ctx)
    converted = replace(source, path=done.path, format=done.format, signature=done.signature,
                        meta=done.meta)
    return converted, [{**p, "notes": done.notes} for p in done.passes]


def chain_notes(chain: list[dict]) -> list[str]:
    return [f"{p['name']}: {n}" for p in chain for n in p.get("notes", [])]


# -- verify -----------------------------------------------------------------------------------
def verify(registry: Registry, version: VersionInfo, exported: Exported, fmt: str,
           rows: dict[str, np.ndarray], described: str) -> dict[str, Any]:
    """Outputs of the export against the source's on `rows`; ExportError outside tolerance."""
    threads = registry.settings.threads
    with load_runtime(registry.path(version), version.signature, format=version.format,
                      threads=threads) as rt:
        want = rt.predict(rows)
    with load_runtime(exported.path, exported.signature, format=fmt, threads=threads) as rt:
        got = rt.predict(rows)
    pairs = _pair(want, got)
    result = {"rows": described, "tolerance": exported.tolerance.describe(), "outputs": {}}
    failures = []
    for name, (ref, out) in pairs.items():
        stats = compare(ref, out)
        result["outputs"][name] = stats
        failures += [f"output '{name}': {why}" for why in _violations(stats, ref, out,
                                                                       exported.tolerance)]
    result["passed"] = not failures
    if failures:
        raise ExportError(f"The {fmt} export does not match {version.ref} on {described}: "
                          f"{'; '.join(failures)}. Nothing was stored.",
                          hint=_fix_hint(exported.tolerance))
    return result


def _pair(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Outputs matched by name, else by position (converters rename outputs)."""
    if set(want) <= set(got):
        return {k: (want[k], got[k]) for k in want}
    return {k: (want[k], g) for k, g in zip(want, got.values())}


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    ref, out = np.asarray(ref), np.asarray(out)
    if ref.shape != out.shape and ref.size == out.size:
        out = out.reshape(ref.shape)
    if ref.shape != out.shape:
        return {"shape": list(out.shape), "expected_shape": list(ref.shape)}
    if ref.dtype.kind not in "fc" or out.dtype.kind not in "fc":
        return {"agreement": float(np.mean(ref == out))}
    r, o = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(r - o)
    stats = {"max_abs_error": float(diff.max(initial=0.0)),
             "mean_abs_error": float(diff.mean()) if diff.size else 0.0}
    cos = cosine_rows(r, o)
    stats["mean_cosine"] = float(cos.mean()) if cos.size else 1.0
    stats["min_cosine"] = float(cos.min()) if cos.size else 1.0
    if r.ndim == 2 and r.shape[1] > 1:
        stats["argmax_agreement"] = float(np.mean(r.argmax(1) == o.argmax(1)))
    return stats


def _violations(stats: dict, ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> list[str]:
    if "expected_shape" in stats:
        return [f"shape {stats['shape']}, expected {stats['expected_shape']}"]
    if "agreement" in stats:  # labels: the same or not
        floor = tol.min_label_agreement if tol.min_label_agreement is not None else 1.0
        return ([f"{stats['agreement']:.2%} of labels agree (need {floor:.0%})"]
                if stats["agreement"] < floor else [])
    bad = []
    if tol.atol is not None:
        r = np.asarray(ref, dtype=np.float64)
        o = np.asarray(out, dtype=np.float64).reshape(r.shape)
        if np.any(np.abs(r - o) > tol.atol + tol.rtol * np.abs(r)):
            bad.append(f"max abs error {stats['max_abs_error']:.3g} > {tol.describe()}")
    if tol.min_cosine is not None and stats["mean_cosine"] < tol.min_cosine:
        bad.append(f"mean cosine {stats['mean_cosine']:.4f} < {tol.min_cosine:g}")
    agree = stats.get("argmax_agreement")
    if tol.min_label_agreement is not None and agree is not None \
            and agree < tol.min_label_agreement:
        bad.append(f"arg-max agreement {agree:.2%} < {tol.min_label_agreement:.0%}")
    return bad


def _headline(verification: dict[str, Any]) -> dict[str, float]:
    """The version's metrics: the worst error and cosine over its outputs (details in meta)."""
    stats = verification["outputs"].values()
    out = {}
    errors = [s["max_abs_error"] for s in stats if "max_abs_error" in s]
    cosines = [s["mean_cosine"] for s in stats if "mean_cosine" in s]
    if errors:
        out["export_max_abs_error"] = max(errors)
    if cosines:
        out["export_mean_cosine"] = min(cosines)
    return out


def _fix_hint(tol: Tolerance) -> str:
    if tol.atol is not None:
        return ("A float export should match to rounding: the source uses an op the target "
                "runtime computes differently. Try another format, or report the model.")
    return ("Calibrate on real rows (pass data), or choose a less aggressive quantization "
            "(e.g. float16 or dynamic).")


# -- time ------------------------------------------------------------------------------------
def _time(registry: Registry, version: VersionInfo, exported: Exported, fmt: str,
          rows: dict[str, np.ndarray], batch_sizes: tuple[int, ...],
          iterations: int) -> dict[str, dict[int, Latency]]:
    inputs = {bs: Dataset(rows, None, "").take(bs) for bs in batch_sizes}
    threads = registry.settings.threads
    timed = {}
    for which, path, sig, kind in (
            ("source", registry.path(version), version.signature, version.format),
            ("export", exported.path, exported.signature, fmt)):
        timed[which], _ = benchmark_isolated(path, sig, format=kind, threads=threads,
                                             inputs=inputs, warmup=min(20, iterations),
                                             iterations=iterations, max_seconds=10)
    return timed


def _output_folder(output: str | Path) -> Path:
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the output folder {folder}: {exc.strerror}.",
                          hint="Choose a folder you can write to.") from None
    return folder


def _write(exported: Exported, folder: Path) -> list[str]:
    written = []
    for name, path in (exported.files or {exported.path.name: exported.path}).items():
        target = folder / name
        shutil.copyfile(path, target)
        written.append(str(target))
    return written
