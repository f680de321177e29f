"""Hardware preflight: what the flags mean for INT8, and what is said when nothing is known."""

from __future__ import annotations

from optiserve.core.hardware import Hardware, detect


def _cpu(*flags: str, arch: str = "x86_64") -> Hardware:
    return Hardware(arch=arch, cpu="test", cores=2, flags=flags)


def test_vnni_amx_and_arm_dot_product_count_as_fast_int8():
    for hw in (_cpu("avx2", "avx512f", "avx512_vnni"), _cpu("avx2", "avx_vnni"),
               _cpu("amx_int8", "amx_tile"), _cpu("asimddp", arch="aarch64")):
        assert hw.vnni and not hw.int8_reduce_range and hw.int8_note is None


def test_x86_without_vnni_gets_7_bit_weights_and_a_warning():
    hw = _cpu("avx2", "avx512f")
    assert hw.int8_reduce_range
    assert "no VNNI" in hw.int8_note and "reduce_range" in hw.int8_note


def test_unreadable_flags_prove_nothing():
    """macOS or Windows: no /proc/cpuinfo. No claim about the CPU, ONNX Runtime's defaults."""
    hw = _cpu()
    assert not hw.int8_reduce_range
    assert "could not be read" in hw.int8_note and "measure" in hw.int8_note


def test_fp16_note_only_without_a_gpu():
    assert "GPU" in _cpu("avx2").fp16_note
    assert Hardware(arch="x86_64", cpu="t", cores=2, gpus=("NVIDIA H100",)).fp16_note is None


def test_this_machine_is_read():
    hw = detect()
    assert hw.cores >= 1 and "CPUExecutionProvider" in hw.ort_providers
    assert hw.summary().startswith(hw.cpu) and "cores" in hw.summary()


def test_cpu_flags_can_be_given_for_an_emulated_cpu(monkeypatch):
    """Under `qemu-x86_64 -cpu Haswell` /proc/cpuinfo shows the host's flags while the libraries
    see the emulated CPU's: OPTISERVE_CPU_FLAGS makes optiserve's choices agree with them."""
    monkeypatch.setenv("OPTISERVE_CPU_FLAGS", "avx2,fma sse4_2")
    detect.cache_clear()
    try:
        hw = detect()
        assert set(hw.flags) == {"avx2"}  # the flags optiserve reads; fma and sse4_2 are not
        assert hw.int8_reduce_range and "OPTISERVE_CPU_FLAGS" in hw.cpu
    finally:
        detect.cache_clear()
