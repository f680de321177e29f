"""The Pareto chart of a run: latency against the metric, marker area by size, one panel per
batch size. Candidates no other candidate beats on both latency and metric are joined by the
front line; failed candidates are hollow; the chosen one is starred."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from optiserve.core.deps import available

log = logging.getLogger(__name__)


def front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (lower latency, higher metric), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    kept, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            kept.append(i)
            best = points[i][1]
    return kept


def save(result, folder: Path, note: Callable[[str], None]) -> str | None:
    """Write `<run_id>-pareto.png` under `folder`; None (and a note) without matplotlib."""
    if not available("matplotlib"):
        note("no Pareto chart: matplotlib is missing (pip install 'optiserve[plots]')")
        return None
    # a Figure of its own, not pyplot: no process-wide backend switch or figure registry (a
    # notebook's inline plots and other threads are left alone)
    from matplotlib.figure import Figure

    cands = [result.original, *result.candidates]
    sizes = sorted(result.original.latency)
    fig = Figure(figsize=(6.2 * len(sizes), 4.8))
    axes = fig.subplots(1, len(sizes), squeeze=False)
    required = next((c.gate.required for c in result.candidates if c.gate is not None), None)
    biggest = max(c.size_bytes for c in cands) or 1
    for ax, bs in zip(axes[0], sizes):
        points = [(c.latency[bs].p50_ms, c.evaluation.value) for c in cands]
        slowest = max(x for x, _ in points)
        for i, (c, (x, y)) in enumerate(zip(cands, points)):
            failed = c.gate is not None and not c.gate.passed
            area = 40 + 400 * c.size_bytes / biggest
            ax.scatter([x], [y], s=area, facecolors="none" if failed else f"C{i % 10}",
                       edgecolors=f"C{i % 10}", linewidths=1.5, zorder=3)
            label = "orig" if i == 0 else str(i - 1)
            if c is result.chosen:
                ax.scatter([x], [y], s=160, marker="*", color="black", zorder=4)
            right = x == slowest  # its label goes left, inside the axes
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(-8 if right else 6, 4),
                        ha="right" if right else "left", fontsize=8)
        idx = front(points)
        ax.plot([points[i][0] for i in idx], [points[i][1] for i in idx], "--", color="grey",
                zorder=2, label="Pareto front")
        if required is not None:  # the gate's own bound (negative metrics included)
            ax.axhline(required, color="red", lw=0.8,
                       label=f"gate ({result.threshold:.3g} x original)")
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.08)  # the biggest markers stay inside the frame
        ax.set_xlabel(f"p50 latency at batch {bs} (ms, log)")
        ax.set_ylabel(result.original.evaluation.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    legend = "\n".join(f"{i}: {c.artifact.label}" for i, c in enumerate(result.candidates))
    # two short lines: one long line is wider than a one-panel figure and was cut off
    fig.suptitle(f"{result.run_id}: p50 latency vs {result.original.evaluation.metric}\n"
                 "marker area = size, hollow = failed the gate, star = chosen", fontsize=10)
    fig.text(0.01, -0.02, legend, fontsize=7, va="top", family="monospace")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.run_id}-pareto.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)  # whole or not at all
    return str(path.resolve())
