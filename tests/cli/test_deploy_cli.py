"""`optiserve deploy / deployments / undeploy` as a user runs them: a real process, real exit
codes, one readable line per mistake, and the registry holding what was deployed."""

from __future__ import annotations

import json

import pytest

from optiserve.api import register
from tests.builders import linear_onnx, save_onnx
from tests.cli.test_cli import cli, one_line_error

pytestmark = pytest.mark.slow


@pytest.fixture
def two_versions(tmp_path, sqlite_registry):
    """Model 'm' with versions 1 and 2 in the registry the CLI processes use."""
    for seed in (0, 1):
        register("m", save_onnx(linear_onnx(4, 2, seed=seed), tmp_path / f"m{seed}.onnx"),
                 registry=sqlite_registry)
    return sqlite_registry


def test_deploy_list_and_undeploy(two_versions, optiserve_home):
    proc = cli("deploy", "m", "--versions", "latest:2", "--max-batch-size", "8",
               "--preferred-batch-size", "4,8", "--max-queue-delay-us", "500", "--threads", "1",
               "--json", home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["name"] == "m" and out["versions"] == ["1", "2"]
    spec = out["spec"]
    assert spec["model"] == "m" and spec["versions"] == {"latest": 2, "specific": None}
    assert (spec["max_batch_size"], spec["preferred_batch_sizes"],
            spec["max_queue_delay_us"], spec["threads"]) == (8, [4, 8], 500, 1)

    proc = cli("deploy", "old", "--model", "m", "--versions", "1", "--max-batch-size", "0",
               home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    assert "deployed old <- m:1" in proc.stderr and "max batch 0" in proc.stderr

    listed = json.loads(cli("deployments", "--json", home=optiserve_home).stdout)
    assert [(d["name"], d["model"], d["versions"]) for d in listed] == [
        ("m", "m", {"latest": 2, "specific": None}), ("old", "m", {"latest": None,
                                                               "specific": [1]})]

    # the registry refuses to delete a deployed model
    from optiserve.core.errors import ConflictError
    with pytest.raises(ConflictError, match="served by deployment m, old"):
        two_versions.delete_model("m")

    proc = cli("undeploy", "old", home=optiserve_home)
    assert proc.returncode == 0 and "removed deployment old" in proc.stderr
    assert [d.name for d in two_versions.deployments.list()] == ["m"]
    two_versions.deployments.remove("m")
    assert two_versions.delete_model("m") == 2


def test_settings_from_a_file_and_set_are_the_rest_body(two_versions, optiserve_home, tmp_path):
    """--config holds the body of PUT /api/v1/deployments/NAME; --set and flags go over it."""
    (tmp_path / "m.yaml").write_text(
        "versions: {specific: [1]}\nmax_batch_size: 16\ninstances: 2\n"
        "predict: {softmax: true, labels: [a, b]}\n")
    proc = cli("deploy", "m", "--config", str(tmp_path / "m.yaml"), "--max-batch-size", "8",
               "--set", "predict.top_k=1", "--set", "threads=1", "--json", home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert (spec["versions"]["specific"], spec["max_batch_size"], spec["instances"],
            spec["threads"]) == ([1], 8, 2, 1)
    assert (spec["predict"]["softmax"], spec["predict"]["labels"], spec["predict"]["top_k"]) \
        == (True, ["a", "b"], 1)


@pytest.mark.parametrize("args, needle", [
    (("deploy", "ghost"), "No model 'ghost'"),
    (("deploy", "m", "--versions", "latest:x"), "comma-separated integers"),
    (("deploy", "m", "--set", "max_batch_size"), "is not KEY=VALUE"),
    (("deploy", "m", "--set", "max_batch_size=-3"), "max_batch_size"),
    (("deploy", "m", "--config", "/nonexistent/m.yaml"), "Cannot read"),
    (("undeploy", "ghost"), "No deployment 'ghost'"),
])
def test_user_mistakes_are_one_line_and_exit_2(two_versions, optiserve_home, args, needle):
    proc = cli(*args, home=optiserve_home)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert needle in one_line_error(proc)
    assert two_versions.deployments.list() == []  # nothing was stored
