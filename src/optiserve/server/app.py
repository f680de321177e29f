"""The composition root: settings -> registry -> job runner and data plane -> the faces:
FastAPI (management API, predict), the Open Inference Protocol over REST (a pure ASGI layer in
front of FastAPI) and over gRPC. `optiserve serve` runs it with uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI

import optiserve
from optiserve.core.settings import Settings, load_settings
from optiserve.jobs.runner import JobRunner
from optiserve.registry.registry import Registry
from optiserve.server import tls
from optiserve.server.auth import KeyCache
from optiserve.server.dataplane import DataPlane
from optiserve.server.http import deployments, errors, management, predict
from optiserve.server.http.v2 import OIPRest
from optiserve.server.limits import BodyLimit, Watchdog

log = logging.getLogger("optiserve.server")


def create_app(settings: Settings | None = None, *, registry: Registry | None = None,
               jobs: bool = True, host: str = "127.0.0.1", port: int | None = None) -> FastAPI:
    """The server's app. `jobs=False` serves without running optimizations (an inference
    replica, or a test that only needs the routes). gRPC listens on `host`:grpc_port; `port`
    (HTTP, where uvicorn listens) only goes into the "ready" log line."""
    settings = settings or load_settings()
    tls.check(settings, host)  # before anything starts: whole TLS settings, no keys in clear
    registry = registry or Registry(settings)
    plane = DataPlane(registry)
    keys = KeyCache(registry.keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner = JobRunner(registry, settings) if jobs else None
        if runner:
            runner.start()
        app.state.runner = runner
        if settings.auth == "on" and not registry.keys.list():
            log.warning("no API keys exist: every request but the health checks will get "
                        "401. Create one with: optiserve keys create admin --scope admin")
        grpc_server = None
        try:
            await plane.load_all()
            if settings.grpc_port:
                from optiserve.server.grpc.server import start_grpc
                grpc_server = await start_grpc(plane, keys, settings, host=host)
            _log_ready(plane, settings, runner, host, port)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2)
            await plane.close()
            if runner:
                runner.stop()

    app = FastAPI(title="optiserve", version=optiserve.__version__, lifespan=lifespan,
                  description="Make a trained model smaller, faster and served. Every endpoint "
                  "but the health checks needs an API key (`Authorization: Bearer osk_...` or "
                  "`X-API-Key`); errors are JSON `{\"error\": \"...\"}`. The Open Inference "
                  "Protocol (KServe V2) is served under /v2 and over gRPC; Prometheus metrics "
                  "at /metrics.")
    app.state.settings, app.state.registry, app.state.runner = settings, registry, None
    app.state.plane, app.state.keys = plane, keys
    errors.install(app)
    app.include_router(management.router)
    app.include_router(deployments.router)
    app.include_router(predict.router)
    watchdog = Watchdog(settings.body_timeout_s)  # one sweep for every body being read
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 1e6),
                       watchdog=watchdog)
    app.add_middleware(OIPRest, plane=plane, keys=keys, settings=settings, watchdog=watchdog)
    return app


def _log_ready(plane: DataPlane, settings: Settings, runner, host: str,
               port: int | None) -> None:
    """One line per deployment loaded (name, versions, runtime, instances), then "ready"."""
    for name, versions in sorted(plane.served().items()):
        served = [versions[v] for v in sorted(versions, key=int)]
        first = served[0]
        log.info("serving %s: %s v%s (%s, %d instance%s x %d threads, max batch %d)", name,
                 first.info.model, ",".join(s.version for s in served), first.runtimes[0].name,
                 len(first.runtimes), "" if len(first.runtimes) == 1 else "s",
                 first.runtimes[0].threads, first.max_batch_size)
    stored = plane.registry.deployments.list()
    failed = [d.name for d in stored if not plane.served().get(d.name)]
    where = f"http://{host}:{port}" if port else f"host {host}"
    count = len(plane.served())
    log.info("ready: %d deployment%s served%s; %s (REST /v2, /api/v1, /docs)%s; %s; %s",
             count, "" if count == 1 else "s",
             f", {len(failed)} failed to load ({', '.join(failed)})" if failed else "", where,
             f", gRPC {host}:{settings.grpc_port}" if settings.grpc_port else "",
             f"{runner.workers} optimization job worker(s)" if runner else "no optimization jobs",
             settings.describe_registry())


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1",
                    log_level: str = "warning") -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free port, for the demo and the tests: yields
    the base URL once the app has started (deployments loaded), stops it on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    options = tls.uvicorn_options(app.state.settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           access_log=False, lifespan="on", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start (see its log above)")
        time.sleep(0.02)
    try:
        yield f"{'https' if options else 'http'}://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
