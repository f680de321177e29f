"""What the CLI asks of optiserve, from this machine's registry or from a running server.

`connect(server, key)` gives a `Local` client (the registry under OPTISERVE_HOME, models loaded
in this process for `infer`) or a `Remote` one (the server's REST API: /api/v1 and the Open
Inference Protocol's /v2, with an API key). Both answer the same JSON shapes, the server's, so
the CLI renders one form. Every failure is an `OptiserveError` with one readable message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.core.errors import OptiserveError

TERMINAL = ("completed", "failed", "rejected", "cancelled", "timeout")
DEFAULT_SERVER = "http://127.0.0.1:8000"


class RemoteError(OptiserveError):
    """The server answered with an error (its own message), or could not be reached;
    `http_status` is what it answered (503 when unreachable)."""

    def __init__(self, message: str, *, hint: str | None = None, http_status: int = 400):
        super().__init__(message, hint=hint)
        self.http_status = http_status


def connect(server: str | None = None, key: str | None = None, *, registry=None):
    """A `Remote` client for `server` (a base URL), else a `Local` one."""
    return Remote(server, key) if server else Local(registry)


def split_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name:version' -> (name, version or None)."""
    name, _, version = ref.partition(":")
    if not name or (version and not version.isdigit()):
        raise OptiserveError(f"{ref!r} is not MODEL or MODEL:VERSION (e.g. churn or churn:2).")
    return name, version or None


# -- the local registry ---------------------------------------------------------------------
class Local:
    """This machine's registry (OPTISERVE_HOME / OPTISERVE_DATABASE_URL)."""

    def __init__(self, registry=None):
        if registry is None:
            from optiserve.registry import Registry

            registry = Registry()
        self.registry = registry

    def where(self) -> str:
        return self.registry.settings.describe_registry()

    def models(self) -> list[dict]:
        from optiserve.server.http.management import version_json

        return [{"name": m.name, "versions": len(m.versions),
                 "latest": version_json(m.latest) if m.latest else None}
                for m in self.registry.models()]

    def model(self, name: str) -> dict:
        from optiserve.server.http.management import get_model

        return get_model(name, self.registry)  # the route's own body: the same JSON

    def delete_model(self, name: str) -> dict:
        from optiserve.server.http.management import delete_model

        return delete_model(name, self.registry)

    def runs(self, *, model: str | None = None, status: str | None = None,
             limit: int = 50) -> list[dict]:
        from optiserve.server.http.management import job_json

        return [job_json(r) for r in self.registry.runs.list(model=model, status=status,
                                                             limit=limit)]

    def run(self, run_id: str) -> dict:
        from optiserve.server.http.management import job_json

        return job_json(self.registry.runs.get(run_id))

    def cancel(self, run_id: str) -> dict:
        from optiserve.server.http.management import job_json

        return job_json(self.registry.runs.request_cancel(run_id))

    def infer(self, ref: str, data: Any, outputs: list[str] | None = None) -> dict:
        """Load the deployment `ref` names (or, when none is stored, the registered model of
        that name with the default settings) in this process, run `data` through it, unload.
        Returns {"model_name", "model_version", "outputs": {name: array}}."""
        import asyncio

        from optiserve.registry.deployments import Deployment, DeploymentNotFound, parse_spec
        from optiserve.server.dataplane import DataPlane, InferRequest, Payload
        from optiserve.server.tensors import datatype

        name, version = split_ref(ref)

        def decode(served) -> Payload:
            arrays = bind(data, served.metadata()["inputs"])
            return Payload({n: (a, datatype(a.dtype)) for n, a in arrays.items()}, outputs)

        async def run():
            plane = DataPlane(self.registry)
            try:
                try:
                    deployment = self.registry.deployments.get(name)
                except DeploymentNotFound:
                    self.registry.versions(name)  # ModelNotFound names the known ones
                    deployment = Deployment(name, parse_spec({"model": name}), None, None)
                await plane.load(deployment, stored=False)
                response = await plane.infer(InferRequest(name, decode, version, "python",
                                                          split=True))
                return {"model_name": name, "model_version": response.version,
                        "outputs": {k: np.asarray(v) for k, v in response.outputs.items()}}
            finally:
                await plane.close()

        return asyncio.run(run())


# -- a server ---------------------------------------------------------------------------------
class Remote:
    """A running optiserve server, through its REST API."""

    def __init__(self, server: str, key: str | None = None, *, timeout: float = 60):
        import httpx

        if "://" not in server:
            server = f"http://{server}"
        self.url = server.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._key = bool(key)

    def where(self) -> str:
        return f"server {self.url}"

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RemoteError(f"Cannot reach the server at {self.url} ({type(exc).__name__}: "
                              f"{exc}).", hint="Is `optiserve serve` running there? Check "
                              "--server / OPTISERVE_SERVER_URL.", http_status=503) from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            message = message or f"HTTP {r.status_code} {r.reason_phrase}"
            hint = None
            if r.status_code == 401 and not self._key:
                hint = ("Give an API key with --key or OPTISERVE_API_KEY (created with: "
                        "optiserve keys create NAME --scope ...).")
            raise RemoteError(f"{self.url}: {message}", hint=hint,
                              http_status=r.status_code)
        if body is None:
            raise RemoteError(f"{self.url}{path} answered {r.status_code} without JSON; is it "
                              "an optiserve server?")
        return body

    def models(self) -> list[dict]:
        return self._call("GET", "/api/v1/models")["models"]

    def model(self, name: str) -> dict:
        return self._call("GET", f"/api/v1/models/{_quote(name)}")

    def delete_model(self, name: str) -> dict:
        return self._call("DELETE", f"/api/v1/models/{_quote(name)}")

    def runs(self, *, model: str | None = None, status: str | None = None,
             limit: int = 50) -> list[dict]:
        params = {k: v for k, v in {"model": model, "status": status, "limit": limit}.items()
                  if v is not None}
        return self._call("GET", "/api/v1/inference/optimizations",
                          params=params)["optimizations"]

    def run(self, run_id: str) -> dict:
        return self._call("GET", f"/api/v1/inference/optimizations/{_quote(run_id)}")

    def cancel(self, run_id: str) -> dict:
        return self._call("DELETE", f"/api/v1/inference/optimizations/{_quote(run_id)}")

    def load(self, name: str) -> dict:
        """POST /v2/repository/models/NAME/load: the stored deployment (or the registered
        model of that name, with default settings) loaded in the server."""
        return self._call("POST", f"/v2/repository/models/{_quote(name)}/load", json={})

    def infer(self, ref: str, data: Any, outputs: list[str] | None = None) -> dict:
        from optiserve.server.tensors import DTYPES, datatype

        name, version = split_ref(ref)
        base = f"/v2/models/{_quote(name)}" + (f"/versions/{version}" if version else "")
        meta = self._call("GET", base)
        arrays = bind(data, meta["inputs"])
        body: dict[str, Any] = {"inputs": [
            {"name": n, "shape": list(a.shape), "datatype": datatype(a.dtype),
             "data": _json_values(a)} for n, a in arrays.items()]}
        if outputs:
            body["outputs"] = [{"name": o} for o in outputs]
        answer = self._call("POST", f"{base}/infer", json=body)
        result = {}
        for o in answer.get("outputs", []):
            dtype = DTYPES.get(o["datatype"], np.dtype(object))
            values = np.asarray(o["data"], dtype=dtype if dtype.kind != "O" else object)
            result[o["name"]] = values.reshape(o["shape"])
        return {"model_name": answer.get("model_name", name),
                "model_version": answer.get("model_version"), "outputs": result}


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def _json_values(a: np.ndarray) -> list:
    if a.dtype.kind == "O":
        return [x.decode() if isinstance(x, bytes) else str(x) for x in a.reshape(-1)]
    return a.reshape(-1).tolist()


def wait(client, run_id: str, on_update=None, poll_s: float = 1.0,
         timeout_s: float | None = None) -> dict:
    """Poll a run until it ends (or `timeout_s` passes); `on_update(job)` after each poll."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = client.run(run_id)
        if on_update:
            on_update(job)
        if job["status"] in TERMINAL or (deadline and time.monotonic() > deadline):
            return job
        time.sleep(poll_s)


# -- rows -> the model's input tensors ---------------------------------------------------------
def read_data(source: str) -> Any:
    """An .npz or .json file, '-' (JSON on stdin), or inline JSON."""
    text = source.strip()
    if text == "-":
        import sys

        return _parse_json(sys.stdin.read(), "stdin")
    if text[:1] in "[{":
        return _parse_json(text, "the inline JSON")
    path = Path(source)
    if not path.is_file():
        raise OptiserveError(f"{source!r} is no file here, nor inline JSON.",
                             hint="Give an .npz or .json file, '-' for JSON on stdin, or JSON "
                             "such as '[[0.1, 0.2, ...]]' or '{\"input\": [[...]]}'.")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise OptiserveError(f"Cannot read {path} as an .npz file ({exc}).") from None
    if path.suffix.lower() == ".json":
        return _parse_json(path.read_text(encoding="utf-8"), str(path))
    raise OptiserveError(f"{path} is neither .npz nor .json.",
                         hint="Save rows with numpy.savez(path, input=rows), or as JSON.")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptiserveError(f"{where} is not valid JSON ({exc}).") from None


def bind(data: Any, inputs: list[dict]) -> dict[str, np.ndarray]:
    """`data` as one array per model input, of its datatype. `inputs` is V2 model metadata
    (name, datatype, shape). Accepted: {input: rows} (JSON or .npz; other arrays, such as
    labels, are left out), a V2 request {"inputs": [{name, shape, datatype, data}]}, rows for a
    one-input model (a single row may leave out the batch dimension), or records
    [{input: value}, ...]."""
    names = [i["name"] for i in inputs]
    by_name = {i["name"]: i for i in inputs}
    if isinstance(data, dict) and isinstance(data.get("inputs"), list):
        try:
            data = {t["name"]: np.reshape(np.asarray(t["data"], dtype=object), t["shape"])
                    if "shape" in t else t["data"] for t in data["inputs"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise OptiserveError(f"The request's inputs are not [{{name, shape, datatype, "
                                 f"data}}] ({type(exc).__name__}: {exc}).") from None
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        data = {n: [r.get(n) for r in data] for n in {k for r in data for k in r}}
    if isinstance(data, dict):
        given = {k: v for k, v in data.items() if k in by_name}
        if not given and len(names) == 1 and len(data) == 1:
            given = {names[0]: next(iter(data.values()))}
        missing = [n for n in names if n not in given]
        if missing:
            raise OptiserveError(f"The data has no input '{missing[0]}'.",
                                 hint=f"The model's inputs: {', '.join(names)}; the data's "
                                 f"keys: {', '.join(map(str, data)) or 'none'}.")
    elif isinstance(data, list):
        if len(names) != 1:
            raise OptiserveError(f"The model has {len(names)} inputs ({', '.join(names)}); a "
                                 "list of rows fits a one-input model only.",
                                 hint="Give {\"INPUT\": rows, ...} instead.")
        given = {names[0]: data}
    else:
        raise OptiserveError("The data is neither rows, {input: rows}, nor a V2 request.")
    return {n: _tensor(n, given[n], by_name[n]) for n in names}


def _tensor(name: str, value: Any, spec: dict) -> np.ndarray:
    from optiserve.server.tensors import DTYPES, from_json

    dtype = DTYPES.get(spec["datatype"], np.dtype(object))
    shape = spec.get("shape") or []
    if isinstance(value, np.ndarray) and value.dtype.kind != "O":
        if dtype.kind == "O":
            array = np.array([str(x).encode() for x in value.reshape(-1)],
                             dtype=object).reshape(value.shape)
        else:
            try:
                array = value.astype(dtype, casting="same_kind")
            except TypeError:
                raise OptiserveError(f"Input '{name}' holds {value.dtype} values but the model "
                                     f"takes {spec['datatype']}.") from None
    else:
        values = value.tolist() if isinstance(value, np.ndarray) else value
        try:
            probe = np.asarray(values, dtype=object)
        except ValueError as exc:  # ragged rows
            raise OptiserveError(f"Input '{name}' is not a rectangular array ({exc}).") from None
        array = from_json(name, list(probe.shape), spec["datatype"], values)
    if shape and array.ndim == len(shape) - 1 and shape[0] == -1:
        array = array[None]  # one row without its batch dimension
    return array
