"""Hardware preflight: what this machine's CPU and accelerators can do fast.

Quantization pays off only where the hardware has fast integer dot products: VNNI (AVX-512 or
AVX) or AMX on x86, the dot-product extension on ARM. Without VNNI, the AVX2/AVX-512 u8*s8
instruction (VPMADDUBSW) saturates, which is why ONNX Runtime advises 7-bit weights
(reduce_range) there. FP16 and TensorRT need a GPU. Passes read `detect()` to pick their fast
defaults and to warn before work that will not pay off here; the report records it.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field

_X86_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")
_ARM_FLAGS = ("asimddp", "i8mm", "fphp", "asimdhp", "sve")


@dataclass(frozen=True)
class Hardware:
    arch: str
    cpu: str
    cores: int
    flags: tuple[str, ...] = ()
    gpus: tuple[str, ...] = field(default=())
    ort_providers: tuple[str, ...] = ()

    # -- what the flags mean -------------------------------------------------------------
    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "i686")

    @property
    def vnni(self) -> bool:
        """Fast INT8 dot products (x86 VNNI or AMX; ARM's dot-product extension)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & set(self.flags))

    @property
    def amx(self) -> bool:
        return "amx_int8" in self.flags

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)

    def has_provider(self, name: str) -> bool:
        return name in self.ort_providers

    @property
    def int8_reduce_range(self) -> bool:
        """7-bit weights: needed on x86 without VNNI (u8*s8 saturation), not elsewhere. Flags
        that could not be read prove nothing: ONNX Runtime's default (off) then."""
        return self.x86 and bool(self.flags) and not self.vnni

    @property
    def int8_note(self) -> str | None:
        """A warning when INT8 is unlikely to pay off on this CPU, else None."""
        if self.vnni:
            return None
        if not self.flags:
            return ("the CPU's instruction set could not be read here, so whether INT8 pays off "
                    "is unknown until measured (the benchmark below measures it)")
        if self.x86 and "avx2" in self.flags:
            return ("this CPU has no VNNI: INT8 matrix products use saturating AVX2/AVX-512 "
                    "instructions, so weights are limited to 7 bits (reduce_range) and INT8 is "
                    "often no faster than FP32 here")
        return "this CPU has no fast INT8 dot-product instructions: INT8 may be slower than FP32"

    @property
    def fp16_note(self) -> str | None:
        if self.cuda:
            return None
        return ("no GPU here: FP16 is a GPU/accelerator optimization; on a CPU ONNX Runtime "
                "runs most FP16 operators by converting them back to FP32, so expect no speedup "
                "(the benchmark below measures it)")

    def summary(self) -> str:
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
               if f in self.flags]
        gpu = ", ".join(self.gpus) if self.gpus else "no GPU"
        return f"{self.cpu} ({self.arch}, {self.cores} cores; {' '.join(isa) or 'no SIMD flags read'}); {gpu}"

    def as_dict(self) -> dict:
        return {**asdict(self), "vnni": self.vnni, "amx": self.amx, "cuda": self.cuda,
                "summary": self.summary()}


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's name and flags from /proc/cpuinfo, or the flags in OPTISERVE_CPU_FLAGS when
    set: under an emulator (`qemu-x86_64 -cpu Haswell`) /proc/cpuinfo shows the host's CPU
    while the libraries see the emulated one, and a test of another CPU kind needs both to
    agree."""
    name, flags = "", set()
    forced = os.environ.get("OPTISERVE_CPU_FLAGS")
    if forced is not None:
        return f"flags from OPTISERVE_CPU_FLAGS ({platform.machine()})", set(
            forced.replace(",", " ").split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Hardware") and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: no flags to read; the passes fall back to safe defaults
        pass
    return name or platform.processor() or platform.machine(), flags


def _gpus() -> tuple[str, ...]:
    """NVIDIA GPUs from the driver's device files / nvidia-smi; nothing is initialized."""
    if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
        return ()
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:  # e.g. "NVIDIA-SMI has failed ... communicate with the driver"
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


@functools.cache
def detect() -> Hardware:
    import onnxruntime as ort

    arch = platform.machine().lower()
    name, flags = _cpuinfo()
    known = _X86_FLAGS + _ARM_FLAGS
    return Hardware(arch=arch, cpu=name, cores=os.cpu_count() or 1,
                    flags=tuple(f for f in known if f in flags), gpus=_gpus(),
                    ort_providers=tuple(ort.get_available_providers()))
