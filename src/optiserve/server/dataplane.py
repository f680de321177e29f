"""The data plane: which model versions this server has loaded, and the one entry point every
face calls to run a request on them.

Inference: `infer(InferRequest) -> InferResponse`. It picks the version that answers
(`route`: the one named, else the newest loaded), has the face decode the body for that
version, checks the inputs, applies the split policy, queues the rows on the version's
batcher, and counts the request under its model, version and protocol whatever its outcome
(an unknown model under `_unknown`). The faces (http/v2.py, grpc/server.py, http/predict.py,
and the in-process client) only decode a request and encode the answer, so a new face serves
a model by calling `infer` alone. `metadata()`, `config()`, `stats()`, `ready()` and `index()`
answer the protocol's other questions, the same way for every face.

Loading: a deployment (registry/deployments.py) names a model, a version policy and how to
serve it. `load()` resolves the policy to version numbers, loads each new version off the
event loop (served.py: its instances, each a runtime with its share of the cores), warms it up
with inputs built from the signature, and only then swaps it in; versions the policy dropped
are drained and unloaded. A failed load leaves whatever was serving before untouched and
records why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

import optiserve
from optiserve.core.errors import ConfigError, ModelNotFound, OptiserveError, first_line
from optiserve.registry.deployments import (Deployment, DeploymentNotFound, DeploymentSpec,
                                            parse_spec)
from optiserve.registry.registry import Registry, VersionInfo
from optiserve.registry.tables import check_model_name
from optiserve.runtimes.base import Runtime, load_runtime
from optiserve.server.batching import ModelUnavailable
from optiserve.server.errors import http_status
from optiserve.server.metrics import UNKNOWN, Metrics, outcome
from optiserve.server.served import LoadFailed, ServedVersion

log = logging.getLogger("optiserve.server")

# The Open Inference Protocol extensions every face serves.
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
CANCELLED = 499  # counted like nginx's "client closed request": the client gave up

Inputs = dict[str, tuple[np.ndarray, str]]  # input name -> (array, V2 datatype)


@dataclass(slots=True)
class Payload:
    """What a face read from a request's body."""

    inputs: Inputs
    outputs: list[str] | None = None  # the outputs asked for; None: every output
    timeout_s: float | None = None  # how long it may queue; None: the deployment's, 0: no limit
    id: str | None = None  # the request's id, echoed in the answer


@dataclass(slots=True)
class InferRequest:
    """One inference request, as every face hands it to `DataPlane.infer`.

    `payload` is the decoded body, or a function that decodes it for the version chosen to
    answer (the friendly face binds records to that version's inputs); a decoding mistake
    is counted under that version like any other refusal."""

    model: str
    payload: Payload | Callable[[ServedVersion], Payload | Awaitable[Payload]]
    version: str | None = None  # None: the deployment's choice
    protocol: str = "rest"  # the requests counter's label: rest, grpc, predict, python
    deadline_s: float | None = None  # the client's own time left (gRPC's deadline)
    split: bool = False  # more rows than the version batches: split (True) or refuse
    received: float = field(default_factory=time.perf_counter)  # when the face got it


@dataclass(slots=True)
class InferResponse:
    """The outputs of one request and the version that computed them."""

    served: ServedVersion
    outputs: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]  # the checked inputs, in the model's order
    id: str | None = None

    @property
    def model(self) -> str:
        return self.served.name

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def rows(self) -> int | None:
        first = next(iter(self.inputs.values()), None)
        return first.shape[0] if first is not None and first.ndim else None


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

    # -- inference (the hot path) --------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request on the version that answers it; counted whatever its outcome."""
        served, status = None, 500
        try:
            served = self.route(request.model, request.version)
            payload = request.payload
            if not isinstance(payload, Payload):  # decoded for the version that answers
                payload = payload(served)
                if not isinstance(payload, Payload):
                    payload = await payload
            arrays = served.check(payload.inputs, payload.outputs)
            timeout = (served.batcher.timeout_s  # the common case, without a call
                       if payload.timeout_s is None and request.deadline_s is None
                       else _queue_limit(payload.timeout_s, served, request.deadline_s))
            if request.split and served.max_batch_size:
                outputs = await self._split(served, arrays, payload.outputs, timeout)
            else:  # the protocol's contract: more rows than the version batches are refused
                outputs = await served.batcher.submit(arrays, payload.outputs, timeout)
            status = 200
            return InferResponse(served, outputs, arrays, payload.id)
        except OptiserveError as exc:
            status = http_status(exc)
            raise
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        finally:
            self.count(served, request.protocol, status, time.perf_counter() - request.received)

    def route(self, name: str, version: str | None = None) -> ServedVersion:
        """The version that answers a request for `name` (and `version`, if one is named)."""
        return self.get(name, version)

    @staticmethod
    async def _split(served: ServedVersion, arrays: dict[str, np.ndarray],
                     outputs: list[str] | None, timeout_s: float | None
                     ) -> dict[str, np.ndarray]:
        """The split policy, for a face that asks for it: a request with more rows than the
        version batches queues in parts of max_batch_size rows, in parallel, joined in order.
        Without it (/v2 and gRPC: Triton's contract) the batcher refuses it ("at most N")."""
        size = served.max_batch_size
        first = next(iter(arrays.values()), None)
        rows = first.shape[0] if first is not None and first.ndim else None
        if rows is None or rows <= size:
            return await served.batcher.submit(arrays, outputs, timeout_s)
        parts = await asyncio.gather(
            *(served.batcher.submit({n: a[i:i + size] for n, a in arrays.items()}, outputs,
                                    timeout_s)
              for i in range(0, rows, size)), return_exceptions=True)
        failed = next((p for p in parts if isinstance(p, BaseException)), None)
        if failed is not None:
            raise failed
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def count(self, served: ServedVersion | None, protocol: str, status: int,
              total_s: float = 0.0) -> None:
        """One finished request: under its version, or `_unknown` when none answered (an
        unknown model, or a request refused before its model was looked up)."""
        if served is not None:
            served.stats.request(protocol, status, total_s)
        else:
            self.metrics.requests.labels(UNKNOWN, "", protocol, outcome(status)).inc()

    def refused(self, protocol: str, error: BaseException) -> None:
        """Count an inference request a face refused before handing it over (its key)."""
        self.count(None, protocol, http_status(error))

    # -- the protocol's other questions ----------------------------------------------------------
    def metadata(self, name: str, version: str | None = None) -> dict:
        """Model metadata; without a version it lists every loaded version."""
        meta = self.get(name, version).metadata()
        if not version:
            meta["versions"] = sorted(self._served[name], key=int)
        return meta

    def config(self, name: str, version: str | None = None) -> dict:
        return self.get(name, version).config()

    def stats(self, name: str | None = None, version: str | None = None) -> list[dict]:
        """The statistics extension's entries: every served version (no name), one model's
        versions, or one version."""
        if not name:
            return [s.stats.as_json() for versions in self._served.values()
                    for s in versions.values()]
        if version:
            return [self.get(name, version).stats.as_json()]
        self.get(name)
        return [s.stats.as_json() for s in self._served[name].values()]

    @staticmethod
    def server_metadata() -> dict:
        return {"name": "optiserve", "version": optiserve.__version__,
                "extensions": EXTENSIONS}

    # -- lookups ----------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ServedVersion:
        versions = self._served.get(name)
        if not versions:
            state = self._states.get(name)
            if state is not None and state.state != "READY":
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
        for d in await asyncio.to_thread(self.registry.deployments.list):
            if d.name not in deployed:
                deployed.add(d.name)
                out.append({"name": d.name, "version": "", "state": "UNAVAILABLE",
                            "reason": "unloaded (settings kept; load it to serve again)"})
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
            if not d.loaded:  # unloaded over the repository API: stays so until loaded
                continue
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

    async def unload_kept(self, name: str) -> None:
        """Triton's repository unload: stop serving `name` here and remember that it is
        unloaded, keeping its deployment and settings, so a load serves it again as it was
        (and a restart does not load it). Removing it is `undeploy`."""
        await asyncio.to_thread(self.registry.deployments.mark_unloaded, name)
        if name in self._states:
            await self.unload(name)

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
                r.predict(info.signature.example_inputs(1))
            if batchable:
                out = runtimes[0].predict(info.signature.example_inputs(2))
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


def _queue_limit(asked_s: float | None, served: ServedVersion, deadline_s: float | None
                 ) -> float | None:
    """How long a request may wait in the queue: what it asked (0: no limit), else its
    deployment's timeout, and never past the client's own deadline, so a request its client
    gave up on is not run."""
    limit = served.batcher.timeout_s if asked_s is None else asked_s
    if deadline_s is not None:
        deadline_s = max(deadline_s, 1e-6)  # 0 would mean "no limit" to the batcher
        limit = min(limit, deadline_s) if limit else deadline_s
    return limit
