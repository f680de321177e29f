"""The registry on SQLite and on a real PostgreSQL: versions, immutability, lineage, atomicity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from optiserve.core.errors import ConfigError, ModelNotFound
from optiserve.core.types import Signature, TensorSpec
from optiserve.registry import Registry
from tests.builders import files_under, linear_onnx, save_onnx
from tests.registry.fakes import SIG, FailingInsertRegistry


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return save_onnx(linear_onnx(seed=0), tmp_path / "linear.onnx")


@pytest.fixture
def other_file(tmp_path: Path) -> Path:
    return save_onnx(linear_onnx(seed=1), tmp_path / "linear2.onnx")


def _add(reg: Registry, name: str, path: Path, **kw):
    return reg.add_version(name, path, framework="onnx", format="onnx", signature=SIG, **kw)


def test_versions_increment_per_model(registry, model_file, other_file):
    assert [_add(registry, "a", model_file).version for _ in range(3)] == [1, 2, 3]
    assert _add(registry, "b", other_file).version == 1
    models = {m.name: m for m in registry.models()}
    assert sorted(models) == ["a", "b"]
    assert [v.version for v in models["a"].versions] == [1, 2, 3]
    assert models["a"].latest.version == 3


def test_reregistering_creates_a_new_immutable_version(registry, model_file, other_file):
    v1 = _add(registry, "m", model_file)
    v2 = _add(registry, "m", other_file, meta={"note": "retrained"})
    again = registry.get("m", 1)
    assert (again.sha256, again.uri, again.meta) == (v1.sha256, v1.uri, v1.meta)
    assert v2.version == 2 and v2.sha256 != v1.sha256
    assert Path(registry.path(again)).read_bytes() == model_file.read_bytes()
    assert registry.get("m").version == 2


def test_sha256_and_size_match_the_file(registry, model_file):
    v = _add(registry, "m", model_file)
    data = model_file.read_bytes()
    assert v.sha256 == hashlib.sha256(data).hexdigest()
    assert v.size_bytes == len(data)
    stored = registry.path(v)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == v.sha256
    assert v.artifact_id == "m-v1" and v.ref == "m:1"


def test_identical_bytes_are_stored_once(registry, model_file):
    v1, v2 = _add(registry, "m", model_file), _add(registry, "m", model_file)
    assert v1.uri == v2.uri and v1.artifact_id != v2.artifact_id
    assert len(files_under(registry.store.root)) == 1


def test_signature_meta_and_metrics_round_trip(registry, model_file):
    sig = Signature(
        inputs=(TensorSpec(name="ids", dtype="int64", shape=(-1, 128)),
                TensorSpec(name="mask", dtype="int64", shape=(-1, 128))),
        outputs=(TensorSpec(name="label", dtype="str", shape=(-1,)),))
    registry.add_version("m", model_file, framework="sklearn", format="onnx", signature=sig,
                         meta={"classes": ["no", "yes"]}, metrics={"accuracy": 0.9})
    back = registry.get("m")
    assert back.signature == sig
    assert back.signature.input("mask").shape == (-1, 128)
    assert back.meta == {"classes": ["no", "yes"]} and back.metrics == {"accuracy": 0.9}
    assert back.framework == "sklearn" and back.format == "onnx"


def test_lineage_parent_and_passes(registry, model_file, other_file):
    _add(registry, "m", model_file)
    passes = [{"name": "quantization", "config": {"per_channel": True},
               "set": {"per_channel": True}}]
    child = _add(registry, "m", other_file, parent=1, passes=passes)
    assert child.parent == 1 and child.passes == passes
    back = registry.get("m", 2)
    assert back.parent == 1 and back.passes == passes
    assert registry.original(back).version == 1
    assert registry.get("m", 1).parent is None


def test_get_returns_latest_ready_not_rejected(registry, model_file, other_file):
    _add(registry, "m", model_file)
    rejected = _add(registry, "m", other_file, status="rejected")
    assert rejected.status == "rejected"
    assert registry.get("m").version == 1
    assert registry.get("m", 2).status == "rejected"  # still reachable by number
    assert registry.resolve("m:2").version == 2 and registry.resolve("m").version == 1
    assert registry.models()[0].latest.version == 1


def test_model_not_found_lists_known_models(registry, model_file):
    _add(registry, "alpha", model_file)
    _add(registry, "beta", model_file)
    with pytest.raises(ModelNotFound) as info:
        registry.get("gamma")
    assert "gamma" in str(info.value) and "Known models: alpha, beta." in str(info.value)
    with pytest.raises(ModelNotFound, match="version 7"):
        registry.get("alpha", 7)


def test_only_rejected_versions_message_says_so(registry, model_file):
    _add(registry, "m", model_file, status="rejected")
    with pytest.raises(ModelNotFound) as info:
        registry.get("m")
    assert "rejected" in str(info.value)


def test_resolve_rejects_non_numeric_version(registry, model_file):
    _add(registry, "m", model_file)
    with pytest.raises(ConfigError, match="not a number"):
        registry.resolve("m:latest")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "has space", "a/b", "x" * 129,
                                  "semi;colon"])
def test_invalid_model_name_is_a_config_error(registry, model_file, name):
    with pytest.raises(ConfigError, match="not allowed"):
        _add(registry, name, model_file)
    assert registry.models() == []
    assert files_under(registry.store.root) == []


@pytest.mark.parametrize("name", ["a", "Churn_v2", "bert-base.int8", "9lives"])
def test_valid_model_names(registry, model_file, name):
    assert _add(registry, name, model_file).model == name


def test_failed_insert_leaves_no_row_and_no_file(settings, registry_url, model_file):
    reg = FailingInsertRegistry(settings, database_url=registry_url)
    try:
        with pytest.raises(RuntimeError, match="database went away"):
            _add(reg, "m", model_file)
        assert reg.stored_before_insert is True  # the failure really came after the put
        assert reg.models() == []
        assert files_under(reg.store.root) == []
        with pytest.raises(ModelNotFound):
            reg.get("m")
    finally:
        reg.close()


def test_failed_insert_keeps_a_file_another_version_uses(settings, registry, registry_url,
                                                         model_file):
    kept = _add(registry, "a", model_file)
    reg = FailingInsertRegistry(settings, database_url=registry_url)
    try:
        with pytest.raises(RuntimeError):
            _add(reg, "b", model_file)  # same bytes -> same content-addressed file
    finally:
        reg.close()
    assert [m.name for m in registry.models()] == ["a"]
    assert registry.path(kept).read_bytes() == model_file.read_bytes()


def test_optimization_runs_round_trip(registry):
    run_id = registry.runs.create("m", {"model_id": "m", "optimizations": ["quantization"]})
    assert registry.runs.get(run_id)["status"] == "running"
    assert registry.runs.finish(run_id, "completed", report={"status": "completed", "n": 3})
    row = registry.runs.get(run_id)
    assert row["status"] == "completed" and row["report"] == {"status": "completed", "n": 3}
    assert row["request"]["optimizations"] == ["quantization"] and row["error"] is None
    # an ended run is never overwritten by a late writer
    assert not registry.runs.finish(run_id, "failed", error="late")
    assert registry.runs.get(run_id)["status"] == "completed"
    failed = registry.runs.create("m", {})
    registry.runs.finish(failed, "failed", error="x" * 5000)
    assert len(registry.runs.get(failed)["error"]) == 2000


def test_created_at_is_timezone_aware(registry, model_file):
    added = _add(registry, "m", model_file)
    assert added.created_at.tzinfo is not None
    assert registry.get("m").created_at.tzinfo is not None
    assert registry.get("m").created_at == added.created_at


def test_database_url_from_environment(monkeypatch, optiserve_home, registry_url, model_file):
    from optiserve.core.settings import load_settings

    monkeypatch.setenv("OPTISERVE_DATABASE_URL", registry_url)
    reg = Registry(load_settings())
    try:
        assert reg.url == registry_url
        assert _add(reg, "m", model_file).version == 1
        assert Path(reg.store.root) == optiserve_home / "artifacts"
    finally:
        reg.close()


def test_migrations_are_idempotent(settings, registry_url, model_file):
    first = Registry(settings, database_url=registry_url)
    _add(first, "m", model_file)
    first.close()
    second = Registry(settings, database_url=registry_url)  # runs the migrations again
    try:
        assert second.get("m").version == 1
    finally:
        second.close()
