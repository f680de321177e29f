"""The demo's last step: deploy the optimized models and serve them.

A real server on a free loopback port (the same app `optiserve serve` runs, API keys on), the
deployments made over its REST API, then held-out rows sent one per request as Open Inference
Protocol JSON from 16 concurrent clients, as an application would. The table shows what the
clients measured, the batch sizes the dynamic batcher formed, and the accuracy of the served
answers against the labels.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from optiserve.data.binding import Dataset
from optiserve.server.tensors import datatype

CONCURRENCY = 16


@contextmanager
def running_server(registry):
    """The server app (keys on, no gRPC, no jobs) in a thread; yields its base URL."""
    from optiserve.core.settings import load_settings
    from optiserve.server.app import create_app, serve_in_thread

    settings = load_settings(home=registry.settings.home, grpc_port=0, auth="on")
    with serve_in_thread(create_app(settings, registry=registry, jobs=False),
                         log_level="error") as url:
        yield url


def serve_demo(console: Console, registry, datasets: dict[str, Dataset],
               rows: int = 1000) -> list[dict]:
    """Deploy and serve each model in `datasets` (name -> held-out inputs with labels)."""
    key, token = registry.keys.create("demo", ["infer", "models:write", "read"])
    results = []
    try:
        with running_server(registry) as url:
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                for name, data in datasets.items():
                    r = client.put(f"/api/v1/deployments/{name}",
                                   json={"max_batch_size": 64})
                    r.raise_for_status()
                    results.append(_serve_one(client, url, headers, name, data, rows))
                for name in datasets:
                    client.delete(f"/api/v1/deployments/{name}")
    finally:
        registry.keys.revoke(key.id)
    table = Table(title=f"serving: the held-out rows (up to {rows}) as single-row OIP JSON "
                  f"requests from {CONCURRENCY} concurrent clients in this process",
                  title_justify="left")
    for col in ("model", "runtime", "requests", "req/s", "p50 ms", "p99 ms", "mean batch",
                "served accuracy"):
        table.add_column(col)
    for r in results:
        table.add_row(r["model"], r["runtime"], str(r["requests"]), f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['mean_batch']:.1f}",
                      "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}")
    console.print(table)
    return results


def _serve_one(client: httpx.Client, url: str, headers: dict, name: str, data: Dataset,
               rows: int) -> dict:
    meta = client.get(f"/v2/models/{name}").json()
    config = client.get(f"/v2/models/{name}/config").json()
    output = meta["outputs"][0]["name"]
    n = min(rows, data.n)
    bodies = [{"inputs": [{"name": k, "shape": [1, *v.shape[1:]], "datatype": datatype(v.dtype),
                           "data": v[i:i + 1].reshape(-1).tolist()}
                          for k, v in data.inputs.items()],
               "outputs": [{"name": output}]} for i in range(n)]
    answers, latencies, seconds = asyncio.run(_send(url, headers, name, bodies))
    predicted = np.array([_label(a["outputs"][0]) for a in answers])
    accuracy = None
    if data.labels is not None:
        accuracy = float(np.mean(predicted == np.asarray(data.labels[:n]).astype(predicted.dtype)))
    stats = client.get(f"/v2/models/{name}/stats").json()["model_stats"][0]
    return {"model": f"{name}:{meta['versions'][-1]}", "runtime": config["backend"],
            "requests": n, "rps": n / seconds, "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000),
            "mean_batch": stats["inference_count"] / max(1, stats["execution_count"]),
            "accuracy": accuracy}


async def _send(url: str, headers: dict, name: str, bodies: list[dict]):
    answers: list = [None] * len(bodies)
    latencies: list[float] = []
    todo = iter(range(len(bodies)))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            t = time.perf_counter()
            r = await client.post(f"/v2/models/{name}/infer", json=bodies[i])
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            answers[i] = r.json()

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        return answers, latencies, time.perf_counter() - start


def _label(output: dict):
    """A class label from an output: the value itself, or the argmax of scores."""
    data = np.asarray(output["data"])
    return data.reshape(output["shape"])[0].argmax() if len(output["shape"]) > 1 and \
        output["shape"][-1] > 1 else data.reshape(-1)[0]
