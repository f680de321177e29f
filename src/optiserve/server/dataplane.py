"""The data plane: which model versions this server has loaded, and running requests on them.

A deployment (registry/deployments.py) names a model, a version policy and how to serve it.
`load()` resolves the policy to version numbers, loads each new version off the event loop
(its instances, each a runtime with its share of the cores), warms it up with inputs built
from the signature, and only then swaps it in; versions the policy dropped are drained and
unloaded. A failed load leaves whatever was serving before untouched and records why.
The protocol faces (http/v2.py, grpc/, the predict route) only call `get()` and `infer()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from optiserve.core.errors import ConfigError, ModelNotFound, OptiserveError, first_line
from optiserve.core.types import Signature, TensorSpec
from optiserve.registry.deployments import (Deployment, DeploymentNotFound, DeploymentSpec,
                                            parse_spec)
from optiserve.registry.registry import Registry, VersionInfo, check_model_name
from optiserve.runtimes.base import Runtime, load_runtime
from optiserve.server.batching import Batcher
from optiserve.server.metrics import Metrics, VersionStats
from optiserve.server.tensors import TensorError, check_input, datatype, platform

log = logging.getLogger("optiserve.server")
_WARMUP_SEQ = 8  # size given to dynamic dimensions other than the batch while warming up


class LoadFailed(OptiserveError):
    """A deployment could not be loaded; what served before still serves. It answers as its
    `cause` does (an unknown model stays a 404 / NOT_FOUND)."""

    def __init__(self, name: str, cause: OptiserveError, serving: bool):
        super().__init__(f"Deployment '{name}' did not load: {cause}",
                         hint="What served before still serves." if serving else None)
        self.name, self.cause = name, cause


class ServedVersion:
    """One loaded model version: its instances behind a batcher, and its counters."""

    def __init__(self, name: str, info: VersionInfo, spec: DeploymentSpec,
                 runtimes: list[Runtime], max_batch_size: int, metrics: Metrics):
        self.name, self.info, self.spec = name, info, spec
        self.version = str(info.version)
        self.signature: Signature = info.signature
        self.inputs = {t.name: t for t in info.signature.inputs}
        self.outputs = {t.name: t for t in info.signature.outputs}
        self.runtimes = runtimes
        self.max_batch_size = max_batch_size
        self.stats = VersionStats(metrics, name, self.version)
        self.batcher = Batcher(
            name, [r.predict for r in runtimes], max_batch_size=max_batch_size,
            max_queue_delay_us=spec.max_queue_delay_us,
            preferred_batch_sizes=spec.preferred_batch_sizes,
            max_queue_size=spec.max_queue_size,
            timeout_s=spec.timeout_ms / 1000 or None,
            on_batch=lambda b: self.stats.batch(b.rows, b.requests, b.queue_s, b.compute_s))
        metrics.queue_depth.labels(name, self.version).set_function(self.batcher.depth)

    def check(self, inputs: dict[str, tuple[np.ndarray, str]],
              outputs: list[str] | None) -> dict[str, np.ndarray]:
        """Inputs (array, V2 datatype) fit the model; the arrays, in the model's order."""
        unknown = [n for n in inputs if n not in self.inputs]
        if unknown:
            raise TensorError(f"Model '{self.name}' has no input '{unknown[0]}'.",
                              hint=f"Its inputs: {', '.join(self.inputs)}.")
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise TensorError(f"Input '{missing[0]}' of model '{self.name}' is missing.",
                              hint=f"Its inputs: {', '.join(self.inputs)}.")
        for name in outputs or ():
            if name not in self.outputs:
                raise TensorError(f"Model '{self.name}' has no output '{name}'.",
                                  hint=f"Its outputs: {', '.join(self.outputs)}.")
        arrays = {}
        rows = None
        for name, spec in self.inputs.items():
            array, given = inputs[name]
            check_input(spec, array, given, allow_nan=self.spec.allow_nan)
            if spec.dtype == "str":
                array = _text(name, array)
            if self.max_batch_size and array.ndim:
                if rows is not None and array.shape[0] != rows:
                    raise TensorError(f"Input '{name}' has {array.shape[0]} rows but the "
                                      f"other inputs have {rows}; every input carries the "
                                      "same batch.")
                rows = array.shape[0]
            arrays[name] = array
        return arrays

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None,
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        return await self.batcher.submit(inputs, outputs, timeout_s)

    def config(self) -> dict:
        """The model configuration extension (`GET /v2/models/{m}/config`), Triton's shape."""
        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "data_type": "TYPE_" + _triton_type(t.dtype),
                     "dims": list(t.shape[1:] if self.max_batch_size else t.shape)}
                    for t in specs]

        s = self.spec
        config = {"name": self.name, "platform": platform(self.info.format),
                  "backend": self.runtimes[0].name, "max_batch_size": self.max_batch_size,
                  "input": tensors(self.signature.inputs),
                  "output": tensors(self.signature.outputs),
                  "instance_group": [{"count": s.instances, "kind": "KIND_CPU"}],
                  "version_policy": ({"latest": {"num_versions": s.versions.latest}}
                                     if s.versions.specific is None
                                     else {"specific": {"versions": s.versions.specific}}),
                  "parameters": {"threads_per_instance": {
                      "string_value": str(self.runtimes[0].threads)}}}
        if self.max_batch_size:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": s.max_queue_delay_us,
                "preferred_batch_size": s.preferred_batch_sizes,
                "default_queue_policy": {"max_queue_size": s.max_queue_size,
                                         "default_timeout_microseconds": s.timeout_ms * 1000}}
        return config

    def metadata(self) -> dict:
        """Model metadata (`GET /v2/models/{m}[/versions/{v}]`)."""

        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "datatype": datatype(t.dtype), "shape": list(t.shape)}
                    for t in specs]

        return {"name": self.name, "versions": [self.version],
                "platform": platform(self.info.format),
                "inputs": tensors(self.signature.inputs),
                "outputs": tensors(self.signature.outputs)}

    def close(self, drain: bool = True) -> None:
        self.batcher.close(drain=drain)
        for r in self.runtimes:
            r.unload()


@dataclass
class _State:
    state: str  # LOADING, READY, UNAVAILABLE
    reason: str = ""


class DataPlane:
    """Loaded deployments of one server process."""

    def __init__(self, registry: Registry, metrics: Metrics | None = None,
                 cores: int | None = None):
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.cores = cores or os.cpu_count() or 1
        self._served: dict[str, dict[str, ServedVersion]] = {}
        self._states: dict[str, _State] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = False
        self._stored: set[str] = set()  # deployment names in the registry, for _how_to_serve
        self._stored_at = float("-inf")

    # -- lookups (the hot path) ---------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ServedVersion:
        versions = self._served.get(name)
        if not versions:
            state = self._states.get(name)
            if state is not None and state.state != "READY":
                from optiserve.server.batching import ModelUnavailable
                raise ModelUnavailable(f"Model '{name}' is {state.state.lower()}"
                                       + (f": {state.reason}" if state.reason else "."),
                                       hint="Check GET /v2/repository/index; load it with "
                                       f"POST /v2/repository/models/{name}/load.")
            raise ModelNotFound(name, known=self._served, detail=(
                f"No model '{name}' is served here.",
                "Served: " + (", ".join(sorted(self._served)) or "none") + ". "
                + self._how_to_serve(name)))
        if version is None or version == "":
            return versions[max(versions, key=int)]
        served = versions.get(version)
        if served is None:
            raise ModelNotFound(name, known=(), detail=(
                f"Model '{name}' has no version {version!r} loaded.",
                f"Loaded versions: {', '.join(sorted(versions, key=int))}."))
        return served

    def served(self) -> dict[str, dict[str, ServedVersion]]:
        return self._served

    def _how_to_serve(self, name: str) -> str:
        """The fix for a name this server does not serve: a deployment stored after the server
        started (by `optiserve deploy` in another process, or another server) needs loading
        here; otherwise it needs deploying. The stored names are read at most every 2 s."""
        now = time.monotonic()
        if now - self._stored_at > 2:
            try:
                self._stored = {d.name for d in self.registry.deployments.list()}
            except Exception:  # a message must not fail: say both
                self._stored = set()
            self._stored_at = now
        load = (f"POST /v2/repository/models/{name}/load or `optiserve load {name} --server "
                "URL`")
        if name in self._stored:
            return (f"Deployment '{name}' is stored but this server has not loaded it (it was "
                    f"deployed after the server started). Load it: {load}, or restart the "
                    "server.")
        return (f"Deploy and load it here: {load} (or `optiserve deploy {name}`, then restart "
                "the server).")

    def ready(self) -> bool:
        """Every deployment stored when the server started has loaded (a deployment added or
        reloaded later does not take the server out of its load balancer while it loads;
        one that cannot load at all does)."""
        return self._started and all(s.state != "UNAVAILABLE" for s in self._states.values())

    def state(self, name: str) -> tuple[str, str]:
        """(state, reason) of one deployment on this server."""
        if self._served.get(name):
            return "READY", ""
        state = self._states.get(name)
        return (state.state, state.reason) if state else ("UNAVAILABLE", "")

    async def index(self) -> list[dict]:
        """Every deployment and registered model with its state (repository extension); the
        registry is read off the event loop."""
        out = []
        for name, state in sorted(self._states.items()):
            versions = self._served.get(name) or {}
            if versions:
                out += [{"name": name, "version": v, "state": "READY", "reason": ""}
                        for v in sorted(versions, key=int)]
            else:
                out.append({"name": name, "version": "", "state": state.state,
                            "reason": state.reason})
        deployed = set(self._states)
        for model in await asyncio.to_thread(self.registry.models):
            if model.name not in deployed:
                out.append({"name": model.name, "version": "", "state": "UNAVAILABLE",
                            "reason": "not deployed"})
        return out

    # -- loading ------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every deployment in the registry (server start); failures are logged and
        shown in the repository index, the others still load."""
        for d in self.registry.deployments.list():
            try:
                await self.load(d)
            except OptiserveError as exc:
                log.error("deployment %s did not load: %s", d.name, exc)
        self._started = True

    async def load(self, deployment: Deployment | str, *, stored: bool = True
                   ) -> list[ServedVersion]:
        """Load (or reload) a deployment; returns what now serves under its name. A failed
        load of one that is not `stored` in the registry (a new deployment being tried)
        leaves no trace: it must not show as UNAVAILABLE, nor make the server unready."""
        if isinstance(deployment, str):
            deployment = self.registry.deployments.get(deployment)
        name, spec = deployment.name, deployment.spec
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            new_state = name not in self._states
            state = self._states.setdefault(name, _State("LOADING"))
            current = dict(self._served.get(name) or {})
            try:
                wanted = self._resolve(spec)
                keep = {v.version: current[str(v.version)] for v in wanted
                        if str(v.version) in current and current[str(v.version)].spec == spec
                        and current[str(v.version)].info.sha256 == v.sha256}
                fresh = [v for v in wanted if v.version not in keep]
                loaded = []
                try:
                    for info in fresh:
                        loaded.append(await asyncio.to_thread(self._load_version, name, info,
                                                              spec))
                except BaseException:
                    for s in loaded:
                        await asyncio.to_thread(s.close, False)
                    raise
            except OptiserveError as exc:
                self.metrics.loads.labels(name, "failure").inc()
                if not current:
                    state.state = "UNAVAILABLE"
                state.reason = f"last load failed: {exc}"
                if new_state and not stored:
                    del self._states[name]
                raise LoadFailed(name, exc, serving=bool(current)) from None
            new = {str(k): v for k, v in keep.items()} | {s.version: s for s in loaded}
            self._served[name] = new
            self._states[name] = _State("READY")
            self.metrics.loads.labels(name, "success").inc()
            self._count()
            for version, old in current.items():
                if new.get(version) is not old:
                    await asyncio.to_thread(old.close, True)
                    if version not in new:  # reloaded with new settings: its series go on
                        old.stats.forget()
            return list(new.values())

    async def deploy(self, name: str, settings: dict, *, replace: bool = False
                     ) -> list[ServedVersion]:
        """Create or change the deployment `name`, load it, and only when it loaded store it
        in the registry. `settings` go over the current ones (or, with `replace`, over the
        defaults); a new deployment serves the registered model of its own name unless
        `model` says otherwise."""
        check_model_name(name)  # before loading anything under it
        current, stored = {"model": name}, True
        try:
            found = await asyncio.to_thread(self.registry.deployments.get, name)
            if not replace:
                current = found.spec.model_dump()
        except DeploymentNotFound:
            stored = False
        spec = parse_spec({**current, **settings})
        served = await self.load(Deployment(name, spec, None, None), stored=stored)
        try:
            await asyncio.to_thread(self.registry.deployments.put, name, spec)
        except BaseException:
            if not stored:  # not stored, so not served either
                await self.unload(name)
            raise
        return served

    async def undeploy(self, name: str) -> None:
        """Unload `name` here and remove its deployment, so its model can be deleted."""
        loaded = name in self._states
        if loaded:
            await self.unload(name)
        try:
            await asyncio.to_thread(self.registry.deployments.remove, name)
        except DeploymentNotFound:
            if not loaded:
                raise

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self._served.pop(name, None)
            state = self._states.pop(name, None)
            if current is None and state is None:
                raise DeploymentNotFound(name, list(self._states))
            self._count()
            for version, old in (current or {}).items():
                await asyncio.to_thread(old.close, True)
                old.stats.forget()

    async def close(self) -> None:
        for name in list(self._served):
            await self.unload(name)

    def _count(self) -> None:
        self.metrics.loaded.set(sum(len(v) for v in self._served.values()))

    def _resolve(self, spec: DeploymentSpec) -> list[VersionInfo]:
        versions = self.registry.versions(spec.model)
        ready = [v for v in versions if v.status == "ready"]
        if spec.versions.specific is not None:
            by_number = {v.version: v for v in versions}
            missing = [n for n in spec.versions.specific if n not in by_number]
            if missing:
                raise ModelNotFound(spec.model, missing[0], known=[spec.model])
            return [by_number[n] for n in spec.versions.specific]
        if not ready:
            raise ModelNotFound(spec.model, known=[spec.model], detail=(
                f"Model '{spec.model}' has no ready version.",
                "Register one, or name a version explicitly."))
        return ready[-spec.versions.latest:]

    def _load_version(self, name: str, info: VersionInfo, spec: DeploymentSpec
                      ) -> ServedVersion:
        """Off the event loop: instances loaded and warmed up, batching checked."""
        started = time.perf_counter()
        path = self.registry.path(info)
        threads = spec.threads_per_instance(self.cores)
        runtimes: list[Runtime] = []
        if spec.predict is not None:  # declared pre/post-processing must fit this version
            spec.predict.check(info.signature)
        try:
            for _ in range(spec.instances):
                r = load_runtime(path, info.signature, format=info.format, threads=threads,
                                 name=spec.runtime)
                r.load()
                runtimes.append(r)
            batchable = bool(spec.max_batch_size) and all(
                t.shape and t.shape[0] == -1 for t in info.signature.inputs)
            for r in runtimes:
                r.predict(warmup_inputs(info.signature, 1))
            if batchable:
                out = runtimes[0].predict(warmup_inputs(info.signature, 2))
                if not all(a.ndim and a.shape[0] == 2 for a in out.values()):
                    log.warning("%s v%s: outputs are not one row per input row; batching off",
                                name, info.version)
                    batchable = False
        except Exception as exc:
            for r in runtimes:
                r.unload()
            if isinstance(exc, OptiserveError):
                raise
            raise ConfigError(f"version {info.version} failed its warm-up run "
                              f"({first_line(exc)})",
                              hint="Check the model runs on inputs of its signature.") from None
        served = ServedVersion(name, info, spec, runtimes,
                               spec.max_batch_size if batchable else 0, self.metrics)
        log.info("loaded %s v%s (%s, %d x %d threads, max batch %d) in %.2f s", name,
                 info.version, runtimes[0].name, spec.instances, threads,
                 served.max_batch_size, time.perf_counter() - started)
        return served


def warmup_inputs(signature: Signature, rows: int) -> dict[str, np.ndarray]:
    """Zeros of every input's dtype and shape: `rows` for the batch dimension, a short
    sequence for the other dynamic ones."""
    out = {}
    for t in signature.inputs:
        shape = [rows if i == 0 and d == -1 else (_WARMUP_SEQ if d == -1 else d)
                 for i, d in enumerate(t.shape)]
        if t.dtype in ("str", "object"):
            out[t.name] = np.full(shape, "", dtype=object)
        else:
            out[t.name] = np.zeros(shape, dtype=np.dtype(t.dtype))
    return out


def _text(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements as str for a text input: runtimes (ONNX Runtime's string tensors,
    scikit-learn) take str, and ONNX Runtime would turn b'abc' into the text "b'abc'"."""
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, x in enumerate(array.reshape(-1)):
        try:
            flat[i] = x.decode() if isinstance(x, bytes) else x
        except UnicodeDecodeError:
            raise TensorError(f"Input '{name}' is text, but its element {i} is not UTF-8.",
                              hint="Send text inputs as UTF-8 strings.") from None
    return out


def _triton_type(dtype: str) -> str:
    name = datatype(dtype)
    return {"BYTES": "STRING"}.get(name, name)
