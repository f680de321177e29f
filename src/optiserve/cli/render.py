"""Rich tables for reports, candidates, benchmarks, models and settings."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def report(console: Console, result) -> None:
    r = result.response
    o, n, imp = r["original"], r["optimized"], r["improvement"]
    metric = result.original.evaluation.metric
    t = Table(title=f"{r['optimization_id']}  status: {r['status']}  "
              f"artifact: {r['artifact_id']}", title_justify="left")
    for col in ("", "original", "optimized", "improvement"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("format", o["format"], n["format"], "")
    t.add_row("size (MB)", f"{o['size_mb']:.3f}", f"{n['size_mb']:.3f}", imp["size_reduction"])
    t.add_row(f"latency p50, batch {result.batch_size} (ms)", f"{o['latency_ms']:.4f}",
              f"{n['latency_ms']:.4f}", imp["latency_reduction"])
    t.add_row(metric, f"{o['accuracy']:.4f}", f"{n['accuracy']:.4f}", imp["accuracy_change"])
    console.print(t)
    candidates(console, result)
    gate = result.chosen.gate
    console.print(f"[bold]gate[/]: {gate.reason}  ->  "
                  + ("[green]pass[/]" if gate.passed else "[red]fail[/]"))
    console.print(f"data: {result.dataset}; threads: {result.threads}")
    if result.hardware:
        console.print(f"hardware: {result.hardware['summary']}")
    for bs, c in result.fastest.items():
        if c is not result.chosen and c.version is not None:
            console.print(f"fastest at batch {bs}: #{result.candidates.index(c)} "
                          f"{c.artifact.label}, kept as version {c.version.version}")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]")
    if result.pareto_png:
        console.print(f"Pareto chart: {result.pareto_png}")


def candidates(console: Console, result) -> None:
    sizes = sorted(result.original.latency)
    t = Table(title="candidates (p50 ms per batch size)", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("passes")
    t.add_column("runtime")
    t.add_column("MB", justify="right")
    for bs in sizes:
        t.add_column(f"b{bs}", justify="right")
    t.add_column(result.original.evaluation.metric, justify="right")
    t.add_column("max abs err", justify="right")
    t.add_column("agree", justify="right")
    t.add_column("gate")
    rows = [("orig", result.original), *((str(i), c) for i, c in enumerate(result.candidates))]
    for key, c in rows:
        chosen = c is result.chosen
        gate = "" if c.gate is None else ("pass" if c.gate.passed else "fail")
        t.add_row(key + (" *" if chosen else ""), c.artifact.label, c.runtime,
                  f"{c.size_bytes / 1e6:.3f}",
                  *(f"{c.latency[bs].p50_ms:.4f}" for bs in sizes),
                  f"{c.evaluation.value:.4f}", _num(c.parity.get("max_abs")),
                  _num(c.parity.get("label_agreement")), gate,
                  style="bold green" if chosen else None)
    console.print(t)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2g}" if x < 0.01 else f"{x:.4f}"


def benchmark(console: Console, res: dict[str, Any]) -> None:
    b = res["benchmark"]
    t = Table(title=f"{res['model_id']}:{res['version']}  {res['format']} in {res['runtime']}, "
              f"{res['threads']} threads, {b['iterations']} iterations "
              f"({b['warmup_iterations']} warmup)", title_justify="left")
    for col in ("batch", "runs", "p50 ms", "p95 ms", "p99 ms", "items/s"):
        t.add_column(col, justify="right")
    for key, r in b["results"].items():
        t.add_row(key.removeprefix("batch_"), str(r["runs"]), f"{r['p50_ms']:.4f}",
                  f"{r['p95_ms']:.4f}", f"{r['p99_ms']:.4f}", f"{r['throughput']:.1f}")
    console.print(t)


def export(console: Console, res) -> None:
    v, src = res.version, res.source
    console.print(f"registered [bold]{v.ref}[/] ({v.format}, {v.size_mb:.3f} MB) from "
                  f"{src.ref} ({src.format}, {src.size_mb:.3f} MB)")
    ver = res.verification
    console.print(f"verified on {ver['rows']}: {ver['tolerance']}")
    t = Table()
    for col in ("output", "max abs error", "mean cosine", "arg-max agreement"):
        t.add_column(col, justify="right" if col != "output" else "left")
    for name, s in ver["outputs"].items():
        if "agreement" in s:
            t.add_row(name, "", "", f"{s['agreement']:.2%} (labels)")
            continue
        agree = s.get("argmax_agreement")
        t.add_row(name, f"{s.get('max_abs_error', float('nan')):.3g}",
                  f"{s.get('mean_cosine', float('nan')):.6f}",
                  f"{agree:.2%}" if agree is not None else "")
    console.print(t)
    src_lat, exp_lat = res.latency.get("source", {}), res.latency.get("export", {})
    console.print(f"p50 latency (ms): {src.format} in its own runtime, {v.format} in its own")
    t = Table()
    for col in ("batch", src.format, v.format, "speedup"):
        t.add_column(col, justify="right")
    for bs, lat in exp_lat.items():
        before = src_lat.get(bs)
        t.add_row(str(bs), f"{before.p50_ms:.4f}" if before else "", f"{lat.p50_ms:.4f}",
                  f"{before.p50_ms / lat.p50_ms:.2f}x" if before else "")
    console.print(t)
    for note in res.notes:
        console.print(f"[dim]note: {note}[/]")
    for f in res.files:
        console.print(f"wrote {f}")


def models(console: Console, rows: list[dict[str, Any]]) -> None:
    """Models in the REST API's shape (GET /api/v1/models)."""
    t = Table(title="models", title_justify="left")
    for col in ("model", "versions", "latest", "format", "MB", "lineage", "metrics"):
        t.add_column(col)
    for m in rows:
        v = m["latest"]
        if v is None:
            t.add_row(m["name"], str(m["versions"]), "-", "", "", "", "")
            continue
        lineage = " > ".join(p["name"] for p in v["lineage"]["passes"]) or "registered"
        parent = v["lineage"]["parent"]
        shown = {k: (round(x, 4) if isinstance(x, float) else x)
                 for k, x in v["metrics"].items() if k != "gate"}
        t.add_row(m["name"], str(m["versions"]), str(v["version"]), v["format"],
                  f"{v['size_bytes'] / 1e6:.3f}", (f"v{parent} > " if parent else "") + lineage,
                  ", ".join(f"{k}={x}" for k, x in shown.items()))
    console.print(t)


def versions(console: Console, name: str, versions: list[dict[str, Any]]) -> None:
    """Versions in the REST API's shape (GET /api/v1/models/{name})."""
    from optiserve.core.types import Signature

    t = Table(title=name, title_justify="left")
    for col in ("version", "status", "format", "MB", "sha256", "parent", "passes"):
        t.add_column(col)
    for v in versions:
        t.add_row(str(v["version"]), v["status"], v["format"], f"{v['size_bytes'] / 1e6:.3f}",
                  v["sha256"][:12], str(v["lineage"]["parent"] or ""),
                  " > ".join(p["name"] for p in v["lineage"]["passes"]))
    console.print(t)
    for v in versions:
        console.print(f"v{v['version']}: {Signature.model_validate(v['signature']).describe()}",
                      soft_wrap=True)


def runs(console: Console, jobs: list[dict[str, Any]]) -> None:
    """Optimization runs in the REST API's shape (GET /api/v1/inference/optimizations)."""
    t = Table(title="optimization runs", title_justify="left")
    for col in ("id", "model", "status", "stage", "progress", "candidates", "created",
                "finished", "artifact"):
        t.add_column(col, justify="right" if col in ("progress", "candidates") else "left")
    for j in jobs:
        p = j["progress"]
        t.add_row(j["optimization_id"], j["model_id"] or "", _status(j["status"]),
                  p["stage"] or "", f"{p['fraction']:.0%}", str(p["candidates_measured"]),
                  _when(j["created_at"]), _when(j["finished_at"]),
                  (j["report"] or {}).get("artifact_id") or "")
    console.print(t)


def run(console: Console, job: dict[str, Any]) -> None:
    """One optimization run: its state, candidates so far and, when it ended, its report."""
    p = job["progress"]
    console.print(f"[bold]{job['optimization_id']}[/]  {job['model_id']}  "
                  f"status: {_status(job['status'])}  stage: {p['stage'] or '-'}  "
                  f"{p['fraction']:.0%}, {p['candidates_measured']} candidate(s) measured")
    console.print(f"created {_when(job['created_at'])}, started {_when(job['started_at'])}, "
                  f"finished {_when(job['finished_at'])}")
    passes = ", ".join(job["request"].get("optimizations") or [])
    if passes:
        console.print(f"passes: {passes}")
    cands = [c for c in job["candidates"] if isinstance(c, dict)]
    if cands:
        t = Table(title="candidates", title_justify="left")
        metric = next((c["metric"] for c in cands if c.get("metric")), "metric")
        for col in ("#", "passes", "runtime", "MB", "p50 ms (first batch)", metric, "gate"):
            t.add_column(col, justify="left" if col in ("passes", "runtime", "gate")
                         else "right")
        for i, c in enumerate(cands):
            gate = c.get("gate") or {}
            lat = next(iter((c.get("latency") or {}).values()), None) or {}
            t.add_row(str(i), str(c.get("label") or ""), str(c.get("runtime") or ""),
                      f"{c['size_mb']:.3f}" if c.get("size_mb") is not None else "",
                      f"{lat['p50_ms']:.4f}" if "p50_ms" in lat else "",
                      f"{c['value']:.4f}" if c.get("value") is not None else "",
                      "" if not gate else ("pass" if gate.get("passed") else "fail"))
        console.print(t)
    report = job.get("report")
    if report:
        o, n, imp = report["original"], report["optimized"], report["improvement"]
        console.print(f"kept [bold]{report.get('artifact_id')}[/]: {o['format']} -> "
                      f"{n['format']}, size {imp['size_reduction']} smaller, latency "
                      f"{imp['latency_reduction']} lower, accuracy {imp['accuracy_change']}")
    if job.get("error"):
        console.print(f"[red]error[/]: {job['error']}", soft_wrap=True)


def _status(status: str) -> str:
    style = {"completed": "green", "running": "cyan", "queued": "cyan", "rejected": "yellow",
             "failed": "red", "cancelled": "yellow", "timeout": "yellow"}.get(status)
    return f"[{style}]{status}[/]" if style else status


def _when(iso: str | None) -> str:
    return iso.replace("T", " ")[:19] if iso else "-"


def inference(console: Console, result: dict[str, Any], rows: int = 10) -> None:
    """A model's outputs: one table per output, a row per input row (first `rows` shown)."""
    import numpy as np

    console.print(f"[bold]{result['model_name']}[/] version {result['model_version']}")
    for name, array in result["outputs"].items():
        array = np.asarray(array)
        t = Table(title=f"{name}  {array.dtype}  shape {list(array.shape)}",
                  title_justify="left")
        t.add_column("row", justify="right")
        t.add_column("value")
        shown = array if array.ndim else array[None]
        with np.printoptions(precision=6, suppress=True, threshold=64, linewidth=10_000):
            for i, value in enumerate(shown[:rows]):
                text = value.decode(errors="replace") if isinstance(value, bytes) else (
                    np.array2string(value, separator=", ") if isinstance(value, np.ndarray)
                    else str(value))
                t.add_row(str(i), text)
        console.print(t)
        if len(shown) > rows:
            console.print(f"[dim]... {len(shown) - rows} more rows (--json prints all)[/]")


def keys(console: Console, rows: list[dict[str, Any]]) -> None:
    t = Table(title="API keys", title_justify="left")
    for col in ("id", "name", "scopes", "created", "last used", "revoked"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["name"], ", ".join(r["scopes"]), r["created_at"] or "",
                  r["last_used_at"] or "", r["revoked_at"] or "")
    console.print(t)


def settings(console: Console, values: dict[str, Any]) -> None:
    t = Table(title="effective settings", title_justify="left")
    t.add_column("variable")
    t.add_column("value")
    for k, v in values.items():
        t.add_row(k, str(v))
    console.print(t)
