"""The management API under /api/v1: models, artifacts, optimization jobs, benchmarks.

Thin: each route checks its scope, calls the Python API / registry / job runner, and shapes
JSON. Blocking work (database, files, data loading) runs in FastAPI's thread pool (plain `def`
routes); waiting for a job is async.
"""

from __future__ import annotations

import asyncio
import platform
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import onnxruntime
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

import optiserve
from optiserve import api
from optiserve.convert.detect import EXT_FORMAT, sniff
from optiserve.convert.formats import EXTENSIONS
from optiserve.core.errors import ConflictError, GateFailedError, UnsupportedUpload
from optiserve.data.sources import DatasetSpec, confine
from optiserve.optimizer.request import (MAX_BATCH_SIZES, MAX_ITERATIONS, MAX_WARMUP,
                                         BatchSize, OptimizeRequest)
from optiserve.passes.base import confine_files
from optiserve.registry.registry import Registry, VersionInfo
from optiserve.registry.runs import TERMINAL
from optiserve.server.auth import scope
from optiserve.server.errors import http_status
from optiserve.server.health import report, require_space
from optiserve.server.http.errors import error_response

router = APIRouter(prefix="/api/v1")
_CHUNK = 1 << 20


def _registry(request: Request) -> Registry:
    return request.app.state.registry


Reg = Annotated[Registry, Depends(_registry)]


# -- shapes -------------------------------------------------------------------------------
class Summary(BaseModel):
    format: str
    size_mb: float
    latency_ms: float
    accuracy: float


class Improvement(BaseModel):
    size_reduction: str
    latency_reduction: str
    accuracy_change: str


class OptimizeResponse(BaseModel):
    """The seed's response body."""

    optimization_id: str
    status: str
    original: Summary
    optimized: Summary
    improvement: Improvement
    artifact_id: str | None


class Queued(BaseModel):
    optimization_id: str
    status: str = Field(description="'queued'")
    model_id: str = Field(description="The version that will be optimized (MODEL:VERSION).")
    links: dict[str, str]


class BenchmarkRequest(BaseModel):
    """The seed's benchmark request."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(description="MODEL or MODEL:VERSION.")
    iterations: int = Field(100, ge=1, le=MAX_ITERATIONS, description="Timed calls per batch size.")
    warmup_iterations: int = Field(10, ge=0, le=MAX_WARMUP, description="Untimed calls first.")
    batch_sizes: list[BatchSize] = Field(
        default_factory=lambda: [1, 16, 32, 64], min_length=1, max_length=MAX_BATCH_SIZES)
    max_seconds: float = Field(10, gt=0, le=120, description="Cap per batch size.")
    dataset: DatasetSpec | None = Field(
        None, description="Inputs from data (default: synthetic from the signature).")


def version_json(v: VersionInfo) -> dict[str, Any]:
    return {"model": v.model, "version": v.version, "ref": v.ref, "status": v.status,
            "format": v.format, "framework": v.framework, "artifact_id": v.artifact_id,
            "sha256": v.sha256, "size_bytes": v.size_bytes,
            "signature": v.signature.model_dump(mode="json"),
            "lineage": {"parent": v.parent, "passes": v.passes},
            "metrics": v.metrics, "meta": v.meta,
            "created_at": v.created_at.isoformat() if v.created_at else None}


def job_json(run: dict[str, Any]) -> dict[str, Any]:
    report = run["report"] or None
    iso = {k: run[k].isoformat() if run[k] else None
           for k in ("created_at", "started_at", "finished_at")}
    candidates = report["details"]["candidates"] if report else run["candidates"]
    if report and report["details"].get("pareto_png"):  # a URL here, not the server's path
        report = {**report, "details": {**report["details"], "pareto_png":
                                        f"/api/v1/inference/optimizations/{run['id']}/pareto.png"}}
    return {
        "optimization_id": run["id"], "status": run["status"],
        "model_id": run["request"].get("model_id"), **iso,
        "progress": {"fraction": round(run["progress"] or 0.0, 3), "stage": run["stage"],
                     "candidates_measured": len(candidates)},
        "candidates": candidates,
        "report": {k: v for k, v in report.items() if k != "details"} if report else None,
        "details": report["details"] if report else None,
        "error": run["error"], "request": run["request"],
    }


# -- service ------------------------------------------------------------------------------
@router.get("/health", tags=["service"],
            summary="Liveness, database reachability and storage (no key)")
def health(request: Request, registry: Reg):
    runner = request.app.state.runner
    status, body = report(registry, request.app.state.settings,
                          runner.workers if runner else 0)
    return body if status == 200 else error_response(status, body.pop("error"), **body)


@router.get("/version", tags=["service"], dependencies=[Depends(scope("read"))])
def version():
    return {"optiserve": optiserve.__version__, "api": "v1",
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


# -- models -------------------------------------------------------------------------------
@router.post("/models", tags=["models"], status_code=201,
             dependencies=[Depends(scope("models:write"))],
             summary="Register a model: ONNX, TorchScript, skops or .keras (no pickles, .pt2, "
                     "native tree files or SavedModels)")
def register_model(
    registry: Reg,
    file: UploadFile = File(description=".onnx, .pt (TorchScript), .skops (scikit-learn "
                            "saved with skops.io.dump) or .keras (Keras 3 model.save)"),
    name: str = Form(description="Model name, e.g. churn."),
    inputs: list[str] | None = Form(None, description="TorchScript input specs "
                                    "NAME:DTYPE[DIMS], one per input."),
    label_column: str | None = Form(None, description="Column holding this model's labels "
                                    "in validation data."),
):
    require_space(registry.settings.home, registry.settings.min_free_mb)
    with tempfile.TemporaryDirectory(prefix="optiserve-upload-") as tmp:
        suffix = Path(file.filename or "").suffix.lower()
        path = Path(tmp) / f"upload{suffix if suffix in EXT_FORMAT else ''}"
        with open(path, "wb") as out:
            while chunk := file.file.read(_CHUNK):
                out.write(chunk)
        fmt = sniff(path)
        if fmt == "pkl":
            raise UnsupportedUpload(
                "Pickled models are refused over the network: loading a pickle runs any code "
                "it contains.", hint="Save a scikit-learn model with skops "
                "(skops.io.dump(model, 'model.skops')) or convert it to ONNX, and upload that; "
                "a pickle can be registered from a local path with `optiserve register`.")
        if fmt == "pt2":
            raise UnsupportedUpload(
                "torch.export archives are refused over the network: torch loads the pickles "
                "they may hold (weights, constants, sample inputs) without restriction, which "
                "runs any code they contain.", hint="Export to ONNX (torch.onnx.export) or "
                "TorchScript (torch.jit.trace) and upload that; a .pt2 can be registered from "
                "a local path with `optiserve register`.")
        if fmt in ("xgboost", "xgboost_ubj", "lightgbm"):
            raise UnsupportedUpload(
                "Native XGBoost/LightGBM files are refused over the network: their tree arrays "
                "are followed without bounds checks when they predict, so a crafted file can "
                "crash the server (the reason skops tree files are refused too).",
                hint="Convert to ONNX (optiserve register + optimize locally, or onnxmltools) "
                "and upload that; a native file can be registered from a local path with "
                "`optiserve register`.")
        if fmt == "savedmodel":
            raise UnsupportedUpload(
                "TensorFlow SavedModels are refused over the network: a SavedModel is a "
                "program whose graph may read or write files on the server when it runs.",
                hint="Upload the Keras model as a .keras file (loaded in Keras' safe mode) or "
                "convert it to ONNX; a SavedModel can be registered from a local path with "
                "`optiserve register`.")
        if path.suffix == "":
            path = path.rename(path.with_suffix(EXTENSIONS[fmt]))
        v = api.register(name, path, registry=registry, inputs=inputs or None,
                         label_column=label_column)
    return version_json(v)


@router.get("/models", tags=["models"], dependencies=[Depends(scope("read"))])
def list_models(registry: Reg):
    return {"models": [{
        "name": m.name, "created_at": m.created_at.isoformat() if m.created_at else None,
        "versions": len(m.versions),
        "latest": version_json(m.latest) if m.latest else None} for m in registry.models()]}


@router.get("/models/{model_id}", tags=["models"], dependencies=[Depends(scope("read"))],
            summary="A model with every version: signature, lineage, metrics")
def get_model(model_id: str, registry: Reg):
    versions = registry.versions(model_id)
    latest = [v for v in versions if v.status == "ready"]
    return {"name": model_id, "versions": [version_json(v) for v in versions],
            "latest": latest[-1].version if latest else None}


@router.delete("/models/{model_id}", tags=["models"],
               dependencies=[Depends(scope("models:write"))],
               summary="Delete a model and its artifacts (refused while a job uses it)")
def delete_model(model_id: str, registry: Reg):
    return {"deleted": model_id, "versions": registry.delete_model(model_id)}


@router.get("/artifacts/{artifact_id}", tags=["models"], dependencies=[Depends(scope("read"))],
            summary="Download an artifact (sha256 and size in the headers)")
def download_artifact(artifact_id: str, registry: Reg):
    v = registry.artifact(artifact_id)
    return FileResponse(
        registry.path(v), media_type="application/octet-stream",
        filename=f"{v.artifact_id}{EXTENSIONS.get(v.format, '')}",
        headers={"X-Checksum-SHA256": v.sha256, "X-Artifact-Size": str(v.size_bytes),
                 "X-Artifact-Format": v.format, "X-Version-Status": v.status,
                 "ETag": f'"{v.sha256}"'})


# -- optimizations --------------------------------------------------------------------------
def _checked(request: OptimizeRequest, registry: Registry) -> OptimizeRequest:
    """Everything wrong with a request is a 4xx now, not a failed job later. File data must
    lie in the data folder; the model reference is pinned to the version seen now."""
    root = registry.settings.data_folder
    configs = confine_files(request.pass_configs, root)  # file-valued pass options
    request = request.model_copy(update={
        "validation_dataset": confine(request.validation_dataset, root),
        "calibration_dataset": confine(request.calibration_dataset, root),
        "training_dataset": confine(request.training_dataset, root), "pass_configs": configs})
    return api.prepare_optimize(request, registry=registry)


@router.post("/inference/optimize", tags=["optimizations"], status_code=202,
             dependencies=[Depends(scope("optimize"))],
             responses={200: {"model": OptimizeResponse,
                              "description": "With ?wait=true: the finished report"},
                        202: {"model": Queued}},
             summary="Optimize a model: the seed's request; queued unless ?wait=true")
async def optimize(body: OptimizeRequest, request: Request, registry: Reg,
                   wait: bool = Query(False, description="Answer the finished report.")):
    body = await run_in_threadpool(_checked, body, registry)
    runner = request.app.state.runner
    if runner is None:
        return error_response(503, "This server runs no optimization jobs.")
    run_id = await run_in_threadpool(runner.submit, body, body.model_id.partition(":")[0])
    if not wait:
        return JSONResponse(status_code=202, content={
            "optimization_id": run_id, "status": "queued", "model_id": body.model_id,
            "links": {"self": f"/api/v1/inference/optimizations/{run_id}"}})
    while not await request.is_disconnected():  # a client that left stops the waiting, not the job
        run = await run_in_threadpool(registry.runs.get, run_id)
        if run["status"] in TERMINAL:
            return _finished(run)
        await asyncio.sleep(0.25)
    return JSONResponse(status_code=202, content={"optimization_id": run_id, "status": "queued"})


def _finished(run: dict[str, Any]) -> JSONResponse:
    """The seed's response for a finished job, or the error that ended it."""
    report = {k: v for k, v in (run["report"] or {}).items() if k != "details"}
    if run["status"] in ("completed", "timeout") and report:
        return JSONResponse(report)
    if run["status"] == "rejected":
        return error_response(http_status(GateFailedError),
                              run["error"] or "No candidate passed the accuracy gate.",
                              report=report or None, optimization_id=run["id"])
    # Crashes, bugs and lost workers are recorded with their status (500, 503); a run without
    # one ended on a user's error in a process without the server's table (the Python API).
    return error_response(run["error_status"] or 400, run["error"] or run["status"],
                          optimization_id=run["id"], status=run["status"])


@router.get("/inference/optimizations", tags=["optimizations"],
            dependencies=[Depends(scope("read", "optimize"))])
def list_optimizations(registry: Reg, model: str | None = None, status: str | None = None,
                       limit: int = Query(50, ge=1, le=500)):
    return {"optimizations": [job_json(r) for r in registry.runs.list(
        model=model, status=status, limit=limit)]}


@router.get("/inference/optimizations/{optimization_id}", tags=["optimizations"],
            dependencies=[Depends(scope("read", "optimize"))],
            summary="A job: status, progress, candidates tried, the report")
def get_optimization(optimization_id: str, registry: Reg):
    return job_json(registry.runs.get(optimization_id))


@router.get("/inference/optimizations/{optimization_id}/pareto.png", tags=["optimizations"],
            dependencies=[Depends(scope("read", "optimize"))], response_class=FileResponse,
            summary="The run's Pareto chart: latency vs metric vs size, per batch size")
def get_pareto(optimization_id: str, registry: Reg):
    run = registry.runs.get(optimization_id)
    path = ((run["report"] or {}).get("details") or {}).get("pareto_png")
    if not path or not Path(path).is_file():
        return error_response(404, f"Run {optimization_id} has no Pareto chart ({run['status']}).",
                              hint="It is drawn when a run ends with candidates measured, "
                              "and needs matplotlib (pip install 'optiserve[plots]').")
    return FileResponse(path, media_type="image/png")


@router.delete("/inference/optimizations/{optimization_id}", tags=["optimizations"],
               dependencies=[Depends(scope("optimize"))], summary="Cancel a job")
async def cancel_optimization(optimization_id: str, registry: Reg):
    run = await run_in_threadpool(registry.runs.request_cancel, optimization_id)
    for _ in range(40):  # its owner notices within a poll; answer the outcome if it is quick
        if run["status"] in TERMINAL:
            return job_json(run)
        await asyncio.sleep(0.25)
        run = await run_in_threadpool(registry.runs.get, optimization_id)
    return JSONResponse(job_json(run), status_code=202)


# -- benchmarks -----------------------------------------------------------------------------
_BENCH_LOCK = threading.Lock()  # one at a time: two would time each other's load


@router.post("/inference/benchmark", tags=["benchmarks"],
             dependencies=[Depends(scope("optimize"))],
             summary="Latency p50/p95/p99 of a version in its own runtime (the seed's shape)")
def benchmark(body: BenchmarkRequest, registry: Reg):
    dataset = confine(body.dataset, registry.settings.data_folder)
    if not _BENCH_LOCK.acquire(blocking=False):
        raise ConflictError("Another benchmark is running on this server; two at once would "
                            "time each other's load.", hint="Retry when it has finished.")
    try:
        return api.benchmark(body.model_id, batch_sizes=body.batch_sizes,
                             iterations=body.iterations, warmup=body.warmup_iterations,
                             registry=registry, dataset=dataset, max_seconds=body.max_seconds)
    finally:
        _BENCH_LOCK.release()
