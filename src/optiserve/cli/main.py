"""`optiserve` commands. Each parses options, calls the Python API, and renders the result.

A user's mistake ends with one readable line on stderr and a non-zero exit (2; 3 when no
candidate passed the gate), never a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from optiserve.cli import render
from optiserve.core.errors import ConfigError, GateFailedError, OptiserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make a trained model smaller, faster and served.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models and their versions.")
app.add_typer(models_app, name="models")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the server.")
app.add_typer(keys_app, name="keys")
runs_app = typer.Typer(no_args_is_help=True, help="Optimization runs (jobs): list, show, "
                       "watch, cancel.")
app.add_typer(runs_app, name="runs")
# Piped or logged output gets room for the candidate tables instead of 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True)


def _csv(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(p) for p in _csv(text)]
    except ValueError:
        raise OptiserveError(f"{what} {text!r} must be comma-separated integers, e.g. 1,16,32.")


@contextmanager
def progress_bar(title: str):
    """A bar whose total grows as the pipeline announces steps, with the current step shown."""
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(title, total=1)

        def update(message: str, done: float) -> None:
            t = bar.tasks[task]
            if done:
                bar.update(task, advance=done, description=message[:90])
            else:
                bar.update(task, total=max(t.total or 1, t.completed + 1),
                           description=message[:90])
        yield update


def _registry():
    from optiserve.registry import Registry

    return Registry()


def _version(value: bool) -> None:
    if value:
        import optiserve

        print(f"optiserve {optiserve.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Make a trained model smaller, faster and served."""


def _server_option():
    return typer.Option(None, "--server", envvar="OPTISERVE_SERVER_URL",
                        help="A running server's URL (e.g. http://host:8000): ask it instead of "
                        "the local registry.")


def _key_option():
    return typer.Option(None, "--key", envvar="OPTISERVE_API_KEY",
                        help="API key for --server (osk_...).")


def _client(server: str | None, key: str | None):
    from optiserve.client import connect

    return connect(server, key, registry=None if server else _registry())


@app.command()
def register(name: str = typer.Argument(..., help="Model name in the registry, e.g. churn."),
             file: Path = typer.Argument(..., help="The model: .pkl/.joblib/.skops "
                                         "(scikit-learn), .onnx, .pt (TorchScript) or .pt2 "
                                         "(torch.export), .keras or a SavedModel folder "
                                         "(or a zip of it; TensorFlow), an XGBoost "
                                         ".json/.ubj or LightGBM "
                                         ".txt file."),
             input: list[str] = typer.Option(None, "--input", help="TorchScript input spec "
                                             "NAME:DTYPE[DIMS], once per input."),
             label_column: Optional[str] = typer.Option(
                 None, help="Column holding this model's labels in validation data (used "
                 "when a request names none)."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Register a model file as a new, immutable version."""
    from optiserve.api import register as api_register

    v = api_register(name, file, registry=_registry(), inputs=input or None,
                     label_column=label_column)
    if as_json:
        console.print_json(json.dumps({"model": v.model, "version": v.version, "format": v.format,
                                       "artifact_id": v.artifact_id, "sha256": v.sha256,
                                       "size_bytes": v.size_bytes,
                                       "signature": v.signature.model_dump(mode="json")}))
        return
    console.print(f"registered [bold]{v.ref}[/] ({v.framework}, {v.format}, "
                  f"{v.size_mb:.3f} MB, sha256 {v.sha256[:12]})\n  {v.signature.describe()}")


@app.command()
def optimize(
    model: str = typer.Argument(..., help="MODEL or MODEL:VERSION."),
    opt: Optional[str] = typer.Option(
        None, "--opt", help="Passes, comma-separated, in order (default "
        "onnx_conversion,quantization); 'auto' tries every pass that can pay off here."),
    pass_config: list[str] = typer.Option(
        None, "--set", help="PASS.OPTION=VALUE (a JSON value, else text), any pass's option, "
        "e.g. quantization.method=static or graph_optimization.num_heads=12."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="YAML or JSON file holding the optimize request: the body of "
        "POST /api/v1/inference/optimize (options given here go over it)."),
    validation_sql: Optional[str] = typer.Option(None, help="SELECT returning validation rows."),
    validation_file: Optional[str] = typer.Option(None, help="CSV, Parquet or NPZ file."),
    data_source: Optional[str] = typer.Option(None, help="Named SQL data source."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the labels."),
    calibration_file: Optional[str] = typer.Option(
        None, help="Rows to calibrate static INT8 with (CSV, Parquet, NPZ); default: the "
        "validation rows."),
    training_file: Optional[str] = typer.Option(
        None, help="Labelled rows for the passes that train: pruning, lottery_ticket, "
        "structured_pruning, distillation, low_rank, qat (CSV, Parquet, NPZ)."),
    threshold: Optional[float] = typer.Option(None, help="Keep this fraction of the metric."),
    batch_sizes: Optional[str] = typer.Option(
        None, help="Batch sizes to benchmark (default 1); the first decides."),
    iterations: Optional[int] = typer.Option(
        None, help="Timed calls per candidate and batch size (default 200)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed calls first (default 20)."),
    as_json: bool = typer.Option(False, "--json", help="Print the seed's response JSON."),
    details: bool = typer.Option(False, "--details", help="With --json: every candidate too."),
):
    """Optimize a registered model: candidates -> gate -> benchmark -> the fastest that passes."""
    from optiserve.api import optimize as api_optimize
    from optiserve.data.sources import parse_spec

    body = _read_body(config) if config else {}
    body["model_id"] = model
    spec = parse_spec(sql=validation_sql, path=validation_file, label=label_column,
                      data_source=data_source)
    given = {"optimizations": _csv(opt) if opt else None, "accuracy_threshold": threshold,
             "validation_dataset": spec.model_dump() if spec else None,
             "calibration_dataset": _file_spec(calibration_file, None),
             "training_dataset": _file_spec(training_file, label_column),
             "batch_sizes": _ints(batch_sizes, "--batch-sizes") if batch_sizes else None,
             "iterations": iterations, "warmup": warmup}
    body.update({k: v for k, v in given.items() if v is not None})
    configs = body.setdefault("pass_configs", {})
    if not isinstance(configs, dict):
        raise OptiserveError("pass_configs must map pass names to their options.")
    for item in pass_config or []:
        if "." not in item.partition("=")[0]:
            raise OptiserveError(f"--set {item!r} is not PASS.OPTION=VALUE.",
                                 hint="E.g. --set quantization.method=static.")
    _apply_sets(configs, pass_config)
    registry = _registry()
    try:
        with progress_bar(f"optimizing {model}") as update:
            result = api_optimize(request=body, registry=registry, progress=update)
    except GateFailedError as exc:
        _show(exc.report, as_json, details)
        _error(exc)
        raise typer.Exit(3)
    _show(result, as_json, details)


def _file_spec(path: str | None, label: str | None) -> dict | None:
    from optiserve.data.sources import parse_spec

    spec = parse_spec(sql=None, path=path, label=label, data_source=None) if path else None
    return spec.model_dump() if spec else None


def _show(result, as_json: bool, details: bool) -> None:
    if as_json:
        print(json.dumps(result.details() if details else result.response, indent=2))
    else:
        render.report(console, result)


@app.command()
def benchmark(
    model: str = typer.Argument(..., help="MODEL or MODEL:VERSION."),
    batch_sizes: str = typer.Option("1,16,32,64", help="Comma-separated batch sizes."),
    iterations: int = typer.Option(1000, help="Timed calls per batch size."),
    warmup: int = typer.Option(100, help="Untimed calls first."),
    max_seconds: Optional[float] = typer.Option(None, help="Cap per batch size (runs shown)."),
    validation_file: Optional[str] = typer.Option(None, help="Inputs from this file "
                                                  "(default: synthetic from the signature)."),
    as_json: bool = typer.Option(False, "--json", help="Print the seed's benchmark JSON."),
):
    """Latency p50/p95/p99 and throughput of a version in its own runtime."""
    from optiserve.api import benchmark as api_benchmark

    sizes = _ints(batch_sizes, "--batch-sizes")
    dataset = {"source": "file", "path": validation_file} if validation_file else None
    with progress_bar(f"benchmarking {model}") as update:
        update(f"benchmarking {model}", 0)
        res = api_benchmark(model, batch_sizes=sizes, iterations=iterations, warmup=warmup,
                            registry=_registry(), dataset=dataset, max_seconds=max_seconds,
                            progress=lambda bs: update(f"batch {bs} done", 1))
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        render.benchmark(console, res)


@app.command()
def export(
    model: str = typer.Argument(..., help="MODEL or MODEL:VERSION."),
    format: str = typer.Option(..., "--format", "-f",
                               help="torchscript, tflite, ort (ONNX Runtime mobile) or "
                               "openvino (IR .xml/.bin)."),
    option: list[str] = typer.Option(None, "--option", "-O", help="OPTION=VALUE (JSON value) "
                                     "of the format, e.g. quantization=int8 (tflite)."),
    data: Optional[str] = typer.Option(None, help="Rows to verify on: CSV, Parquet or NPZ; "
                                       "default: synthetic rows."),
    calibration: Optional[str] = typer.Option(None, help="Rows to calibrate INT8 on "
                                              "(default: the --data rows)."),
    label_column: Optional[str] = typer.Option(None, help="Column (or NPZ array) of --data "
                                               "holding labels: set aside, not fed to the model."),
    tolerance: list[str] = typer.Option(None, "--tolerance", help="NAME=VALUE replacing the "
                                        "format's check: atol, rtol, min_cosine, "
                                        "min_label_agreement."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Also write the exported files to this folder."),
    batch_sizes: str = typer.Option("1,32", help="Batch sizes to time source and export at."),
    iterations: int = typer.Option(200, help="Timed calls per batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Export a version to a deployment format: verified against it, timed, registered."""
    from optiserve.api import export as api_export
    from optiserve.data.sources import parse_spec

    def spec(path):
        return parse_spec(sql=None, path=path, label=None, data_source=None) if path else None

    if label_column and not data:
        raise ConfigError("--label-column names an array of the check rows, and no --data "
                          "was given.", hint="Give the check rows with --data FILE, or leave "
                          "--label-column out.")
    with progress_bar(f"exporting {model} to {format}") as update:
        res = api_export(model, format, options=_assignments(option, "--option"),
                         data=spec(data), calibration=spec(calibration),
                         tolerance=_assignments(tolerance, "--tolerance"), output=output,
                         batch_sizes=tuple(_ints(batch_sizes, "--batch-sizes")),
                         iterations=iterations, registry=_registry(),
                         progress=lambda stage: update(stage, 0), label_column=label_column)
    if as_json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        render.export(console, res)


def _assignments(items: list[str] | None, flag: str) -> dict:
    """NAME=VALUE pairs, each value read as JSON when it is JSON."""
    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not (eq and key):
            raise OptiserveError(f"{flag} {item!r} is not NAME=VALUE.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """Every model with its latest ready version."""
    client = _client(server, key)
    rows = client.models()
    if as_json:
        print(json.dumps([{"model": m["name"], "versions": m["versions"],
                           "latest": m["latest"]["version"] if m["latest"] else None}
                          for m in rows]))
        return
    if not rows:
        err.print(Text(f"no models in {client.where()}"), soft_wrap=True)
        return
    render.models(console, rows)


@models_app.command("show")
def models_show(name: str = typer.Argument(..., help="Model name."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """All versions of a model, with lineage and signature."""
    model = _client(server, key).model(name)
    if as_json:
        print(json.dumps(model, indent=2, default=str))
    else:
        render.versions(console, name, model["versions"])


@models_app.command("delete")
def models_delete(name: str = typer.Argument(..., help="Model name."),
                  yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask first."),
                  server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """Delete a model, every version and the artifact files no other model shares (refused
    while it is deployed or an optimization uses it)."""
    client = _client(server, key)
    if not yes:
        count = len(client.model(name)["versions"])  # a missing model fails here, not after
        typer.confirm(f"Delete model '{name}' and its {count} version(s) from "
                      f"{client.where()}?", abort=True, err=True)
    out = client.delete_model(name)
    err.print(f"deleted model {out['deleted']} ({out['versions']} version(s))")


@app.command()
def config(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Print the effective settings (passwords hidden)."""
    from optiserve.core.settings import load_settings

    values = load_settings().redacted()
    if as_json:
        print(json.dumps(values, indent=2, default=str))
    else:
        render.settings(console, values)


@app.command()
def demo(skip_minilm: bool = typer.Option(False, help="Skip the transformer (faster)."),
         skip_cnn: bool = typer.Option(False, help="Skip the digits CNN."),
         examples: Optional[Path] = typer.Option(
             None, "--examples", help="Only write the files README.md's examples use "
             "(model.pkl, churn.onnx, digits_cnn.pt, train/calib/val/check.npz) into this "
             "folder, and stop.")):
    """The main job on the embedded defaults: churn (sklearn), MiniLM, digits CNN."""
    if examples is not None:
        from optiserve.demo.examples import write_examples

        with progress_bar("writing the README's example files") as update:
            paths = write_examples(examples, progress=update)
        console.print(f"wrote {', '.join(p.name for p in paths)} in {examples}")
        return
    from optiserve.cli.demo import run_demo

    run_demo(console, progress_bar, _registry(), minilm=not skip_minilm, cnn=not skip_cnn)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="HTTP port: management API, /v2, /metrics."),
          grpc_port: Optional[int] = typer.Option(
              None, help="gRPC port of the inference protocol (default OPTISERVE_GRPC_PORT, "
              "8001); 0 turns it off."),
          jobs: bool = typer.Option(True, help="Run optimization jobs in this server too."),
          access_log: bool = typer.Option(False, help="Log every request (the /metrics "
                                          "counters cover it; the log costs throughput)."),
          log_level: str = typer.Option("info", help="uvicorn log level."),
          tls_cert: Optional[Path] = typer.Option(
              None, help="PEM certificate: REST and gRPC speak TLS (OPTISERVE_TLS_CERT)."),
          tls_key: Optional[Path] = typer.Option(
              None, help="PEM private key of --tls-cert (OPTISERVE_TLS_KEY)."),
          tls_client_ca: Optional[Path] = typer.Option(
              None, help="PEM CA bundle: clients must present a certificate it signed "
              "(mutual TLS; OPTISERVE_TLS_CLIENT_CA)."),
          insecure: bool = typer.Option(
              False, help="Take API keys over plain HTTP on a non-loopback --host (a proxy in "
              "front terminates TLS; OPTISERVE_INSECURE).")):
    """Run the server: inference (Open Inference Protocol over REST and gRPC) for every
    deployment, the management REST API (OpenAPI at /docs), metrics, optimization jobs."""
    import uvicorn

    from optiserve.core.settings import load_settings
    from optiserve.server import tls
    from optiserve.server.app import create_app

    given = {"grpc_port": grpc_port, "tls_cert": tls_cert, "tls_key": tls_key,
             "tls_client_ca": tls_client_ca, "insecure": insecure or None}
    settings = load_settings(**{k: v for k, v in given.items() if v is not None})
    _log_to_terminal(log_level)
    if settings.auth == "off":
        loopback = host in ("127.0.0.1", "localhost", "::1")
        style = "bold red" if not loopback else "yellow"
        err.print(f"[{style}]WARNING: OPTISERVE_AUTH=off: no API key is checked"
                  + ("" if loopback else f" and the server listens on {host}, so anyone who "
                     "can reach it can upload models and run jobs") + ".[/]")
    uvicorn.run(create_app(settings, jobs=jobs, host=host, port=port), host=host, port=port,
                log_level=log_level, access_log=access_log, http="httptools", loop="uvloop",
                **tls.uvicorn_options(settings))


def _log_to_terminal(level: str) -> None:
    """optiserve's log records (deployments loaded, "ready", jobs) on stderr, formatted like
    uvicorn's own lines; the library only logs."""
    import logging

    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger = logging.getLogger("optiserve")
    logger.addHandler(handler)
    level = level.upper()
    logger.setLevel(level if level in ("CRITICAL", "ERROR", "WARNING", "DEBUG") else "INFO")
    logger.propagate = False


@app.command()
def deploy(name: str = typer.Argument(..., help="Name to serve under (default model: the "
                                      "registered model of this name)."),
           model: Optional[str] = typer.Option(None, help="Registered model to serve."),
           versions: Optional[str] = typer.Option(
               None, help="latest:N (the newest N ready versions; default latest:1) or a list "
               "of version numbers, e.g. 2,3."),
           max_batch_size: Optional[int] = typer.Option(
               None, help="Most rows per batch; 0 = no batching (default 64)."),
           max_queue_delay_us: Optional[int] = typer.Option(
               None, help="Longest an incomplete batch waits for more requests; 0 = never "
               "waits (default)."),
           preferred_batch_size: Optional[str] = typer.Option(
               None, help="Comma-separated batch sizes to cut at, e.g. 16,32."),
           max_queue_size: Optional[int] = typer.Option(
               None, help="Requests that may wait per version; beyond it: 429 (default 1024)."),
           timeout_ms: Optional[int] = typer.Option(
               None, help="Longest a request may wait in the queue; 0 = no limit (default "
               "30000)."),
           instances: Optional[int] = typer.Option(
               None, help="Sessions per version, run in threads (default 1)."),
           threads: Optional[int] = typer.Option(
               None, help="Intra-op threads per instance (default: cores / instances)."),
           allow_nan: Optional[bool] = typer.Option(
               None, "--allow-nan/--no-allow-nan", help="Let NaN/inf inputs through."),
           config: Optional[Path] = typer.Option(
               None, "--config", help="YAML or JSON file holding the deployment settings: the "
               "body of PUT /api/v1/deployments/NAME (the options above and `predict`)."),
           sets: list[str] = typer.Option(
               None, "--set", help="KEY=VALUE (a JSON value, else text) over the settings; "
               "dotted keys reach inside, e.g. predict.top_k=5 or predict.image.resize=224."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Deploy a registered model: loaded and warmed up here as a check, then stored; servers
    load it when they start or on POST /v2/repository/models/NAME/load. Settings not given
    take their defaults (an existing deployment's are replaced)."""
    from optiserve.api import deploy as deploy_model

    settings = _read_body(config) if config else {}
    if versions is not None:
        settings["versions"] = (
            {"latest": _ints(versions.removeprefix("latest:"), "--versions latest:")[0]}
            if versions.startswith("latest:") else {"specific": _ints(versions, "--versions")})
    if preferred_batch_size is not None:
        settings["preferred_batch_sizes"] = _ints(preferred_batch_size,
                                                  "--preferred-batch-size")
    given = {"model": model, "max_batch_size": max_batch_size,
             "max_queue_delay_us": max_queue_delay_us, "max_queue_size": max_queue_size,
             "timeout_ms": timeout_ms, "instances": instances, "threads": threads,
             "allow_nan": allow_nan}
    settings.update({k: v for k, v in given.items() if v is not None})
    _apply_sets(settings, sets)
    settings.setdefault("model", name)
    registry = _registry()
    loaded = deploy_model(name, settings, replace=True, registry=registry)
    spec = registry.deployments.get(name).spec
    if as_json:
        print(json.dumps({"name": name, "spec": spec.model_dump(mode="json"),
                          "versions": [v["version"] for v in loaded]}, indent=2))
        return
    for v in loaded:
        err.print(f"[green]deployed[/] {name} <- {spec.model}:{v['version']} ({v['runtime']}, "
                  f"{v['instances']} x {v['threads']} threads, max batch "
                  f"{v['max_batch_size']})")


def _read_body(path: Path) -> dict:
    """A request body from a YAML or JSON file (JSON is YAML too)."""
    import yaml

    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptiserveError(f"Cannot read {path}: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise OptiserveError(f"{path} is not valid YAML or JSON{at}.",
                             hint="Give the body of the REST request as YAML or JSON.") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise OptiserveError(f"{path} holds a {type(body).__name__}, not a mapping of settings.",
                             hint="Give the body of the REST request as YAML or JSON.")
    return body


def _apply_sets(body: dict, sets: list[str] | None) -> dict:
    """Each --set KEY=VALUE (dotted KEY: nested) written into `body`; VALUE is read as JSON
    (numbers, true/false, lists, objects), else taken as text."""
    for item in sets or []:
        key, eq, value = item.partition("=")
        path = key.strip().split(".")
        if not eq or not all(path):
            raise OptiserveError(f"--set {item!r} is not KEY=VALUE.",
                                 hint="E.g. --set quantization.method=static.")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = body
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OptiserveError(f"--set {item!r}: '{part}' is a value, not a group of "
                                     "options.")
        node[path[-1]] = parsed
    return body


@app.command()
def undeploy(name: str = typer.Argument(..., help="Deployment name.")):
    """Remove a deployment (running servers unload it on POST /v2/repository/models/NAME/unload
    or when they restart)."""
    _registry().deployments.remove(name)
    err.print(f"removed deployment {name}")


@app.command()
def deployments(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Deployments in the registry."""
    registry = _registry()
    rows = [{"name": d.name, **d.spec.model_dump(mode="json")}
            for d in registry.deployments.list()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        err.print(Text(f"no deployments in {registry.settings.describe_registry()}"),
                  soft_wrap=True)
        return
    from rich.table import Table
    table = Table("name", "model", "versions", "max batch", "delay us", "instances", "threads")
    for r in rows:
        v = r["versions"]
        table.add_row(r["name"], r["model"], f"latest {v['latest']}" if v["latest"] else
                      ",".join(map(str, v["specific"])), str(r["max_batch_size"]),
                      str(r["max_queue_delay_us"]), str(r["instances"]),
                      str(r["threads"] or "auto"))
    console.print(table)


@app.command()
def infer(model: str = typer.Argument(..., help="Deployment (or registered model) name, or "
                                      "NAME:VERSION."),
          data: str = typer.Argument(..., help="Rows: an .npz or .json file, '-' for JSON on "
                                     "stdin, or inline JSON: '[[...], ...]' (a one-input "
                                     "model), '{\"INPUT\": [[...]]}', records "
                                     "'[{\"INPUT\": ...}]' or a V2 request {\"inputs\": [...]}."),
          output: list[str] = typer.Option(None, "--output", "-o", help="Only this output; "
                                           "repeat for more."),
          rows: int = typer.Option(10, help="Rows of each output to show."),
          as_json: bool = typer.Option(False, "--json", help="Print every output as JSON."),
          server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """Send rows to a deployed model and print its outputs: through a running server's /v2
    with --server, else loaded here from the local registry (its deployment's settings)."""
    from optiserve.client import read_data

    payload = read_data(data)
    result = _client(server, key).infer(model, payload, outputs=output or None)
    if as_json:
        print(json.dumps({"model_name": result["model_name"],
                          "model_version": result["model_version"],
                          "outputs": {k: _plain(v) for k, v in result["outputs"].items()}}))
    else:
        render.inference(console, result, rows=rows)


def _plain(array) -> object:
    """An output array as JSON values (text for BYTES)."""
    if array.dtype.kind == "O":
        return [[x.decode(errors="replace") if isinstance(x, bytes) else x for x in row]
                if isinstance(row, list) else
                (row.decode(errors="replace") if isinstance(row, bytes) else row)
                for row in array.tolist()]
    return array.tolist()


@app.command()
def load(name: str = typer.Argument(..., help="Deployment name (or a registered model, "
                                    "deployed with the default settings)."),
         server: Optional[str] = typer.Option(
             None, "--server", envvar="OPTISERVE_SERVER_URL",
             help="The server's URL [default: http://127.0.0.1:8000]."),
         key: Optional[str] = _key_option()):
    """Load a deployment in a running server (POST /v2/repository/models/NAME/load): one
    stored by `optiserve deploy` after the server started, without restarting it."""
    from optiserve.client import DEFAULT_SERVER, Remote

    client = Remote(server or DEFAULT_SERVER, key)
    out = client.load(name)
    err.print(f"[green]loaded[/] {out['name']} versions {', '.join(out['versions'])} in "
              f"{client.url}")


@runs_app.command("list")
def runs_list(model: Optional[str] = typer.Option(None, help="Only this model's runs."),
              status: Optional[str] = typer.Option(None, help="Only runs in this status: "
                                                   "queued, running, completed, rejected, "
                                                   "failed, cancelled, timeout."),
              limit: int = typer.Option(50, help="Most runs shown, newest first."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON."),
              server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """Optimization runs, newest first: status, stage, progress."""
    client = _client(server, key)
    jobs = client.runs(model=model, status=status, limit=limit)
    if as_json:
        print(json.dumps(jobs, indent=2, default=str))
    elif not jobs:
        err.print(Text(f"no optimization runs in {client.where()}"), soft_wrap=True)
    else:
        render.runs(console, jobs)


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., help="Run id, e.g. opt-1a2b3c4d5e6f."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON."),
              server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """One run: status, candidates measured so far, its report when it has ended."""
    job = _client(server, key).run(run_id)
    if as_json:
        print(json.dumps(job, indent=2, default=str))
    else:
        render.run(console, job)


@runs_app.command("watch")
def runs_watch(run_id: str = typer.Argument(..., help="Run id."),
               interval: float = typer.Option(1.0, help="Seconds between polls."),
               as_json: bool = typer.Option(False, "--json", help="Print the final JSON."),
               server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """Follow a run until it ends. Exit status: 0 completed (or timed out with a result),
    3 rejected by the gate, 1 failed or cancelled."""
    from optiserve.client import wait

    client = _client(server, key)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(run_id, total=1.0)

        def update(job: dict) -> None:
            p = job["progress"]
            bar.update(task, completed=p["fraction"], description=(
                f"{run_id} {job['status']}: {p['stage'] or ''} "
                f"({p['candidates_measured']} candidates)")[:90])
        job = wait(client, run_id, update, poll_s=max(interval, 0.1))
    if as_json:
        print(json.dumps(job, indent=2, default=str))
    else:
        render.run(console, job)
    status = job["status"]
    if status not in ("completed", "timeout"):
        raise typer.Exit(3 if status == "rejected" else 1)


@runs_app.command("cancel")
def runs_cancel(run_id: str = typer.Argument(..., help="Run id."),
                server: Optional[str] = _server_option(), key: Optional[str] = _key_option()):
    """Cancel a queued or running run (its server stops a running one within seconds)."""
    job = _client(server, key).cancel(run_id)
    err.print(f"{run_id}: {job['status']}"
              + (" (cancel requested; its server stops it)" if job["status"] == "running"
                 else ""))


@keys_app.command("create")
def keys_create(name: str = typer.Argument(..., help="Who or what the key is for."),
                scope: list[str] = typer.Option(..., "--scope", help="admin, models:write, "
                                                "optimize, read or infer; repeat for more.")):
    """Create an API key. Its token is printed once; only its hash is stored."""
    key, token = _registry().keys.create(name, scope)
    err.print(f"created key {key.id} ({key.name}) with scopes {', '.join(key.scopes)}; "
              "store the token now, it is not shown again:")
    print(token)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """API keys (ids, names, scopes, last use; never the secrets)."""
    registry = _registry()
    keys = registry.keys.list()
    if not keys and not as_json:
        err.print(Text(f"no API keys in {registry.settings.describe_registry()}"),
                  soft_wrap=True)
        return
    rows = [{"id": k.id, "name": k.name, "scopes": list(k.scopes),
             "created_at": _iso(k.created_at), "last_used_at": _iso(k.last_used_at),
             "revoked_at": _iso(k.revoked_at)} for k in keys]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        render.keys(console, rows)


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="Key id, or a name (revokes all with it).")):
    """Revoke a key; requests with it get 401 from then on."""
    for k in _registry().keys.revoke(key):
        console.print(f"revoked {k.id} ({k.name})")


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _error(exc: Exception) -> None:
    """One line on stderr, however long (soft_wrap: the terminal wraps, Rich does not)."""
    err.print(Text("error: ", style="red") + Text(str(exc)), highlight=False, soft_wrap=True)


def command():
    """The click command `main` runs: Typer's, with its help tidied (see _tidy_help)."""
    cmd = typer.main.get_command(app)
    _tidy_help(cmd)
    return cmd


def _tidy_help(cmd) -> None:
    """Typer prints a type tag beside every parameter (`<bool>` beside each flag, `<str>`,
    `<list[str]>`): flags and arguments get none, options that take a value a short word
    saying what kind (TEXT, INT, NUMBER, PATH)."""
    from typer.core import TyperArgument, TyperOption

    for sub in getattr(cmd, "commands", {}).values():
        _tidy_help(sub)
    made = cmd.get_help_option  # --help is made when help is shown, not one of cmd.params

    def help_option(ctx):
        option = made(ctx)
        if option is not None:
            option.metavar = ""
        return option
    cmd.get_help_option = help_option
    for param in cmd.params:
        if isinstance(param, TyperArgument):
            param.display_type_rich = lambda ctx: None
        elif isinstance(param, TyperOption) and param.metavar is None:
            try:
                kind = param.bare_type()
            except Exception:  # an annotation Typer cannot name: the plain word
                kind = ""
            kind = kind.removeprefix("list[").removesuffix("]")
            param.metavar = "" if param.is_flag else {
                "int": "INT", "float": "NUMBER", "Path": "PATH"}.get(kind, "TEXT")


def main() -> None:
    try:
        command()(prog_name="optiserve")
    except OptiserveError as exc:
        _error(exc)
        sys.exit(2)
