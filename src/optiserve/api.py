"""The Python API. The CLI and the REST API are thin faces over these functions."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from optiserve.bench.isolated import benchmark_isolated
from optiserve.bench.latency import seed_json
from optiserve.convert.detect import import_file, import_object
from optiserve.convert.formats import EXTENSIONS
from optiserve.core.errors import ConfigError
from optiserve.data.sources import DatasetSpec, load
from optiserve.exporters.export import ExportResult, export_version
from optiserve.optimizer.pipeline import Progress
from optiserve.optimizer.pipeline import optimize as _optimize
from optiserve.optimizer.report import OptimizationResult
from optiserve.optimizer.request import OptimizeRequest
from optiserve.registry.registry import Registry, VersionInfo
from optiserve.registry.tables import check_model_name
from optiserve.runtimes.base import runtime_for


def register(name: str, model: Any, *, registry: Registry | None = None,
             example_inputs: Any = None, inputs: list[str] | None = None,
             label_column: str | None = None) -> VersionInfo:
    """Register a model file (path) or object (estimator, nn.Module, ...) as a new version.

    `example_inputs` is needed for an nn.Module (it is traced); `inputs` ('name:dtype[dims]')
    for a TorchScript file, which does not record its input shapes. `label_column` names the
    column that holds the labels in this model's data: validation data that has it is scored
    on accuracy even when the request names no label column (the seed's request names none).
    """
    registry = registry or Registry()
    check_model_name(name)
    with tempfile.TemporaryDirectory(prefix="optiserve-register-") as tmp:
        if isinstance(model, (str, Path)):
            imported = import_file(model, input_specs=inputs)
        else:
            imported = import_object(model, Path(tmp), example_inputs=example_inputs)
        meta = {**imported.meta, **({"label_column": label_column} if label_column else {})}
        return registry.add_version(name, imported.path, framework=imported.framework,
                                    format=imported.format, signature=imported.signature,
                                    meta=meta, suffix=EXTENSIONS[imported.format])


def export(model: Any, format: str, *, name: str | None = None,
           options: dict[str, Any] | None = None, data: DatasetSpec | dict | None = None,
           calibration: DatasetSpec | dict | None = None,
           tolerance: dict[str, float] | None = None, output: str | Path | None = None, batch_sizes: tuple[int, ...] = (1, 32),
           iterations: int = 200, example_inputs: Any = None,
           registry: Registry | None = None, progress=None,
           label_column: str | None = None) -> ExportResult:
    """Export a model to a deployment format (torchscript, tflite, ort, openvino).

    `model` is a registered reference ('name' or 'name:N') or an in-memory model, which is
    registered first under `name` (an nn.Module needs `example_inputs`; TorchScript export can
    then script it with options={'mode': 'script'}). The export is verified against its source
    on `data` (else synthetic rows) within the format's tolerance (or `tolerance`: atol, rtol,
    min_cosine, min_label_agreement), timed, and registered as the next version with the source
    as its parent. Formats that quantize calibrate on `calibration` (default: `data`);
    `output` also writes the files to a folder. `label_column` names the labels array (or
    column) in `data`, which the check sets aside.
    """
    registry = registry or Registry()
    obj = None
    if isinstance(model, str):
        ref = model
    else:
        if not name:
            raise ConfigError("Exporting an in-memory model needs name=: it is registered "
                              "first, and the export becomes its next version.")
        obj = None if isinstance(model, (str, Path)) else model
        ref = register(name, model, registry=registry, example_inputs=example_inputs).ref
    return export_version(registry, ref, format, options=options, data=_spec(data),
                          calibration=_spec(calibration), tolerance=tolerance, output=output,
                          batch_sizes=tuple(batch_sizes), iterations=iterations, obj=obj,
                          progress=progress, label_column=label_column)


def _spec(data: DatasetSpec | dict | None) -> DatasetSpec | None:
    return data if data is None or isinstance(data, DatasetSpec) else DatasetSpec(**data)


def parse_request(body: dict[str, Any] | OptimizeRequest) -> OptimizeRequest:
    """Validate an optimize request; pydantic errors become one readable ConfigError."""
    if isinstance(body, OptimizeRequest):
        return body
    try:
        return OptimizeRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        raise ConfigError(f"Request field '{where}' is invalid: {err.get('msg')}.",
                          hint="See `optiserve optimize --help` for the fields.") from None


def optimize(model_id: str | None = None, *, registry: Registry | None = None,
             progress: Progress | None = None, request: dict | OptimizeRequest | None = None,
             training_data: Any = None, **fields: Any) -> OptimizationResult:
    """Optimize a registered model. Takes the seed's request fields as keywords
    (optimizations, quantization_config, validation_dataset, accuracy_threshold, ...).
    `training_data` gives the training passes (qat, pruning, distillation, ...) their rows as
    a torch DataLoader or any iterable of batches: (inputs..., labels) tuples or dicts keyed
    by input name (see optiserve.data.batches), instead of training_dataset. A distillation
    student may be an nn.Module: pass_configs={"distillation": {"student": module}}."""
    body = request if request is not None else {"model_id": model_id, **fields}
    registry = registry or Registry()
    with tempfile.TemporaryDirectory(prefix="optiserve-student-") as tmp:
        if isinstance(body, dict):
            body = _student_as_file(body, registry, Path(tmp))
        return _optimize(registry, parse_request(body), progress, training=training_data)


def prepare_optimize(request: dict[str, Any] | OptimizeRequest, *,
                     registry: Registry | None = None) -> OptimizeRequest:
    """Check an optimize request before any work is queued (pass names and options, the
    model, the data and its fit to the model) and pin its model to the version seen now, so a
    job run later optimizes what was checked."""
    from optiserve.optimizer.pipeline import Optimizer

    request = parse_request(request)
    version, _, _ = Optimizer(registry or Registry(), request).prepare()
    return request.model_copy(update={"model_id": version.ref})


def deploy(name: str, settings: dict[str, Any] | None = None, *, replace: bool = False,
           registry: Registry | None = None) -> list[dict[str, Any]]:
    """Create or change the deployment `name` (settings as in PUT /api/v1/deployments/NAME:
    model, versions, max_batch_size, instances, predict, ...). Its versions are loaded and
    warmed up in this process as a check, and it is stored only when that worked; servers
    load it when they start or on POST /v2/repository/models/NAME/load. `replace` starts
    from the defaults instead of the current settings. One dict per loaded version: version,
    max_batch_size, runtime, instances, threads."""
    import asyncio

    from optiserve.server.dataplane import DataPlane

    async def run() -> list[dict[str, Any]]:
        plane = DataPlane(registry or Registry())
        try:
            return [{"version": s.version, "max_batch_size": s.max_batch_size,
                     "runtime": s.runtimes[0].name, "instances": len(s.runtimes),
                     "threads": s.runtimes[0].threads}
                    for s in await plane.deploy(name, settings or {}, replace=replace)]
        finally:
            await plane.close()

    return asyncio.run(run())


def _student_as_file(body: dict[str, Any], registry: Registry, folder: Path) -> dict[str, Any]:
    """pass_configs.distillation.student may be an nn.Module in Python: it is written as a
    torch.export program (traced on inputs built from the teacher's signature) for the pass."""
    options = (body.get("pass_configs") or {}).get("distillation") or {}
    student = options.get("student")
    if student is None or isinstance(student, (str, Path)):
        return body
    from optiserve.passes.distillation import save_student

    teacher = registry.resolve(body["model_id"])
    import torch

    args = tuple(torch.from_numpy(a) for a in teacher.signature.example_inputs().values())
    path = save_student(student, args, folder / "student.pt2")
    configs = {**body["pass_configs"], "distillation": {**options, "student": str(path)}}
    return {**body, "pass_configs": configs}


def benchmark(model_id: str, *, batch_sizes: list[int] = (1, 16, 32, 64),
              iterations: int = 1000, warmup: int = 100, registry: Registry | None = None,
              dataset: DatasetSpec | dict | None = None, max_seconds: float | None = None,
              progress=None) -> dict[str, Any]:
    """Latency of a registered version in its own runtime, in the seed's benchmark shape.
    Timed in a fresh process, like the optimizer's candidates, so nothing loaded in the
    caller (torch's spinning OpenMP workers, a server's threads) disturbs the numbers."""
    registry = registry or Registry()
    if any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise ConfigError(f"Batch sizes {list(batch_sizes)} must be positive integers.")
    if iterations < 1 or warmup < 0:
        raise ConfigError(f"iterations={iterations}, warmup={warmup}: need at least 1 timed "
                          "call and no negative warmup.")
    version = registry.resolve(model_id)
    if dataset is not None:
        spec = dataset if isinstance(dataset, DatasetSpec) else DatasetSpec(**dataset)
        take = load(spec, version.signature, registry.settings,
                    feature_names=version.meta.get("feature_names")).take
    else:
        take = lambda bs: version.signature.example_inputs(bs)  # noqa: E731
    outputs = ["label"] if any(o.name == "label" for o in version.signature.outputs) else None
    results: dict = {}
    for bs in batch_sizes:  # one size per child, so the progress bar moves
        timed, _ = benchmark_isolated(
            registry.path(version), version.signature, format=version.format,
            threads=registry.settings.threads, inputs={bs: take(bs)}, warmup=warmup,
            iterations=iterations, max_seconds=max_seconds, outputs=outputs)
        results.update(timed)
        if progress:
            progress(bs)
    return {"model_id": version.model, "version": version.version, "format": version.format,
            "runtime": runtime_for(version.format), "threads": registry.settings.threads,
            **seed_json(results, iterations=iterations, warmup=warmup)}
