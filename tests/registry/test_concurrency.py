"""Several writers at once. These reproduce races, so each test uses enough threads, started
together on a barrier, that the race shows on every run (8 of 8 runs here)."""

from __future__ import annotations

import threading

import pytest

from optiserve.registry import Registry
from tests.registry.fakes import SIG

THREADS, EACH = 8, 6


def _in_threads(target, n: int) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(k: int) -> None:
        try:
            barrier.wait()
            target(k)
        except BaseException as exc:  # collected and asserted on in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.mark.postgres
def test_concurrent_registrations_of_one_model(settings, pg_url, tmp_path):
    regs = [Registry(settings, database_url=pg_url) for _ in range(THREADS)]
    files = []
    for i in range(THREADS * EACH):
        files.append(tmp_path / f"m{i}.onnx")
        files[-1].write_bytes(b"\x08" + i.to_bytes(2, "big") * 8)  # distinct bytes per file
    got: list[int] = []

    def register(k: int) -> None:
        for j in range(EACH):
            got.append(regs[k].add_version("shared", files[k * EACH + j], framework="onnx",
                                           format="onnx", signature=SIG).version)
    try:
        errors = _in_threads(register, THREADS)
        assert errors == []
        assert sorted(got) == list(range(1, THREADS * EACH + 1))
    finally:
        for reg in regs:
            reg.close()


def test_registries_can_be_created_in_parallel_threads(settings):
    regs: list[Registry] = []
    errors = _in_threads(lambda k: regs.append(Registry(settings)), THREADS)
    for reg in regs:
        reg.close()
    assert errors == []
