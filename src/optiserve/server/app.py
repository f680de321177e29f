"""The composition root: settings -> registry -> job runner -> FastAPI app with its routes,
error shape, body limit and API keys. `optiserve serve` runs it with uvicorn."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

import optiserve
from optiserve.core.settings import Settings, load_settings
from optiserve.jobs.runner import JobRunner
from optiserve.registry.registry import Registry
from optiserve.server.http import errors, management
from optiserve.server.limits import BodyLimit

log = logging.getLogger("optiserve.server")


def create_app(settings: Settings | None = None, *, registry: Registry | None = None,
               jobs: bool = True) -> FastAPI:
    """The server's app. `jobs=False` serves the API without running optimizations (a
    read-only replica, or a test that only needs the routes)."""
    settings = settings or load_settings()
    registry = registry or Registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner = JobRunner(registry, settings) if jobs else None
        if runner:
            runner.start()
        app.state.runner = runner
        if settings.auth == "on" and not registry.keys.list():
            log.warning("no API keys exist: every request but /api/v1/health will get 401. "
                        "Create one with: optiserve keys create admin --scope admin")
        try:
            yield
        finally:
            if runner:
                runner.stop()

    app = FastAPI(title="optiserve", version=optiserve.__version__, lifespan=lifespan,
                  description="Make a trained model smaller, faster and served. Every endpoint "
                  "but /api/v1/health needs an API key (`Authorization: Bearer osk_...` or "
                  "`X-API-Key`); errors are JSON `{\"error\": \"...\"}`.")
    app.state.settings, app.state.registry, app.state.runner = settings, registry, None
    errors.install(app)
    app.include_router(management.router)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 1e6))
    return app
