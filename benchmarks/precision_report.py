"""optimize_precision.py's output: a table per model, optiserve's candidates, the targets, the
chart. Reads only the merged results (plain dicts), never a model."""

from __future__ import annotations

from pathlib import Path

from precision_models import MODELS
from precision_stages import VARIANTS

METHOD = {
    "threads": 2,
    "timing": "each variant in a fresh process: quality pass over the held-out rows, then per "
              "batch size 20 warm-up calls (cut at warmup_seconds), then up to 1000 timed calls "
              "or max_seconds; p50/p95 per call (perf_counter)",
    "quality": "CNNs: top-1 accuracy on the held-out digits (450 rows); MiniLM: cosine of each "
               "embedding vs PyTorch FP32 over 250 held-out sentences (mean, min)",
    "size": "torch: torch.save(state_dict); ONNX: file + external data; OpenVINO: xml + bin; "
            "optiserve: its artifact file",
    "speedup": "ORT FP32 p50 / variant p50 at the same batch size",
}
TARGET_SPEEDUP, MAX_DROP_POINTS, MINILM_COS, PEER_COS = 1.5, 0.5, 0.993, 0.99


def _p50(row: dict, bs: int) -> float | None:
    lat = row.get("latency", {}).get(f"batch_{bs}")
    return lat["p50_ms"] if lat else None


def _quality(spec, row: dict) -> str:
    q = row["quality"]
    if spec.metric == "accuracy":
        return f"{q['accuracy']:.2%} (agree {q['agreement_with_fp32']:.3f})"
    return f"{q['cos_mean']:.4f} (min {q['cos_min']:.3f})"


def print_model(console, model: str, entry: dict) -> None:
    from rich.table import Table

    spec, rows = MODELS[model], entry.get("variants", {})
    ref = rows.get("ort_fp32")
    t = Table(title=f"{spec.title}: p50 / p95 ms per call, speed-up vs ORT FP32; "
              + ("top-1 accuracy (agreement with FP32)" if spec.metric == "accuracy"
                 else "cosine vs PyTorch FP32 mean (min)"))
    for col in ("variant", "precision", "size MB", *(f"b{b} p50 / p95" for b in spec.batch_sizes),
                "speed-up " + "/".join(f"b{b}" for b in spec.batch_sizes), spec.metric):
        t.add_column(col, justify="left" if col in ("variant", "precision") else "right")
    for v in VARIANTS:
        if v not in rows:
            continue
        row = rows[v]
        lat = [row["latency"][f"batch_{b}"] for b in spec.batch_sizes]
        speed = [(_p50(ref, b) / _p50(row, b)) if ref else None for b in spec.batch_sizes]
        t.add_row(v + (" (earlier run)" if row.get("earlier_run") else ""), row["precision"],
                  f"{row['size_mb']:.1f}", *(f"{x['p50_ms']:.2f} / {x['p95_ms']:.2f}" for x in lat),
                  " / ".join("-" if s is None else f"{s:.2f}x" for s in speed),
                  _quality(spec, row))
    console.print(t)
    for v, err in entry.get("errors", {}).items():
        console.print(f"  [yellow]{v}: {err.splitlines()[-1] if err else err}[/]")
    if "optiserve" in entry:
        print_optiserve(console, spec, entry["optiserve"])
    busy = {v: r.get("other_cpu_busy") for v, r in rows.items()
            if r.get("other_cpu_busy") is not None and not r.get("earlier_run")}
    if any(b > 0.10 for b in busy.values()):
        console.print("[yellow]WARNING: other processes used more than 10% of the CPU while "
                      "timing " + ", ".join(f"{v} ({b:.0%})" for v, b in busy.items() if b > 0.1)
                      + "; those latencies are inflated. Re-run on an idle machine.[/]")


def print_optiserve(console, spec, opt: dict) -> None:
    from rich.table import Table

    det = (opt.get("details") or {}).get("details")
    if not det:
        return
    t = Table(title=f"optiserve's own candidates ({opt['settings']['iterations']} calls per "
              f"batch size; * = chosen; status {opt['status']}, {opt['seconds']:.0f} s)")
    for col in ("candidate", "runtime", "size MB", *(f"b{b} p50" for b in spec.batch_sizes),
                det["metric"], "gate"):
        t.add_column(col)
    for i, c in enumerate([det["original"], *det["candidates"]]):
        t.add_row(("* " if i - 1 == det["chosen"] else "") + c["label"], c["runtime"],
                  f"{c['size_mb']:.1f}",
                  *(f"{c['latency'][f'batch_{b}']['p50_ms']:.2f}" for b in spec.batch_sizes),
                  f"{c['value']:.4f}",
                  "-" if c["gate"] is None else ("pass" if c["gate"]["passed"] else "FAIL"))
    console.print(t)
    for note in explanation(opt):
        console.print(f"  optiserve note: {note}")


def explanation(opt: dict) -> list[str]:
    """The run's notes and the chosen candidate's own notes."""
    det = (opt.get("details") or {}).get("details") or {}
    notes = list(det.get("notes", []))
    if det.get("candidates") and det.get("chosen") is not None:
        notes += [n for n in det["candidates"][det["chosen"]].get("notes", []) if n not in notes]
    return notes


# -- targets -----------------------------------------------------------------------------------
def _check(model: str, name: str, ok: bool | None, detail: str) -> dict:
    return {"model": model, "target": name, "status": "n/a" if ok is None else
            ("PASS" if ok else "FAIL"), "detail": detail}


def _missing(entry: dict, need: list[str]) -> str | None:
    rows = entry.get("variants", {})
    gone = [v for v in need if v not in rows]
    if not gone:
        return None
    why = [f"{v}: {entry.get('errors', {}).get(v, 'not run')}" for v in gone]
    return "not measured - " + "; ".join(w.splitlines()[-1] if w else w for w in why)


def _resnet(entry: dict) -> dict:
    name = (f"static INT8 (optiserve auto) within {MAX_DROP_POINTS} points of FP32 and >= "
            f"{TARGET_SPEEDUP}x faster than ORT FP32 at batch 64")
    miss = _missing(entry, ["optiserve_auto", "ort_fp32"])
    if miss:
        return _check("resnet_digits64", name, None, miss)
    rows = entry["variants"]
    auto, fp32_acc = rows["optiserve_auto"], entry["prepare"]["torch_fp32_accuracy"]
    drop = (fp32_acc - auto["quality"]["accuracy"]) * 100
    speed = _p50(rows["ort_fp32"], 64) / _p50(auto, 64)
    static = auto["precision"] == "int8 static"
    return _check("resnet_digits64", name, static and drop <= MAX_DROP_POINTS
                  and speed >= TARGET_SPEEDUP,
                  f"chosen {auto['file']} is {auto['precision']}; accuracy "
                  f"{auto['quality']['accuracy']:.2%} vs FP32 {fp32_acc:.2%} ({drop:+.2f} points "
                  f"lost); b64 {_p50(rows['ort_fp32'], 64):.1f} / {_p50(auto, 64):.1f} ms = "
                  f"{speed:.2f}x")


def _digits(entry: dict) -> dict:
    """The issue states the premise "INT8 is slower than FP32 on this machine" (measured on
    another CPU). The rule behind the target is: auto keeps the faster artifact and says why.
    So the premise is checked on the peers measured in this run first: where ORT FP32 beats
    every INT8 peer at batch 64, auto must choose FP32 and a note must say INT8 did not pay
    off; where an INT8 peer is faster here, auto must choose INT8, no slower than the fastest
    peer (10 % allowed for noise), and the detail says the premise did not hold."""
    name = "auto chooses the faster artifact (FP32 where INT8 is slower) and says why"
    miss = _missing(entry, ["optiserve_auto", "ort_fp32", "ort_static"])
    if miss:
        return _check("digits_cnn", name, None, miss)
    rows = entry["variants"]
    auto = rows["optiserve_auto"]
    fp32 = _p50(rows["ort_fp32"], 64)
    int8_peers = {v: _p50(r, 64) for v, r in rows.items()
                  if v != "optiserve_auto" and r["precision"].startswith("int8")}
    best_int8 = min(int8_peers, key=int8_peers.get)
    notes = explanation(entry.get("optiserve", {}))
    why = [n for n in notes if n.startswith("chosen:")]
    if int8_peers[best_int8] >= fp32:  # the premise holds here
        ok = auto["precision"] == "fp32" and any("does not pay off" in n for n in why)
        premise = f"premise holds: ORT FP32 {fp32:.2f} ms < {best_int8} {int8_peers[best_int8]:.2f} ms"
    else:
        fastest = min(fp32, int8_peers[best_int8])
        ok = auto["precision"].startswith("int8") and _p50(auto, 64) <= 1.1 * fastest
        premise = (f"premise does NOT hold on this CPU: {best_int8} {int8_peers[best_int8]:.2f} ms "
                   f"< ORT FP32 {fp32:.2f} ms at b64, so the faster artifact is INT8")
    return _check("digits_cnn", name, ok and bool(why),
                  f"{premise}; chosen {auto['file']} is {auto['precision']}, b64 p50 "
                  f"{_p50(auto, 64):.2f} ms; why: " + (why[0] if why else "no note says why"))


def _minilm(entry: dict) -> list[dict]:
    name_cos = f"auto keeps mean cosine >= {MINILM_COS}"
    name_speed = f"auto at least as fast as the fastest peer with mean cosine >= {PEER_COS}"
    miss = _missing(entry, ["optiserve_auto"])
    if miss:
        return [_check("minilm", name_cos, None, miss), _check("minilm", name_speed, None, miss)]
    rows = entry["variants"]
    auto = rows["optiserve_auto"]
    cos = auto["quality"]["cos_mean"]
    out = [_check("minilm", name_cos, cos >= MINILM_COS,
                  f"{cos:.4f} (min {auto['quality']['cos_min']:.4f}), chosen {auto['file']}")]
    peers = {v: r for v, r in rows.items()
             if v != "optiserve_auto" and r["quality"]["cos_mean"] >= PEER_COS}
    parts, ok = [], True
    for bs in MODELS["minilm"].batch_sizes:
        if not peers:
            parts.append(f"b{bs}: no peer reaches cosine {PEER_COS}")
            continue
        best = min(peers, key=lambda v: _p50(peers[v], bs))
        ratio = _p50(auto, bs) / _p50(peers[best], bs)
        ok &= ratio <= 1.0
        parts.append(f"b{bs}: auto {_p50(auto, bs):.2f} ms vs {best} {_p50(peers[best], bs):.2f}"
                     f" ms (x{ratio:.2f})")
    out.append(_check("minilm", name_speed, ok, "; ".join(parts)))
    return out


def targets(data: dict) -> list[dict]:
    out = []
    if "digits_cnn" in data:
        out.append(_digits(data["digits_cnn"]))
    if "resnet_digits64" in data:
        out.append(_resnet(data["resnet_digits64"]))
    if "minilm" in data:
        out += _minilm(data["minilm"])
    for check in out:  # a diagnostic run with other passes does not count as `auto`
        passes = ((data[check["model"]].get("optiserve") or {}).get("request") or {}).get(
            "optimizations", ["auto"])
        if passes != ["auto"] and check["status"] != "n/a":
            check["detail"] += f" [NOT auto: optimizations={passes}]"
            check["status"] = "n/a"
    return out


def context(data: dict) -> list[str]:
    """The issue's reference points, measured here: how the peers themselves fare."""
    lines = []
    for model in ("digits_cnn", "resnet_digits64"):
        rows = data.get(model, {}).get("variants", {})
        if "ort_fp32" in rows:
            lines.append(f"{model} b64: ORT FP32 {_p50(rows['ort_fp32'], 64):.2f} ms, " + ", ".join(
                f"{v} {_p50(rows[v], 64):.2f} ms ({rows[v]['quality']['accuracy']:.2%})"
                for v in ("ort_static", "ort_dynamic", "openvino_fp32") if v in rows))
    rows = data.get("minilm", {}).get("variants", {})
    if rows:
        lines.append("minilm mean cosine: " + ", ".join(
            f"{v} {r['quality']['cos_mean']:.4f}" for v, r in rows.items()))
    return lines


def print_targets(console, checks: list[dict], data: dict) -> None:
    for line in context(data):
        console.print(f"  context: {line}")
    colour = {"PASS": "green", "FAIL": "red", "n/a": "yellow"}
    for c in checks:
        console.print(f"[{colour[c['status']]}]{c['status']}[/] {c['model']}: {c['target']}: "
                      f"{c['detail']}")


# -- chart -----------------------------------------------------------------------------------------
def make_chart(data: dict, path: Path) -> None:
    """Per model and batch size: p50 (log x) against accuracy or cosine, with the gate line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = [m for m in MODELS if data.get(m, {}).get("variants")]
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(5.4 * len(models), 8.4), squeeze=False)
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    for col, model in enumerate(models):
        spec, rows = MODELS[model], data[model]["variants"]
        acc = spec.metric == "accuracy"
        fp32 = data[model].get("prepare", {}).get("torch_fp32_accuracy", 1.0)
        gate = (fp32 * 100 - MAX_DROP_POINTS) if acc else MINILM_COS
        for r, bs in enumerate(spec.batch_sizes):
            ax = axes[r][col]
            for i, (v, row) in enumerate(rows.items()):
                x = _p50(row, bs)
                y = row["quality"]["accuracy"] * 100 if acc else row["quality"]["cos_mean"]
                ax.scatter(x, y, color=colors[v], s=90 if v == "optiserve_auto" else 40,
                           marker="*" if v == "optiserve_auto" else "o", zorder=3)
                ax.annotate(v, (x, y), textcoords="offset points", fontsize=7, rotation=35,
                            xytext=(4, 4 + 7 * (i % 2)), color=colors[v])
            ax.axhline(gate, color="grey", lw=0.8, ls="--")
            ax.text(0.99, gate, f" -{MAX_DROP_POINTS} pt vs FP32" if acc else f" cos {gate}",
                    transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7,
                    color="grey")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"p50 ms per call, batch {bs} (log)")
            ax.set_ylabel("top-1 accuracy %" if acc else "mean cosine vs PyTorch FP32")
            ax.set_title(f"{model}, batch {bs}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.margins(x=0.25, y=0.3)
    fig.suptitle(f"latency vs quality, {METHOD['threads']} threads, CPU (up and left is better;"
                 " * = optiserve auto)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
