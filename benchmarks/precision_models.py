"""The three models of optimize_precision.py, their data, and the peers' artifacts.

Everything here is built once per model and kept in a cache folder (weights, data, the FP32
ONNX export, ORT's quantized models, the OpenVINO IR, torch FP32 reference outputs), so a later
run of one model or one variant does not retrain or re-export. A `recipe.json` next to the files
records what built them; a different recipe or package version rebuilds.

Nothing is imported at module level beyond numpy: the ONNX Runtime and OpenVINO variants are
timed in processes that never load torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_CALIB = 100          # calibration rows (images / sentences) for static quantization
N_SENT_HELDOUT = 250   # MiniLM held-out sentences
MINILM_SEQ = 128       # as optimize_minilm.py
RESNET = {"widths": (64, 128, 256, 512), "blocks": (1, 1, 1, 1), "size": 64, "epochs": 5,
          "lr": 2e-3, "batch": 64, "seed": 0}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    batch_sizes: tuple[int, ...]
    metric: str               # "accuracy" (top-1 on held-out labels) or "cosine" (vs torch FP32)
    threshold: float          # optiserve's accuracy_threshold
    inputs: tuple[str, ...]   # model input names (ONNX and the optiserve NPZ files)


MODELS = {
    "digits_cnn": ModelSpec("digits_cnn", "digits CNN (optiserve.demo, 32x32)", (1, 64),
                            "accuracy", 0.995, ("pixels",)),
    "resnet_digits64": ModelSpec(
        "resnet_digits64", "ResNet-18-width CNN (64-128-256-512, 1 block/stage), digits 64x64",
        (1, 64), "accuracy", 0.995, ("pixels",)),
    "minilm": ModelSpec("minilm", f"all-MiniLM-L6-v2 (mean-pooled, seq {MINILM_SEQ})", (1, 32),
                        "cosine", 0.993, ("input_ids", "attention_mask")),
}


# -- torch modules ----------------------------------------------------------------------------
def _resnet(torch):
    nn = torch.nn

    class Block(nn.Module):
        """ResNet BasicBlock: two 3x3 convs with BatchNorm, identity or 1x1 projection."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class DigitsResNet(nn.Module):
        """ImageNet ResNet stem (7x7/2 conv, 3x3/2 max-pool) and BasicBlock stages of
        ResNet-18's widths; global average pool, one Linear to 10 classes."""

        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.MaxPool2d(3, 2, 1)]
            cin = 64
            for stage, (width, n) in enumerate(zip(RESNET["widths"], RESNET["blocks"])):
                for j in range(n):
                    layers.append(Block(cin, width, 2 if j == 0 and stage > 0 else 1))
                    cin = width
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
            self.net = nn.Sequential(*layers)

        def forward(self, pixels):
            return self.net(pixels)

    return DigitsResNet()


def _named(torch, net):
    """The demo CNN (an nn.Sequential) with its input named `pixels`, like the ResNet's."""

    class DigitsCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixels):
            return self.net(pixels)

    return DigitsCNN()


def build_module(model: str, cache: Path):
    """The trained torch module in eval mode, from the cached weights."""
    import torch

    if model == "minilm":
        from optiserve.demo.models import minilm

        return minilm()[0]
    if model == "digits_cnn":
        from optiserve.demo.models import digits_cnn

        x = np.zeros((1, 1, 32, 32), np.float32)
        module = _named(torch, digits_cnn(x, np.zeros(1, np.int64), epochs=0))
    else:
        module = _resnet(torch)
    module.load_state_dict(torch.load(cache / "weights.pt", weights_only=True))
    return module.eval()


# -- data -----------------------------------------------------------------------------------
def digits_arrays(size: int):
    """scikit-learn digits in [0, 1] upsampled to size x size; optiserve.demo's stratified 75/25
    split (seed 0). At 32 this is optiserve.demo.models.digits() itself."""
    if size == 32:
        from optiserve.demo.models import digits

        return digits(seed=0)
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False).numpy()
    return train_test_split(x, d.target.astype(np.int64), test_size=0.25, stratify=d.target,
                            random_state=0)


def _train_resnet(x_tr: np.ndarray, y_tr: np.ndarray):
    import torch

    torch.manual_seed(RESNET["seed"])
    net = _resnet(torch)
    opt = torch.optim.AdamW(net.parameters(), RESNET["lr"], weight_decay=1e-4)
    xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    steps_per_epoch = (len(xs) + RESNET["batch"] - 1) // RESNET["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, RESNET["lr"],
                                                total_steps=RESNET["epochs"] * steps_per_epoch)
    gen = torch.Generator().manual_seed(RESNET["seed"])
    net.train()
    for _ in range(RESNET["epochs"]):
        for idx in torch.randperm(len(xs), generator=gen).split(RESNET["batch"]):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
            sched.step()
    return net.eval()


def _prepare_cnn(model: str, cache: Path, info: dict):
    import torch

    from optiserve.demo.models import digits_cnn

    size = 32 if model == "digits_cnn" else RESNET["size"]
    x_tr, x_te, y_tr, y_te = digits_arrays(size)
    t0 = time.perf_counter()
    if model == "digits_cnn":
        module = _named(torch, digits_cnn(x_tr, y_tr))
    else:
        module = _train_resnet(x_tr, y_tr)
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    info["train_rows"], info["heldout_rows"] = len(x_tr), len(x_te)
    torch.save(module.state_dict(), cache / "weights.pt")
    np.savez(cache / "heldout.npz", pixels=x_te, label=y_te)
    np.savez(cache / "calibration.npz", pixels=x_tr[:N_CALIB])
    np.savez(cache / "training.npz", pixels=x_tr, label=y_tr)
    return module, (torch.from_numpy(x_tr[:2]),)


def _prepare_minilm(cache: Path, info: dict):
    import torch

    from optiserve.demo.models import minilm, tokenize
    from optiserve.demo.sentences import sentence_pool

    module, tok = minilm()
    sentences, _ = sentence_pool(N_CALIB + N_SENT_HELDOUT, 0)
    calib, heldout = sentences[:N_CALIB], sentences[N_CALIB:]
    np.savez(cache / "calibration.npz", **tokenize(tok, calib, MINILM_SEQ))
    np.savez(cache / "heldout.npz", **tokenize(tok, heldout, MINILM_SEQ))
    (cache / "sentences.json").write_text(json.dumps({"calibration": calib,
                                                      "heldout": heldout}, indent=1))
    info["calibration_rows"], info["heldout_rows"] = len(calib), len(heldout)
    ex = load_npz(cache / "calibration.npz")
    return module, (torch.from_numpy(ex["input_ids"][:2]),
                    torch.from_numpy(ex["attention_mask"][:2]))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def heldout(cache: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(model inputs, labels or None) of the held-out rows."""
    data = load_npz(cache / "heldout.npz")
    return data, data.pop("label", None)


# -- the peers' artifacts -----------------------------------------------------------------------
def _export(module, args, spec: ModelSpec, path: Path, info: dict) -> None:
    """torch.onnx.export with its defaults (the dynamo exporter in this torch): names and a
    dynamic batch axis only."""
    import onnx
    import torch
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    t0 = time.perf_counter()
    dyn = {n: {0: "batch"} for n in spec.inputs} | {"output": {0: "batch"}}
    torch.onnx.export(module, args, str(path), input_names=list(spec.inputs),
                      output_names=["output"], dynamic_axes=dyn)
    outside = {ExternalDataInfo(t).location for t in onnx.load(
        str(path), load_external_data=False).graph.initializer if uses_external_data(t)}
    model = onnx.load(str(path))
    # The dynamo exporter records value_info for initializers too. ORT's quantizers rewrite
    # Gemm weights (transposed) under the same name, and the stale entry then fails shape
    # inference ("Inferred shape and existing shape differ in dimension 0: (512) vs (10)").
    inits = {i.name for i in model.graph.initializer}
    stale = [v for v in model.graph.value_info if v.name in inits]
    for v in stale:
        model.graph.value_info.remove(v)
    onnx.save(model, str(path))  # weights inline (all three models are far below 2 GB)
    for name in outside:
        (path.parent / name).unlink(missing_ok=True)
    info["export"] = {"seconds": round(time.perf_counter() - t0, 1),
                      "exporter": "torch.onnx.export defaults (dynamo)",
                      "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                      "value_info_of_initializers_removed": len(stale)}


def _quantize(cache: Path, info: dict) -> None:
    """ORT quantize_dynamic and quantize_static, both with their defaults; static calibrates
    on the calibration rows in batches of 10."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, rows: dict[str, np.ndarray], batch: int = 10):
            n = len(next(iter(rows.values())))
            self.batches = iter([{k: v[i:i + batch] for k, v in rows.items()}
                                 for i in range(0, n, batch)])

        def get_next(self):
            return next(self.batches, None)

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice
    t0 = time.perf_counter()
    quantize_dynamic(str(cache / "fp32.onnx"), str(cache / "dynamic.onnx"))
    info["quantize_dynamic_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    quantize_static(str(cache / "fp32.onnx"), str(cache / "static.onnx"),
                    Reader(load_npz(cache / "calibration.npz")))
    info["quantize_static_seconds"] = round(time.perf_counter() - t0, 1)


def _openvino_ir(cache: Path, info: dict) -> None:
    import openvino as ov

    t0 = time.perf_counter()
    ov.save_model(ov.convert_model(str(cache / "fp32.onnx")), str(cache / "openvino.xml"),
                  compress_to_fp16=False)
    info["openvino_convert_seconds"] = round(time.perf_counter() - t0, 1)


def recipe(model: str) -> dict:
    from importlib.metadata import version

    return {"model": model, "resnet": RESNET if model == "resnet_digits64" else None,
            "n_calib": N_CALIB, "seq": MINILM_SEQ if model == "minilm" else None,
            "format": 2, **{p: version(p) for p in ("torch", "onnxruntime", "openvino", "onnx")}}


def prepare(model: str, cache: Path, fresh: bool = False) -> dict:
    """Build (or reuse) everything the variants of `model` read. Returns what it did."""
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / "prepare.json"
    want = json.loads(json.dumps(recipe(model)))  # tuples as lists, as read back
    if not fresh and marker.exists():
        done = json.loads(marker.read_text())
        if done.get("recipe") == want:
            return {**done, "cached": True}
    import torch

    torch.set_num_threads(2)
    spec = MODELS[model]
    t0 = time.perf_counter()
    info: dict = {"recipe": want}
    module, args = _prepare_minilm(cache, info) if model == "minilm" \
        else _prepare_cnn(model, cache, info)
    inputs, labels = heldout(cache)
    with torch.inference_mode():
        parts = [module(*(torch.from_numpy(inputs[n][i:i + 32]) for n in spec.inputs)).numpy()
                 for i in range(0, len(inputs[spec.inputs[0]]), 32)]
    reference = np.concatenate(parts)
    np.save(cache / "reference.npy", reference)
    if labels is not None:
        info["torch_fp32_accuracy"] = float((reference.argmax(1) == labels).mean())
    _export(module, args, spec, cache / "fp32.onnx", info)
    _quantize(cache, info)
    _openvino_ir(cache, info)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "cached": False}
