"""`import optiserve` (and the Python API module) must stay light: no heavy framework loads."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "tensorflow", "sklearn", "xgboost", "lightgbm", "openvino", "ray",
         "transformers")


def _loaded_after(statement: str) -> list[str]:
    code = (f"import sys, json\n{statement}\n"
            f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_optiserve_and_api_loads_no_heavy_framework():
    assert _loaded_after("import optiserve, optiserve.api") == []


def test_lazy_attributes_resolve_without_heavy_frameworks():
    # The lazy names on the package root (Registry, optimize, ...) are part of the light core.
    loaded = _loaded_after("import optiserve\n"
                           "optiserve.Registry, optiserve.optimize, optiserve.load_settings")
    assert loaded == []


def test_unknown_attribute_on_package_root_is_an_attribute_error():
    import optiserve

    try:
        optiserve.not_a_thing  # noqa: B018
    except AttributeError as exc:
        assert "not_a_thing" in str(exc)
    else:
        raise AssertionError("optiserve.not_a_thing did not raise AttributeError")


def test_the_server_and_its_job_worker_load_no_heavy_framework():
    loaded = _loaded_after("import optiserve.server.app, optiserve.jobs.worker\n"
                           "optiserve.server.app.create_app")
    assert loaded == []
