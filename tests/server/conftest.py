"""A real server on a loopback port (uvicorn in a thread, the job runner with it), and httpx
clients holding API keys with chosen scopes."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    registry: object
    settings: object
    admin: str
    _clients: list = field(default_factory=list)

    def client(self, token: str | None = "admin", **kw) -> httpx.Client:
        """A client sending `token` (default: an admin key; None: no key)."""
        token = self.admin if token == "admin" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        c = httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 120), **kw)
        self._clients.append(c)
        return c

    def key(self, *scopes: str) -> str:
        return self.registry.keys.create("test", list(scopes))[1]

    def wait(self, run_id: str, timeout: float = 120) -> dict:
        """Poll a job until it ends; its JSON."""
        c = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = c.get(f"/api/v1/inference/optimizations/{run_id}").json()
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {run_id} still {job['status']} after {timeout} s")


@pytest.fixture
def make_server(request):
    """make_server(database_url=None, jobs=True, **settings) -> Live; stopped after the test."""
    from optiserve.core.settings import load_settings
    from optiserve.registry import Registry
    from optiserve.server.app import create_app, serve_in_thread

    started = []

    def make(*, database_url: str | None = None, jobs: bool = True, **overrides) -> Live:
        settings = load_settings(threads=1, database_url=database_url,
                                 **{"grpc_port": 0, **overrides})
        registry = Registry(settings)
        admin = registry.keys.create("admin", ["admin"])[1]
        running = serve_in_thread(create_app(settings, registry=registry, jobs=jobs))
        live = Live(running.__enter__(), registry, settings, admin)
        started.append((running, registry, live))
        return live

    yield make
    for running, registry, live in started:
        for c in live._clients:
            c.close()
        running.__exit__(None, None, None)
        registry.close()


@pytest.fixture
def server(make_server) -> Live:
    return make_server()
