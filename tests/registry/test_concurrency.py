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


def test_register_delete_and_deploy_race_leaves_a_consistent_registry(settings, registry_url,
                                                                       tmp_path):
    """Issue 16, item 2: two registrations of one name, a delete and a deploy of it at once,
    30 rounds. Before, SQLite ignored FOR UPDATE and the delete removed the artifact rows it
    had read earlier, so a version added meanwhile left an orphan row, and every later upload
    of the name failed (UNIQUE constraint failed: artifacts.id). Now every outcome is a
    version, a 404 or a 409, and the registry has no orphan row, missing file or stray file."""
    from optiserve.core.errors import ConflictError, ModelNotFound
    from optiserve.registry.deployments import parse_spec

    regs = [Registry(settings, database_url=registry_url) for _ in range(4)]
    same = tmp_path / "same.onnx"  # identical bytes every round: the file is shared by rows
    same.write_bytes(b"\x08" * 64)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\x09" * 64)
    spec = parse_spec({"model": "m"})

    def act(k: int) -> None:
        try:
            if k < 2:
                regs[k].add_version("m", same if k else other, framework="onnx", format="onnx",
                                    signature=SIG)
            elif k == 2:
                regs[k].delete_model("m")
            elif regs[k].deployments.put("d", spec):
                regs[k].deployments.remove("d")
        except (ModelNotFound, ConflictError):
            pass  # the documented outcomes of a race: nothing to delete, or deployed now
    try:
        for _ in range(30):
            assert _in_threads(act, 4) == []
            assert regs[0].problems() == []
        v = regs[0].add_version("m", same, framework="onnx", format="onnx", signature=SIG)
        assert regs[0].path(v).read_bytes() == same.read_bytes()
        assert regs[0].problems() == []
    finally:
        for reg in regs:
            reg.close()
