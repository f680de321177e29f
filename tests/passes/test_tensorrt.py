"""TensorRT: fails fast (PassSkipped, one line saying what is missing) without an NVIDIA GPU and
the TensorRT execution provider; options built from the config and TENSORRT_WORKSPACE_SIZE_GB;
the onnxruntime runtime honours a model's request for GPU providers or refuses clearly. The
`gpu` tests build a real engine and run only on a GPU machine with onnxruntime-gpu + TensorRT."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest

from optiserve.convert.onnx_io import write_meta
from optiserve.core.errors import ConfigError, ModelLoadError
from optiserve.core.hardware import Hardware, detect
from optiserve.core.settings import load_settings
from optiserve.core.types import Signature, TensorSpec
from optiserve.passes import PassContext, PassSkipped, get_pass
from optiserve.passes.tensorrt import profile_shapes, trt_options
from optiserve.runtimes.base import load_runtime
from optiserve.runtimes.onnxruntime import OnnxRuntime, read_file_meta
from tests.builders import mlp_onnx, run_onnx, save_onnx
from tests.passes.helpers import onnx_artifact

TRT = "TensorrtExecutionProvider"
NO_GPU = Hardware(arch="x86_64", cpu="Test EPYC 9000", cores=2,
                  ort_providers=("CPUExecutionProvider",))
GPU_NO_TRT = Hardware(arch="x86_64", cpu="Test EPYC 9000", cores=2, gpus=("NVIDIA H100",),
                      ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
# Past the preflight: what the pass refuses before it builds anything needs no real GPU.
GPU_WITH_TRT = Hardware(arch="x86_64", cpu="Test EPYC 9000", cores=2, gpus=("NVIDIA H100",),
                        ort_providers=(TRT, "CUDAExecutionProvider", "CPUExecutionProvider"))


@pytest.fixture
def mlp_path(tmp_path):
    return save_onnx(mlp_onnx((64, 128, 128, 10)), tmp_path / "mlp.onnx")


def tensorrt(path, tmp_path, settings, options=None, hardware=None, sample=None):
    workdir = tmp_path / "wd"
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample=sample or {},
                      hardware=hardware or detect())
    cls = get_pass("tensorrt")
    return cls().run(onnx_artifact(path), cls.parse_config(options), ctx)


def signature(*inputs: tuple[str, tuple[int, ...]]) -> Signature:
    return Signature(inputs=tuple(TensorSpec(name=n, dtype="float32", shape=s) for n, s in inputs),
                     outputs=(TensorSpec(name="y", dtype="float32", shape=(-1, 10)),))


# -- fail fast -----------------------------------------------------------------------------------
def test_fails_fast_without_a_gpu(tmp_path, settings, mlp_path):
    start = time.perf_counter()
    with pytest.raises(PassSkipped) as info:
        tensorrt(mlp_path, tmp_path, settings, hardware=NO_GPU)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("TensorRT needs an NVIDIA GPU with the TensorRT execution provider")
    assert "no GPU (CPU: Test EPYC 9000)" in message
    assert "install onnxruntime-gpu and TensorRT on a GPU machine" in message
    assert not list((tmp_path / "wd").iterdir())  # nothing written


def test_fails_fast_on_a_gpu_without_the_provider(tmp_path, settings, mlp_path):
    with pytest.raises(PassSkipped) as info:
        tensorrt(mlp_path, tmp_path, settings, hardware=GPU_NO_TRT)
    message = str(info.value)
    assert TRT in message and "NVIDIA H100" in message
    assert "CUDAExecutionProvider, CPUExecutionProvider" in message  # what there is
    assert "pip install onnxruntime-gpu tensorrt" in message


def test_this_machine(tmp_path, settings, mlp_path):
    """The detected hardware: on a machine without TensorRT the pass skips at once."""
    hw = detect()
    if hw.cuda and hw.has_provider(TRT):
        pytest.skip("this machine has TensorRT: the gpu tests cover it")
    start = time.perf_counter()
    with pytest.raises(PassSkipped, match="TensorRT needs"):
        tensorrt(mlp_path, tmp_path, settings)
    assert time.perf_counter() - start < 1.0


def test_refuses_graphs_it_cannot_build(tmp_path, settings, mlp_path):
    from onnxruntime.quantization import quantize_dynamic

    with pytest.raises(PassSkipped, match="int8 needs a QDQ model"):
        tensorrt(mlp_path, tmp_path, settings, {"int8": True}, hardware=GPU_WITH_TRT)
    dynamic = tmp_path / "int8.onnx"
    quantize_dynamic(str(mlp_path), str(dynamic))
    with pytest.raises(PassSkipped, match="dynamic INT8 operators"):
        tensorrt(dynamic, tmp_path, settings, hardware=GPU_WITH_TRT)


# -- config and options ------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"workspace_gb": -1}, "workspace_gb"),
    ({"workspace_gb": 0}, "workspace_gb"),
    ({"builder_optimization_level": 6}, "builder_optimization_level"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"precision": "fp16"}, "precision"),
])
def test_config_is_validated(options, field):
    with pytest.raises(ConfigError, match=f"Option '{field}' of pass 'tensorrt'"):
        get_pass("tensorrt").parse_config(options)


def test_options_from_config_and_signature(settings):
    config = get_pass("tensorrt").parse_config({"max_batch_size": 16})
    options = trt_options(config, settings, signature(("x", (-1, 64))), {})
    assert options == {
        "trt_fp16_enable": True, "trt_int8_enable": False,
        "trt_max_workspace_size": 4 * 2**30,  # TENSORRT_WORKSPACE_SIZE_GB's default
        "trt_builder_optimization_level": 3,
        "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
        "trt_profile_min_shapes": "x:1x64", "trt_profile_opt_shapes": "x:16x64",
        "trt_profile_max_shapes": "x:16x64"}
    json.dumps(options)  # goes into the model's metadata as JSON


def test_workspace_from_the_setting(monkeypatch):
    monkeypatch.setenv("TENSORRT_WORKSPACE_SIZE_GB", "1.5")
    settings = load_settings(threads=1)
    assert settings.tensorrt_workspace_size_gb == 1.5
    sig = signature(("x", (1, 64)))
    config = get_pass("tensorrt").parse_config({})
    assert trt_options(config, settings, sig, {})["trt_max_workspace_size"] == int(1.5 * 2**30)
    config = get_pass("tensorrt").parse_config({"workspace_gb": 0.5})
    assert trt_options(config, settings, sig, {})["trt_max_workspace_size"] == 2**29


def test_profile_shapes():
    # static inputs need no profile
    assert profile_shapes(signature(("x", (1, 64))), {}, 8) == {}
    # dynamic batch on two inputs; a sequence length fixed at the sample's
    sig = signature(("ids", (-1, -1)), ("mask", (-1, -1)))
    sample = {"ids": (2, 128), "mask": (2, 128)}
    assert profile_shapes(sig, sample, 8) == {
        "trt_profile_min_shapes": "ids:1x128,mask:1x128",
        "trt_profile_opt_shapes": "ids:8x128,mask:8x128",
        "trt_profile_max_shapes": "ids:8x128,mask:8x128"}
    # a dynamic dimension with no sample to fix it: no explicit profile at all
    assert profile_shapes(sig, {"ids": (2, 128)}, 8) == {}


# -- the runtime -------------------------------------------------------------------------------
def _asks_for(path, provider: str, options: dict | None = None):
    model = onnx.load(str(path))
    write_meta(model, {"execution_provider": provider, "trt_options": json.dumps(options or {})})
    onnx.save(model, str(path))
    return path


def test_runtime_reads_the_request_from_the_file(tmp_path, mlp_path):
    assert read_file_meta(mlp_path) == {}
    _asks_for(mlp_path, "tensorrt", {"trt_fp16_enable": True})
    meta = read_file_meta(mlp_path)
    assert meta["execution_provider"] == "tensorrt"
    assert json.loads(meta["trt_options"]) == {"trt_fp16_enable": True}
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"\xff" * 64)
    assert read_file_meta(not_onnx) == {}


def test_runtime_refuses_a_tensorrt_model_without_the_provider(mlp_path):
    if TRT in detect().ort_providers:
        pytest.skip("this ONNX Runtime has TensorRT")
    _asks_for(mlp_path, "tensorrt")
    runtime = load_runtime(mlp_path, onnx_artifact(mlp_path).signature, format="onnx", threads=1)
    with pytest.raises(ModelLoadError) as info:
        runtime.load()
    message = str(info.value)
    assert f"it asks for {TRT}, which this ONNX Runtime" in message
    assert "CPUExecutionProvider" in message and "onnxruntime-gpu" in message


def test_runtime_providers_argument(mlp_path):
    sig = onnx_artifact(mlp_path).signature
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    with OnnxRuntime(mlp_path, sig, threads=1, format="onnx",
                     providers=["CPUExecutionProvider"]) as runtime:
        np.testing.assert_allclose(runtime.predict({"x": x})["y"],
                                   run_onnx(mlp_path, {"x": x})[0], rtol=1e-6)
        assert runtime.metadata()["providers"] == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in detect().ort_providers:
        with pytest.raises(ModelLoadError, match="asks for CUDAExecutionProvider"):
            OnnxRuntime(mlp_path, sig, threads=1, format="onnx",
                        providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).load()


def test_runtime_refuses_an_unknown_provider_request(mlp_path):
    _asks_for(mlp_path, "rocm")
    runtime = load_runtime(mlp_path, onnx_artifact(mlp_path).signature, format="onnx", threads=1)
    with pytest.raises(ModelLoadError, match="execution provider 'rocm'"):
        runtime.load()


# -- on a GPU ----------------------------------------------------------------------------------
def _need_tensorrt():
    if not detect().has_provider(TRT):
        pytest.skip(f"ONNX Runtime here has no {TRT} (install onnxruntime-gpu and TensorRT)")


@pytest.mark.gpu
def test_fp16_engine_matches_cpu_fp32(tmp_path, settings, mlp_path):
    _need_tensorrt()
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    out = tensorrt(mlp_path, tmp_path, settings, {"max_batch_size": 8}, sample={"x": x[:2]})
    assert out.path.suffix == ".onnx" and out.meta["execution_provider"] == "tensorrt"
    assert out.meta["trt_options"]["trt_fp16_enable"] is True
    assert out.meta["trt_options"]["trt_profile_max_shapes"] == "x:8x64"
    assert out.meta["trt_engines"]  # built once, cached next to the model
    with load_runtime(out.path, out.signature, format="onnx", threads=1) as runtime:
        assert runtime.metadata()["providers"][0] == TRT
        got = runtime.predict({"x": x})["y"]
    ref = run_onnx(mlp_path, {"x": x})[0]
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()  # FP16 kernels


@pytest.mark.gpu
def test_fp32_engine_is_exact_enough(tmp_path, settings, mlp_path):
    _need_tensorrt()
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    out = tensorrt(mlp_path, tmp_path, settings, {"fp16": False, "max_batch_size": 4},
                   sample={"x": x[:2]})
    with load_runtime(out.path, out.signature, format="onnx", threads=1) as runtime:
        got = runtime.predict({"x": x})["y"]
    # TF32 may be used for FP32 matrix products on Ampere and newer: ~1e-3 relative.
    np.testing.assert_allclose(got, run_onnx(mlp_path, {"x": x})[0], rtol=5e-3, atol=5e-3)
