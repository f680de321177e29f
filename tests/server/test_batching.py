"""The dynamic batcher (server/batching.py) with real ONNX Runtime sessions: every request gets
its own rows back, batches respect their limits, and each failure reaches only the requests
it concerns."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optiserve.convert.onnx_io import signature_of
from optiserve.core.errors import OptiserveError
from optiserve.runtimes.base import load_runtime
from optiserve.server.batching import (Batcher, BatchStats, ModelFailed, ModelUnavailable,
                                       QueueFull, RequestTimeout)
from optiserve.server.errors import http_status
from optiserve.server.tensors import TensorError
from tests.builders import IR_VERSION, OPSET, linear_onnx, save_onnx


def rowsum_onnx() -> onnx.ModelProto:
    """x [N, L] -> s = sum over L [N, 1], d = 2x [N, L]: a dynamic second dimension."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
         helper.make_node("Mul", ["x", "two"], ["d"])], "rowsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "len"])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, ["batch", "len"])],
        [axes, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


class Model:
    """A real ONNX Runtime session behind optiserve's runtime, its calls recorded, and an
    independent plain session to compute what each request should get."""

    def __init__(self, proto: onnx.ModelProto, path: Path):
        save_onnx(proto, path)
        self.runtime = load_runtime(path, signature_of(proto), format="onnx", threads=1)
        self.runtime.load()
        self.reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.calls: list[dict[str, tuple]] = []  # input shapes of each batch run
        self.gate: threading.Event | None = None  # when set: the first call waits on it
        self.started = threading.Event()

    def run(self, inputs, outputs):
        self.calls.append({n: a.shape for n, a in inputs.items()})
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the runner"
        return self.runtime.predict(inputs, outputs)

    def expected(self, inputs, outputs=None) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in self.reference.get_outputs()]
        return dict(zip(names, self.reference.run(names, inputs)))


@pytest.fixture
def linear(tmp_path) -> Model:
    return Model(linear_onnx(4, 3), tmp_path / "linear.onnx")


@pytest.fixture
def rowsum(tmp_path) -> Model:
    return Model(rowsum_onnx(), tmp_path / "rowsum.onnx")


@pytest.fixture
def batchers():
    """make(model_or_runner, **kw) -> Batcher; every one closed after the test."""
    made: list[Batcher] = []

    def make(runner, *, runners: int = 1, **kw) -> Batcher:
        run = runner.run if isinstance(runner, Model) else runner
        seen: list[BatchStats] = []
        b = Batcher("m", [run] * runners, on_batch=seen.append, **kw)
        b.stats = seen
        made.append(b)
        return b

    yield make
    for b in made:
        gate = getattr(b, "_gate", None)
        if gate is not None:  # a test that failed with its runner held: let it go
            gate.set()
        b.close(drain=False)


def _rows(rng, n: int, width: int = 4) -> np.ndarray:
    return rng.standard_normal((n, width)).astype(np.float32)


async def _until(event: threading.Event, timeout: float = 5) -> None:
    assert await asyncio.to_thread(event.wait, timeout), "the runner never started"


def test_concurrent_requests_each_get_their_own_rows(linear, batchers):
    b = batchers(linear, max_batch_size=64)
    rng = np.random.default_rng(0)
    xs = [_rows(rng, 1) for _ in range(200)] + [_rows(rng, int(n)) for n in rng.integers(1, 6, 50)]

    async def main():
        return await asyncio.gather(*[b.submit({"x": x}, None) for x in xs])

    results = asyncio.run(main())
    for x, got in zip(xs, results):
        assert set(got) == {"y"} and got["y"].shape == (len(x), 3)
        np.testing.assert_allclose(got["y"], linear.expected({"x": x})["y"], rtol=1e-5,
                                   atol=1e-6)
    assert sum(s.rows for s in b.stats) == sum(len(x) for x in xs)
    assert sum(s.requests for s in b.stats) == len(xs)
    assert max(s.requests for s in b.stats) > 1, "nothing was batched"
    assert len(b.stats) < len(xs)
    assert all(len(q) == s.requests and min(q) >= 0 for s in b.stats for q in [s.queue_s])


def test_requested_outputs_are_passed_and_batched_separately(rowsum, batchers):
    b = batchers(rowsum, max_batch_size=32)
    rng = np.random.default_rng(1)
    xs = [_rows(rng, 1, 5) for _ in range(40)]
    wants = [["s"] if i % 2 else None for i in range(40)]

    async def main():
        return await asyncio.gather(*[b.submit({"x": x}, w) for x, w in zip(xs, wants)])

    for x, w, got in zip(xs, wants, asyncio.run(main())):
        assert set(got) == ({"s"} if w else {"s", "d"})
        np.testing.assert_allclose(got["s"], x.sum(axis=1, keepdims=True), rtol=1e-5)


def test_max_batch_size_is_never_exceeded(linear, batchers):
    b = batchers(linear, max_batch_size=8)
    rng = np.random.default_rng(2)
    xs = [_rows(rng, int(n)) for n in rng.integers(1, 4, 120)]

    async def main():
        return await asyncio.gather(*[b.submit({"x": x}, None) for x in xs])

    for x, got in zip(xs, asyncio.run(main())):
        np.testing.assert_allclose(got["y"], linear.expected({"x": x})["y"], rtol=1e-5,
                                   atol=1e-6)
    assert max(s.rows for s in b.stats) <= 8
    assert all(shape["x"][0] <= 8 for shape in linear.calls)
    assert max(s.rows for s in b.stats) > 3  # it did combine requests


def test_a_request_larger_than_max_batch_size_is_refused(linear, batchers):
    b = batchers(linear, max_batch_size=8)

    async def main():
        with pytest.raises(TensorError, match="batch of 9 rows.*at most 8") as err:
            b.submit({"x": np.zeros((9, 4), np.float32)}, None)
        assert http_status(err.value) == 400
        return await b.submit({"x": np.zeros((8, 4), np.float32)}, None)

    assert asyncio.run(main())["y"].shape == (8, 3)
    assert b.depth() == 0


def test_different_trailing_shapes_are_never_mixed(rowsum, batchers):
    b = batchers(rowsum, max_batch_size=64)
    rng = np.random.default_rng(3)
    lengths = [3, 5, 8, 1]
    xs = [_rows(rng, int(rng.integers(1, 3)), lengths[i % 4]) for i in range(160)]

    async def main():
        return await asyncio.gather(*[b.submit({"x": x}, None) for x in xs])

    for x, got in zip(xs, asyncio.run(main())):
        want = rowsum.expected({"x": x})
        np.testing.assert_allclose(got["s"], want["s"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["d"], want["d"])
    assert {shape["x"][1] for shape in rowsum.calls} == set(lengths)
    assert max(s.requests for s in b.stats) > 1
    # one length per run: the runner never saw a padded or mixed batch
    assert sum(shape["x"][0] for shape in rowsum.calls) == sum(len(x) for x in xs)


def test_different_dtypes_are_never_mixed(batchers):
    seen = []

    def run(inputs, outputs):
        seen.append(inputs["x"].dtype)
        return {"y": inputs["x"] * 2}

    b = batchers(run, max_batch_size=64)
    xs = [np.full((1, 2), i, np.float32 if i % 2 else np.float64) for i in range(40)]

    async def main():
        return await asyncio.gather(*[b.submit({"x": x}, None) for x in xs])

    for x, got in zip(xs, asyncio.run(main())):
        assert got["y"].dtype == x.dtype
        np.testing.assert_array_equal(got["y"], x * 2)


def _mean_batch(model: Model, batchers, delay_us: int) -> float:
    b = batchers(model, max_batch_size=64, max_queue_delay_us=delay_us)
    rng = np.random.default_rng(4)

    async def main():
        futures = []
        for _ in range(24):  # a request every ~millisecond: a steady trickle
            futures.append(b.submit({"x": _rows(rng, 1)}, None))
            await asyncio.sleep(0.001)
        return await asyncio.gather(*futures)

    assert len(asyncio.run(main())) == 24
    return sum(s.rows for s in b.stats) / len(b.stats)


def test_queue_delay_collects_fuller_batches(linear, batchers, tmp_path):
    other = Model(linear_onnx(4, 3), tmp_path / "again.onnx")
    eager = _mean_batch(linear, batchers, 0)
    patient = _mean_batch(other, batchers, 100_000)
    assert patient > eager, (patient, eager)
    assert patient >= 6


def test_a_full_batch_does_not_wait_for_the_delay(linear, batchers):
    b = batchers(linear, max_batch_size=4, max_queue_delay_us=5_000_000)

    async def main():
        started = time.perf_counter()
        got = await asyncio.gather(*[b.submit({"x": np.ones((1, 4), np.float32)}, None)
                                     for _ in range(4)])
        return got, time.perf_counter() - started

    got, took = asyncio.run(main())
    assert len(got) == 4 and took < 2.5
    assert [s.rows for s in b.stats] == [4]


def test_preferred_batch_sizes_cut_the_queue(linear, batchers):
    b = batchers(linear, max_batch_size=16, preferred_batch_sizes=[4])
    linear.gate = b._gate = threading.Event()
    rng = np.random.default_rng(5)

    async def main():
        first = b.submit({"x": _rows(rng, 1)}, None)
        await _until(linear.started)  # the instance holds the first request
        rest = [b.submit({"x": _rows(rng, 1)}, None) for _ in range(11)]
        assert b.depth() == 11
        linear.gate.set()
        return await asyncio.gather(first, *rest)

    assert len(asyncio.run(main())) == 12
    assert [s.rows for s in b.stats] == [1, 4, 4, 3]


def test_full_queue_raises_429(linear, batchers):
    b = batchers(linear, max_batch_size=4, max_queue_size=3)
    linear.gate = b._gate = threading.Event()

    async def main():
        first = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        await _until(linear.started)
        queued = [b.submit({"x": np.ones((1, 4), np.float32)}, None) for _ in range(3)]
        with pytest.raises(QueueFull) as err:
            b.submit({"x": np.ones((1, 4), np.float32)}, None)
        assert http_status(err.value) == 429 and err.value.retry_after_s >= 1
        assert "3 requests queued" in str(err.value)
        linear.gate.set()
        done = await asyncio.gather(first, *queued)
        again = await b.submit({"x": np.ones((1, 4), np.float32)}, None)  # room again
        return done, again

    done, again = asyncio.run(main())
    assert len(done) == 4 and again["y"].shape == (1, 3)


def test_queued_request_times_out_at_its_deadline(linear, batchers):
    """Even while every instance is busy: the client hears 504 at its deadline, not when an
    instance frees up."""
    b = batchers(linear, max_batch_size=4, timeout_s=30)
    linear.gate = b._gate = threading.Event()

    async def main():
        first = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        await _until(linear.started)
        late = b.submit({"x": np.ones((1, 4), np.float32)}, None, timeout_s=0.05)
        patient = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        started = time.perf_counter()
        try:
            with pytest.raises(RequestTimeout) as err:
                await asyncio.wait_for(late, 3)
        finally:
            linear.gate.set()
        waited = time.perf_counter() - started
        assert http_status(err.value) == 504 and "reached its timeout" in str(err.value)
        return waited, await first, await patient

    waited, first, patient = asyncio.run(main())
    assert waited < 2
    assert first["y"].shape == patient["y"].shape == (1, 3)
    assert sum(s.requests for s in b.stats) == 2  # the late one never ran


def test_deadline_passed_while_queued_fails_before_running(linear, batchers):
    b = batchers(linear, max_batch_size=4, timeout_s=0.05)
    linear.gate = b._gate = threading.Event()

    async def main():
        first = b.submit({"x": np.ones((1, 4), np.float32)}, None, timeout_s=0)
        await _until(linear.started)
        late = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        await asyncio.sleep(0.1)
        linear.gate.set()
        assert (await first)["y"].shape == (1, 3)  # timeout 0 = no limit
        with pytest.raises(RequestTimeout):
            await late

    asyncio.run(main())
    assert len(linear.calls) == 1


def test_a_failing_batch_fails_only_its_requests(linear, batchers):
    def run(inputs, outputs):
        if (inputs["x"] == 999).any():
            raise RuntimeError("kaboom in the kernel")
        return linear.runtime.predict(inputs, outputs)

    b = batchers(run, max_batch_size=8)
    bad = np.full((1, 4), 999, np.float32)

    async def main():
        with pytest.raises(ModelFailed, match="Model 'm' failed: kaboom in the kernel") as err:
            await b.submit({"x": bad}, None)
        assert http_status(err.value) == 500
        good = [np.full((1, 4), i, np.float32) for i in range(20)]
        return good, await asyncio.gather(*[b.submit({"x": x}, None) for x in good])

    good, results = asyncio.run(main())
    for x, got in zip(good, results):
        np.testing.assert_allclose(got["y"], linear.expected({"x": x})["y"], rtol=1e-5)


def test_the_runtime_s_own_user_errors_keep_their_status(batchers):
    class Refused(OptiserveError):
        status = 422

    def run(inputs, outputs):
        raise Refused("not this one")

    b = batchers(run, max_batch_size=8)

    async def main():
        with pytest.raises(Refused):
            await b.submit({"x": np.zeros((1, 2), np.float32)}, None)

    asyncio.run(main())


def test_outputs_that_are_not_per_row_fail_a_batch_of_several(batchers):
    gate, started = threading.Event(), threading.Event()

    def run(inputs, outputs):
        started.set()
        gate.wait(10)
        return {"total": np.asarray(inputs["x"].sum())}

    b = batchers(run, max_batch_size=8)
    b._gate = gate

    async def main():
        first = b.submit({"x": np.ones((2, 2), np.float32)}, None)
        await _until(started)
        pair = [b.submit({"x": np.ones((1, 2), np.float32)}, None) for _ in range(2)]
        gate.set()
        assert (await first)["total"] == 4  # alone: its output is whatever the model says
        for f in pair:
            with pytest.raises(ModelFailed, match="not one row per input row"):
                await f

    asyncio.run(main())


def test_no_batching_runs_each_request_alone(linear, batchers):
    b = batchers(linear, max_batch_size=0)
    xs = [np.full((3, 4), i, np.float32) for i in range(10)]

    async def main():
        return await asyncio.gather(*[b.submit({"x": x}, None) for x in xs])

    for x, got in zip(xs, asyncio.run(main())):
        np.testing.assert_allclose(got["y"], linear.expected({"x": x})["y"], rtol=1e-5)
    assert [shape["x"] for shape in linear.calls] == [(3, 4)] * 10


def test_instances_run_in_parallel(linear, batchers):
    """One instance busy on a long batch does not hold up the next request."""
    gate, calls = threading.Event(), []

    def run(inputs, outputs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            gate.wait(10)
        return linear.runtime.predict(inputs, outputs)

    b = batchers(run, runners=2, max_batch_size=4)
    b._gate = gate

    async def main():
        slow = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        while not calls:
            await asyncio.sleep(0.001)
        quick = await asyncio.wait_for(b.submit({"x": np.ones((1, 4), np.float32)}, None), 5)
        assert not slow.done()
        gate.set()
        return await slow, quick

    slow, quick = asyncio.run(main())
    np.testing.assert_array_equal(slow["y"], quick["y"])
    assert len(set(calls)) == 2


def test_close_with_drain_finishes_queued_work(linear, batchers):
    b = batchers(linear, max_batch_size=2)
    linear.gate = b._gate = threading.Event()

    async def main():
        first = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        await _until(linear.started)
        queued = [b.submit({"x": np.full((1, 4), i, np.float32)}, None) for i in range(5)]
        closing = asyncio.ensure_future(asyncio.to_thread(b.close, True))
        await asyncio.sleep(0.05)
        with pytest.raises(ModelUnavailable, match="being unloaded") as err:
            b.submit({"x": np.ones((1, 4), np.float32)}, None)
        assert http_status(err.value) == 503
        linear.gate.set()
        await closing
        return await asyncio.gather(first, *queued)

    assert [r["y"].shape for r in asyncio.run(main())] == [(1, 3)] * 6
    assert b.depth() == 0


def test_close_without_drain_fails_queued_work(linear, batchers):
    b = batchers(linear, max_batch_size=2)
    linear.gate = b._gate = threading.Event()

    async def main():
        first = b.submit({"x": np.ones((1, 4), np.float32)}, None)
        await _until(linear.started)
        queued = [b.submit({"x": np.ones((1, 4), np.float32)}, None) for _ in range(5)]
        closing = asyncio.ensure_future(asyncio.to_thread(b.close, False))
        for f in queued:
            with pytest.raises(ModelUnavailable, match="was unloaded"):
                await asyncio.wait_for(f, 5)
        linear.gate.set()
        await closing
        return await first  # the batch already running finishes

    assert asyncio.run(main())["y"].shape == (1, 3)
    assert len(linear.calls) == 1


def test_a_fast_model_runs_on_the_loop_when_idle(linear, batchers):
    """Once a model is known to compute faster than `inline_below_s`, a request that finds
    nothing queued and an instance idle runs on the event loop (no thread hand-off); a slower
    model, or one deployed with a queue delay, always goes through the instance threads."""
    rng = np.random.default_rng(7)
    xs = [_rows(rng, 1) for _ in range(6)]

    def serve(**kw) -> tuple[list[str], str]:
        threads: list[str] = []

        def run(inputs, outputs):
            threads.append(threading.current_thread().name)
            return linear.run(inputs, outputs)

        b = batchers(run, max_batch_size=64, **kw)

        async def main():
            for x in xs:
                got = await b.submit({"x": x}, None)
                np.testing.assert_allclose(got["y"], linear.expected({"x": x})["y"],
                                           rtol=1e-5, atol=1e-6)
            return threading.current_thread().name

        return threads, asyncio.run(main())

    threads, loop_thread = serve(inline_below_s=60.0)  # any model counts as fast
    assert threads[0].startswith("optiserve-m-")       # nothing measured yet: a thread
    assert set(threads[1:]) == {loop_thread}           # then, idle and fast: inline
    threads, _ = serve(inline_below_s=0.0)             # no model is that fast
    assert all(t.startswith("optiserve-m-") for t in threads)
    threads, _ = serve(inline_below_s=60.0, max_queue_delay_us=1)  # a delay asks for batches
    assert all(t.startswith("optiserve-m-") for t in threads)
