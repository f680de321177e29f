"""Deployments under /api/v1/deployments: what this server (and every server sharing the
registry, when it starts) serves, and how. PUT loads the deployment here first and stores it
only when it loaded, so a bad setting or a model that fails its warm-up changes nothing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from optiserve.registry.deployments import Deployment
from optiserve.server.auth import scope

router = APIRouter(prefix="/api/v1", tags=["deployments"])

_EXAMPLE = {"model": "churn", "versions": {"latest": 1}, "max_batch_size": 64,
            "max_queue_delay_us": 0, "instances": 1}


def deployment_json(d: Deployment, plane) -> dict[str, Any]:
    loaded = plane.served().get(d.name) or {}
    state, reason = plane.state(d.name)
    return {"name": d.name, "spec": d.spec.model_dump(mode="json"),
            "loaded_versions": sorted(loaded, key=int), "state": state, "reason": reason,
            "created_at": d.created_at.isoformat() if d.created_at else None,
            "updated_at": d.updated_at.isoformat() if d.updated_at else None}


@router.get("/deployments", dependencies=[Depends(scope("read"))],
            summary="Deployments and what this server has loaded of each")
def list_deployments(request: Request):
    plane = request.app.state.plane
    return {"deployments": [deployment_json(d, plane)
                            for d in request.app.state.registry.deployments.list()]}


@router.get("/deployments/{name}", dependencies=[Depends(scope("read"))])
def get_deployment(name: str, request: Request):
    return deployment_json(request.app.state.registry.deployments.get(name),
                           request.app.state.plane)


@router.put("/deployments/{name}", dependencies=[Depends(scope("models:write"))],
            summary="Create or replace a deployment, load it, then store it")
async def put_deployment(name: str, request: Request,
                         body: dict = Body(default_factory=dict, examples=[_EXAMPLE])):
    """Body: DeploymentSpec fields; `model` defaults to the deployment's name, the rest to
    their defaults (latest version, max_batch_size 64, no queue delay, one instance)."""
    plane = request.app.state.plane
    await plane.deploy(name, body, replace=True)
    return deployment_json(request.app.state.registry.deployments.get(name), plane)


@router.delete("/deployments/{name}", dependencies=[Depends(scope("models:write"))])
async def delete_deployment(name: str, request: Request):
    await request.app.state.plane.undeploy(name)
    return {"deleted": name}
