"""Deployments in the registry, on SQLite and on a real PostgreSQL: create, replace, list,
remove; the spec's validation; and a deployed model that cannot be deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from optiserve.core.errors import ConfigError, ConflictError, ModelNotFound
from optiserve.registry import Registry
from optiserve.registry.deployments import DeploymentNotFound, DeploymentSpec, parse_spec
from optiserve.server.errors import http_status
from tests.builders import linear_onnx, save_onnx
from tests.registry.fakes import SIG


@pytest.fixture
def reg(registry: Registry, tmp_path: Path):
    """The registry on each backend with model 'm' (one version) and no deployments. The
    PostgreSQL fixture empties the model tables between tests but not 'deployments', so this
    starts and ends with none."""

    def clear() -> None:
        for d in registry.deployments.list():
            registry.deployments.remove(d.name)

    clear()
    path = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    registry.add_version("m", path, framework="onnx", format="onnx", signature=SIG)
    yield registry
    clear()


def test_put_get_list_and_remove(reg):
    spec = parse_spec({"model": "m", "max_batch_size": 16, "preferred_batch_sizes": [8, 16],
                       "versions": {"specific": [1]}, "instances": 2})
    created = reg.deployments.put("fast", spec)
    assert created.name == "fast" and created.spec == spec
    assert created.created_at is not None and created.created_at.tzinfo is not None
    reg.deployments.put("alpha", parse_spec({"model": "m"}))

    got = reg.deployments.get("fast")
    assert got.spec == spec  # the JSON column gives the same validated spec back
    assert got.spec.versions.specific == [1] and got.spec.versions.latest is None
    assert [d.name for d in reg.deployments.list()] == ["alpha", "fast"]

    replaced = reg.deployments.put("fast", parse_spec({"model": "m", "max_batch_size": 4}))
    assert replaced.spec.max_batch_size == 4 and replaced.spec.instances == 1
    assert replaced.created_at == created.created_at
    assert replaced.updated_at >= created.updated_at
    assert reg.deployments.get("fast").spec.preferred_batch_sizes == []

    removed = reg.deployments.remove("fast")
    assert removed.name == "fast" and removed.spec.max_batch_size == 4
    with pytest.raises(DeploymentNotFound, match="No deployment 'fast'") as err:
        reg.deployments.get("fast")
    assert http_status(err.value) == 404 and "alpha" in str(err.value)
    assert "optiserve deploy fast" in str(err.value)
    with pytest.raises(DeploymentNotFound, match="alpha"):
        reg.deployments.remove("fast")
    assert [d.name for d in reg.deployments.list()] == ["alpha"]


def test_a_deployment_needs_a_registered_model(reg):
    with pytest.raises(ModelNotFound, match="No model 'ghost'") as err:
        reg.deployments.put("ghost", parse_spec({"model": "ghost"}))
    assert "m" in str(err.value)  # the known models
    assert reg.deployments.list() == []


@pytest.mark.parametrize("name", ["", "has space", "../x", "-dash", "a" * 129])
def test_deployment_names_are_checked(reg, name):
    with pytest.raises(ConfigError, match="not allowed"):
        reg.deployments.put(name, parse_spec({"model": "m"}))
    assert reg.deployments.list() == []


def test_a_deployed_model_cannot_be_deleted(reg, tmp_path):
    reg.deployments.put("a", parse_spec({"model": "m"}))
    reg.deployments.put("b", parse_spec({"model": "m", "max_batch_size": 0}))
    other = save_onnx(linear_onnx(seed=1), tmp_path / "n.onnx")
    reg.add_version("n", other, framework="onnx", format="onnx", signature=SIG)

    with pytest.raises(ConflictError, match="served by deployment a, b") as err:
        reg.delete_model("m")
    assert http_status(err.value) == 409
    assert "optiserve undeploy a" in str(err.value)
    assert [v.version for v in reg.versions("m")] == [1]  # nothing went
    assert reg.path(reg.get("m")).is_file()

    assert reg.delete_model("n") == 1  # a model nobody serves still goes
    reg.deployments.remove("a")
    with pytest.raises(ConflictError, match="deployment b"):
        reg.delete_model("m")
    reg.deployments.remove("b")
    assert reg.delete_model("m") == 1
    with pytest.raises(ModelNotFound):
        reg.get("m")


def test_a_deployment_moved_to_another_model_frees_the_first(reg, tmp_path):
    other = save_onnx(linear_onnx(seed=1), tmp_path / "n.onnx")
    reg.add_version("n", other, framework="onnx", format="onnx", signature=SIG)
    reg.deployments.put("prod", parse_spec({"model": "m"}))
    reg.deployments.put("prod", parse_spec({"model": "n"}))
    assert reg.delete_model("m") == 1
    with pytest.raises(ConflictError, match="prod"):
        reg.delete_model("n")


# -- the spec ---------------------------------------------------------------------------------
def test_spec_defaults():
    spec = parse_spec({"model": "m"})
    assert spec.versions.latest == 1 and spec.versions.specific is None
    assert (spec.max_batch_size, spec.max_queue_delay_us, spec.max_queue_size,
            spec.timeout_ms, spec.instances, spec.allow_nan) == (64, 0, 1024, 30_000, 1, False)
    assert spec.versions.describe() == "latest 1"
    assert parse_spec({"model": "m", "versions": {"specific": [2, 3]}}
                      ).versions.describe() == "versions 2, 3"


@pytest.mark.parametrize("data, needle", [
    ({"model": "m", "max_batch_size": 8, "preferred_batch_sizes": [4, 16]},
     "preferred batch size 16 is outside 1..max_batch_size"),
    ({"model": "m", "preferred_batch_sizes": [0]}, "preferred batch size 0"),
    ({"model": "m", "versions": {"latest": 2, "specific": [1]}},
     "either 'latest' or 'specific', not both"),
    ({"model": "m", "versions": {"specific": []}}, "'versions.specific'"),
    ({"model": "m", "versions": {"latest": 0}}, "'versions.latest'"),
    ({"model": "m", "versions": {"newest": 1}}, "'versions.newest'"),
    ({"model": "m", "max_batch_size": -1}, "'max_batch_size'"),
    ({"model": "m", "max_batch_size": 5000}, "'max_batch_size'"),
    ({"model": "m", "max_queue_size": 0}, "'max_queue_size'"),
    ({"model": "m", "instances": 0}, "'instances'"),
    ({"model": "m", "timeout_ms": -5}, "'timeout_ms'"),
    ({"model": "m", "max_batch_sise": 3}, "'max_batch_sise'"),
    ({"max_batch_size": 3}, "'model'"),
    ({"model": "m", "allow_nan": "perhaps"}, "'allow_nan'"),
])
def test_spec_validation_names_the_field(data, needle):
    with pytest.raises(ConfigError, match="is invalid") as err:
        parse_spec(data)
    assert needle in str(err.value)
    assert http_status(err.value) == 400


def test_preferred_sizes_without_batching_are_allowed():
    assert parse_spec({"model": "m", "max_batch_size": 0, "preferred_batch_sizes": [8]}
                      ).preferred_batch_sizes == [8]


@pytest.mark.parametrize("instances, threads, cores, want", [
    (1, None, 8, 8), (3, None, 8, 2), (4, None, 1, 1), (2, 6, 4, 6), (16, None, 8, 1)])
def test_threads_per_instance_split_the_cores(instances, threads, cores, want):
    spec = DeploymentSpec(model="m", instances=instances, threads=threads)
    assert spec.threads_per_instance(cores) == want


def test_specs_are_frozen():
    spec = parse_spec({"model": "m"})
    with pytest.raises(Exception):
        spec.max_batch_size = 3  # type: ignore[misc]
    assert spec == parse_spec({"model": "m", "versions": {"latest": 1}})
