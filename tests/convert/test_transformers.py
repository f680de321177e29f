"""A Hugging Face encoder (tiny, random weights): registered without touching the caller's
module, traced with eager attention, and fused by ONNX Runtime's transformer optimizer."""

from __future__ import annotations

import numpy as np
import pytest

import optiserve

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Embedder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  attn_implementation="sdpa")
    return Embedder(transformers.BertModel(cfg))


def test_register_leaves_the_module_as_given(sqlite_registry, tiny_bert):
    tiny_bert.train()
    ids = torch.randint(1, 200, (2, 16))
    v = optiserve.register("bert", tiny_bert, registry=sqlite_registry,
                           example_inputs=(ids, torch.ones_like(ids)))
    assert tiny_bert.encoder.config._attn_implementation == "sdpa"
    assert tiny_bert.training
    assert v.meta["num_heads"] == 4 and v.meta["hidden_size"] == 64
    assert [s.shape for s in v.signature.inputs] == [(-1, -1), (-1, -1)]


def test_attention_is_fused_and_outputs_stay_close(sqlite_registry, tiny_bert, tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (40, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, 10:] = 0
    np.savez(tmp_path / "val.npz", input_ids=ids, attention_mask=mask)
    tiny_bert.eval()
    optiserve.register("bert", tiny_bert, registry=sqlite_registry,
                       example_inputs=(torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])))
    result = optiserve.optimize(
        "bert", registry=sqlite_registry, optimizations=["onnx_conversion", "graph_optimization"],
        validation_dataset={"source": "file", "path": str(tmp_path / "val.npz")},
        iterations=10, warmup=1)
    fused = next(c for c in result.candidates if c.artifact.passes[-1]["name"]
                 == "graph_optimization")
    # candidate files live only during the run; the pass records what it fused
    assert fused.artifact.meta["fused_attention"] == 2
    assert any("Attention x2" in note and "SkipLayerNormalization" in note
               for note in fused.artifact.notes)
    assert fused.evaluation.value > 0.9999  # cosine vs the PyTorch original
    assert fused.parity["max_abs"] < 1e-3
