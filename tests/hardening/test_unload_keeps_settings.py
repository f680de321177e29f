"""Triton's unload semantics (issue 16): `unload_model` then `load_model` answered 404, because
unloading deleted the deployment and its settings. Now an unload keeps them, a load serves the
model again as it was, and a server restarted meanwhile leaves it unloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as th

from optiserve.api import register
from tests.builders import linear_onnx, run_onnx, save_onnx


@pytest.mark.slow
def test_unload_then_load_keeps_the_settings_across_a_restart(make_server, tmp_path):
    path = save_onnx(linear_onnx(4, 3), tmp_path / "lin.onnx")
    first = make_server(jobs=False)
    register("lin", path, registry=first.registry)
    h = {"Authorization": f"Bearer {first.admin}"}
    t = th.InferenceServerClient(first.url.removeprefix("http://"))
    t.load_model("lin", headers=h, config=json.dumps({"max_batch_size": 4, "instances": 2}))
    t.unload_model("lin", headers=h)
    assert not t.is_model_ready("lin", headers=h)
    t.close()

    second = make_server(jobs=False)  # the same registry: a restart
    t = th.InferenceServerClient(second.url.removeprefix("http://"))
    h = {"Authorization": f"Bearer {second.admin}"}
    assert not t.is_model_ready("lin", headers=h)  # stays unloaded
    assert t.is_server_ready(headers=h)  # an unloaded deployment is no failed one
    t.load_model("lin", headers=h)
    config = t.get_model_config("lin", headers=h)
    assert config["max_batch_size"] == 4 and config["instance_group"][0]["count"] == 2
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    i = th.InferInput("x", [2, 4], "FP32")
    i.set_data_from_numpy(x)
    np.testing.assert_allclose(t.infer("lin", [i], headers=h).as_numpy("y"),
                               run_onnx(path, {"x": x})[0], rtol=1e-5, atol=1e-6)
    t.close()
