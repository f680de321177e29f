"""The candidate tree: passes applied level by level, with retries where the gate failed.

A pass applies to every node of the frontier (a skipped node carries on unchanged); a
branching pass (another runtime's format) applies to every node made so far and its children
are leaves. Every node is a candidate, FP32 prefixes included.

The tree is given `measure(artifact) -> Candidate | None`, which the optimizer answers by
measuring and gating the artifact (None: it could not be measured), so the walk reacts to
each verdict before it makes the next candidate:

1. A candidate that failed the gate is retried with the next value of each accuracy knob the
   user left open (search.fallbacks: e.g. MinMax -> Percentile -> Entropy calibration).
2. When a family of configs (same settings but those knobs) has no passing member, its best
   member's layers are ranked by their error against FP32 and the worst are left in FP32, more
   each round (1, 2, 4, 8), until it passes.

Neither retry is made when the failed candidate is already slower than a passing one at every
batch size: keeping layers in FP32 only makes it slower, so it could not win.
"""

from __future__ import annotations

import json
import logging
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel

from optiserve.core.errors import ConfigError, MissingExtraError, first_line
from optiserve.optimizer import sensitivity
from optiserve.optimizer.search import fallbacks, searched_fields
from optiserve.passes.base import (Artifact, ExcludesNodes, Pass, PassContext, PassSkipped,
                                   get_pass)

log = logging.getLogger(__name__)
EXCLUDE_ROUNDS = (1, 2, 4, 8)


class CandidateTree:
    """`plans`: the chain's passes in order, each with the configs to try; `configs`: the
    request's options per pass (the fallbacks keep what the user set); `context`: what every
    pass gets (its workdir is the root under which each pass application gets its own);
    `rows`: a few inputs to rank layers on; `out_of_time()` and `note(text)` report to the run."""

    def __init__(self, plans: dict[str, list[BaseModel]], configs: dict[str, dict[str, Any]],
                 context: PassContext, rows: dict[str, np.ndarray],
                 measure: Callable[[Artifact], Any], *, out_of_time: Callable[[], bool],
                 note: Callable[[str], None]):
        self.plans, self.configs, self.context, self.rows = plans, configs, context, rows
        self.measure, self.out_of_time, self.note = measure, out_of_time, note
        self.measured: list[Any] = []  # the verdicts so far
        self.made = 0

    @staticmethod
    def planned(plans: dict[str, list[BaseModel]]) -> int:
        """About how many candidates a walk of `plans` measures (for progress)."""
        frontier, made = 1, 1
        for name, plan in plans.items():
            n, kind = len(plan), get_pass(name).kind
            if kind == "branch":
                made += n * made
            elif kind == "alternative":  # its input goes on beside its n children
                made += frontier * n
                frontier *= n + 1
            else:
                frontier *= n
                made += frontier
        return max(1, made - 1)

    def walk(self, original: Artifact) -> None:
        frontier, made = [original], [original]
        for step, name in enumerate(self.plans):
            cls = get_pass(name)
            nxt, skipped, made_before = [], [], len(made)
            branch = cls.kind == "branch"
            for node in (list(made) if branch else frontier):
                if self.out_of_time():
                    return
                refused = cls.refuses(node.format)
                if refused:
                    skipped.append((node.label, refused))
                    children = []
                else:
                    children = self._apply(cls, node, step, skipped)
                # a pass that makes an alternative (a shrunk network) keeps its input going
                # too, so later passes (onnx_conversion, quantization) compare both
                keep = not children or cls.kind == "alternative"
                nxt += children + ([node] if keep and node not in nxt else [])
                made += children
            if not branch:
                frontier = nxt
                for label, why in skipped:
                    self.note(f"{name} skipped on {label}: {why}")
            elif len(made) == made_before:
                # a branching pass skips the nodes it cannot read: say so only if it made
                # nothing, and once per reason (not once per node)
                for why in dict.fromkeys(why for _, why in skipped):
                    self.note(f"{name} skipped: {why}")

    # -- one pass on one node, with its retries ------------------------------------------
    def _apply(self, cls: type[Pass], node: Artifact, step: int,
               skipped: list[tuple[str, str]]):
        children: list[Artifact] = []
        queue, tried = list(self.plans[cls.name]), set()
        while queue and not self.out_of_time():
            config = queue.pop(0)
            key = config.model_dump_json()
            if key in tried:
                continue
            tried.add(key)
            child = self._make(cls, node, config, step, skipped)
            if child is None:
                continue
            verdict = self._measure(child)
            if verdict is None:
                continue  # it could not be measured (the optimizer said why): no child of it
            children.append(child)
            if not verdict.gate.passed and self._could_win(verdict):
                # depth first: settle this config's lineage before the next one
                queue[:0] = fallbacks(cls, self.configs.get(cls.name), config)
        if issubclass(cls.Config, ExcludesNodes):
            self._exclude_worst(cls, node, step, children, skipped)
        return children

    def _measure(self, child: Artifact):
        verdict = self.measure(child)
        if verdict is not None:
            self.measured.append(verdict)
        return verdict

    def _exclude_worst(self, cls, node, step, children, skipped):
        """Per family without a passing member: leave its best member's worst layers in FP32."""
        families: dict[str, list] = {}
        for verdict in self.measured:
            if any(verdict.artifact is c for c in children):
                families.setdefault(self._family(cls, verdict.artifact), []).append(verdict)
        for verdicts in families.values():
            if not verdicts or any(v.gate.passed for v in verdicts):
                continue
            best = max(verdicts, key=lambda v: v.evaluation.value)
            if not self._could_win(best):
                continue
            try:
                ranked = sensitivity.rank_layers(node.path, best.artifact.path, self.rows)
            except Exception as exc:  # ranking is advice; ONNX Runtime raises many types
                self.note(f"could not rank layers of {best.artifact.label}: {exc}")
                continue
            config = self._config_of(cls, best.artifact)
            already, errors = list(config.nodes_to_exclude), dict(ranked)
            for k in EXCLUDE_ROUNDS:
                worst = [name for name, _ in ranked if name not in already][:k]
                if len(worst) < k or self.out_of_time():
                    break
                retry = config.model_copy(update={"nodes_to_exclude": already + worst})
                child = self._make(cls, node, retry, step, skipped)
                if child is None:
                    break
                child.notes.append(
                    f"retry after the gate failed: left in FP32 the {k} layer(s) with the "
                    "largest error against FP32: "
                    + ", ".join(f"{n} ({errors[n]:.3f})" for n in worst))
                verdict = self._measure(child)
                if verdict is None:
                    break
                children.append(child)
                if verdict.gate.passed or not self._could_win(verdict):
                    break

    def _make(self, cls: type[Pass], node: Artifact, config: BaseModel, step: int,
              skipped: list[tuple[str, str]]) -> Artifact | None:
        """The child `cls` makes of `node`, or None: a skip goes into `skipped` as (where,
        why); a failure is noted; a ConfigError (the request's own mistake) stops the run."""
        if self.context.progress:
            self.context.progress(f"{cls.name} on {node.label}", 0)
        self.made += 1
        wd = self.context.workdir / f"{step}-{self.made}"
        wd.mkdir(parents=True)
        try:
            return cls().run(node, config, dataclasses.replace(self.context, workdir=wd))
        except (PassSkipped, MissingExtraError) as skip:  # the run goes on with the others
            skipped.append((node.label, str(skip)))
        except ConfigError:
            raise
        except Exception as exc:  # one failing candidate must not cost the others
            log.debug("pass %s failed on %s", cls.name, node.label, exc_info=True)
            options = config.model_dump(exclude_defaults=True)
            self.note(f"{cls.name} failed on {node.label} with {options}: "
                      f"{type(exc).__name__}: {first_line(exc)}; the run went on without it")
        return None

    # -- helpers -------------------------------------------------------------------------
    def _could_win(self, failed) -> bool:
        """False when a passing candidate is already faster at every batch size."""
        passing = [v for v in self.measured if v.gate is not None and v.gate.passed]
        for other in passing:
            if all(other.latency[bs].p50_ms <= failed.latency[bs].p50_ms for bs in failed.latency):
                self.note(f"{failed.artifact.label} failed the gate and was not retried: "
                          f"{other.artifact.label} already passes and is faster at every "
                          "batch size, and a retry (another calibration, layers kept in FP32) "
                          "would not be faster")
                return False
        return True

    @staticmethod
    def _config_of(cls: type[Pass], artifact: Artifact) -> BaseModel:
        return cls.Config(**artifact.passes[-1]["config"])

    @staticmethod
    def _family(cls: type[Pass], artifact: Artifact) -> str:
        knobs = {k for k, f in searched_fields(cls).items() if f.retry} | {"nodes_to_exclude"}
        config = artifact.passes[-1]["config"]
        return json.dumps({k: v for k, v in config.items() if k not in knobs}, sort_keys=True)
