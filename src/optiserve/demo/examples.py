"""`optiserve demo --examples DIR`: the files README.md's examples name, written into DIR.

Every file is made here, in seconds, from the demo's own data (the synthetic churn table and
scikit-learn's digits), so that each README block runs as written in a fresh folder:

    model.pkl       the demo's churn model: StandardScaler + 200-tree random forest (joblib),
                    trained on the rows the seed's query (LIMIT 1000) does not read
    churn.onnx      a churn model for the REST walk-through: StandardScaler + MLP, converted to
                    ONNX (input `input` float32[-1, 9]), so INT8 quantization has MatMuls to
                    work on
    digits_cnn.pt   the demo's digits CNN (state dict), for `digits_net()` in the Python example
    train.npz       digits 1x32x32 training images: `input` float32, `label` int64
    calib.npz       200 of the training images (`input`): calibration rows, apart from val
    val.npz         the held-out images with labels: validation rows
    check.npz       the same held-out images (`input`): rows to check an export on

The churn features come in the table's column order (`optiserve.data.demo_source.FEATURES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from optiserve.core.deps import require
from optiserve.core.errors import OptiserveError

CALIBRATION_ROWS = 200


def write_examples(folder: Path, progress=None) -> list[Path]:
    """Write the README's example files into `folder` (created); returns their paths."""
    import joblib

    from optiserve.data import demo_source as churn_data
    from optiserve.demo import models

    def say(message: str) -> None:
        if progress:
            progress(message, 0)

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OptiserveError(f"--examples {folder}: is a file; name a folder to write into.")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    say("training the churn random forest (model.pkl)")
    data = churn_data.generate()
    forest = models.churn_model(data, churn_data.FEATURES, churn_data.LABEL, train_from=1000)
    joblib.dump(forest, folder / "model.pkl")
    written.append(folder / "model.pkl")

    say("training the churn MLP and converting it to ONNX (churn.onnx)")
    (folder / "churn.onnx").write_bytes(_churn_mlp_onnx(data, churn_data))
    written.append(folder / "churn.onnx")

    say("training the digits CNN (digits_cnn.pt, train/calib/val/check.npz)")
    torch = require("torch", extra="torch", feature="The digits examples")
    x_tr, x_te, y_tr, y_te = models.digits()
    net = models.digits_cnn(x_tr, y_tr)
    torch.save(net.state_dict(), folder / "digits_cnn.pt")
    np.savez(folder / "train.npz", input=x_tr, label=y_tr)
    np.savez(folder / "calib.npz", input=x_tr[:CALIBRATION_ROWS])
    np.savez(folder / "val.npz", input=x_te, label=y_te)
    np.savez(folder / "check.npz", input=x_te)
    written += [folder / n for n in ("digits_cnn.pt", "train.npz", "calib.npz", "val.npz",
                                     "check.npz")]
    return written


def _churn_mlp_onnx(data: dict[str, np.ndarray], churn_data: Any) -> bytes:
    require("sklearn", extra="sklearn", feature="The churn examples")
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from optiserve.convert.sklearn import to_onnx

    x = np.column_stack([data[f] for f in churn_data.FEATURES])[1000:].astype(np.float32)
    y = data[churn_data.LABEL][1000:]
    mlp = make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(256, 256), max_iter=60, early_stopping=True, random_state=0))
    import warnings

    with warnings.catch_warnings():  # ConvergenceWarning: 60 epochs are plenty here
        warnings.simplefilter("ignore")
        mlp.fit(x, y)
    return to_onnx(mlp, x.shape[1], dtype="float32", opset=17).SerializeToString()


def digits_net(weights: str | Path = "digits_cnn.pt") -> Any:
    """The demo's digits CNN (input float32[-1, 1, 32, 32] -> 10 logits) with the weights
    `optiserve demo --examples` wrote, in eval mode."""
    torch = require("torch", extra="torch", feature="The digits examples")
    from optiserve.demo.models import digits_cnn_module

    path = Path(weights)
    if not path.is_file():
        raise OptiserveError(f"{path}: no such file; `optiserve demo --examples .` writes it.")
    net = digits_cnn_module()
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval()
