"""Shared fixtures: an isolated OPTISERVE_HOME per test, registries on SQLite and PostgreSQL,
and tiny real models (scikit-learn on breast cancer, a torch MLP on digits).

Heavy frameworks are imported inside the fixtures that need them, so the fast unit tests never
pay for torch or scikit-learn.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# Read once, before any test clears the environment.
PG_URL = os.environ.get("OPTISERVE_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Variables optiserve reads; each test starts without them (the developer's shell must not leak).
_SEED_VARS = ("OPTIMIZATION_MAX_TIME_MINUTES", "OPTIMIZATION_ACCURACY_THRESHOLD",
              "TENSORRT_WORKSPACE_SIZE_GB", "ONNX_OPSET_VERSION")
_REGISTRY_TABLES = ("optimization_runs", "deployments", "model_versions", "artifacts", "models",
                    "api_keys")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where an NVIDIA GPU is found; elsewhere they are skipped."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    from optiserve.core.hardware import detect

    if detect().cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi lists none here)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def optiserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh OPTISERVE_HOME, a clean environment and a private temp dir for every test."""
    for key in list(os.environ):
        if key == "OPTISERVE_CPU_FLAGS":  # describes the (emulated) CPU, not a user's setting
            continue
        if key.startswith("OPTISERVE_") or key in _SEED_VARS:
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("OPTISERVE_HOME", str(home))
    # Scratch files (registration temp dirs, the remote-artifact cache) stay under tmp_path.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return home


@pytest.fixture
def settings(optiserve_home: Path):
    """Settings read from the (isolated) environment; one thread keeps timings steady."""
    from optiserve.core.settings import load_settings

    return load_settings(threads=1)


# -- PostgreSQL ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_database_url() -> str:
    """A fresh database on the test server for this session, dropped at the end."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(PG_URL)
    shown = server.render_as_string(hide_password=True)
    try:
        admin = create_engine(server, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # no driver, no server, refused login: all mean "cannot test"
        pytest.skip(f"PostgreSQL not reachable at {shown} (OPTISERVE_TEST_POSTGRES_URL): "
                    f"{str(exc).splitlines()[0][:200]}")
    name = f"optiserve_test_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_database_url: str) -> str:
    """The session database, emptied: every test starts with no models, versions or runs."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(pg_database_url)
    try:
        with engine.begin() as conn:
            present = set(inspect(conn).get_table_names())
            tables = [t for t in _REGISTRY_TABLES if t in present]
            if tables:
                conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return pg_database_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, optiserve_home: Path) -> str:
    """The registry database URL, once per backend."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{optiserve_home / 'registry.db'}"


@pytest.fixture
def registry(settings, registry_url: str):
    """A Registry on each backend, artifacts in OPTISERVE_HOME/artifacts."""
    from optiserve.registry import Registry

    reg = Registry(settings, database_url=registry_url)
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(settings):
    """A Registry on the default embedded SQLite (for the slower end-to-end tests)."""
    from optiserve.registry import Registry

    reg = Registry(settings)
    yield reg
    reg.close()


# -- scikit-learn -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def breast_cancer() -> SimpleNamespace:
    """Breast cancer (30 float64 features, binary), shuffled with a fixed seed, 400/169 split."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    return SimpleNamespace(X_train=X[:400], y_train=y[:400], X_val=X[400:], y_val=y[400:])


@pytest.fixture(scope="session")
def logreg(breast_cancer):
    from sklearn.linear_model import LogisticRegression

    # liblinear converges on the unscaled features in milliseconds (lbfgs needs seconds).
    return LogisticRegression(solver="liblinear").fit(breast_cancer.X_train, breast_cancer.y_train)


@pytest.fixture(scope="session")
def forest(breast_cancer):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=50, random_state=0).fit(
        breast_cancer.X_train, breast_cancer.y_train)


# -- torch --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def digits() -> SimpleNamespace:
    """8x8 digits as 64 float32 features in [0, 1], 1400/397 split."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return SimpleNamespace(X_train=X[:1400], y_train=y[:1400].astype(np.int64),
                           X_val=X[1400:], y_val=y[1400:].astype(np.int64))


@pytest.fixture(scope="session")
def digits_net(digits):
    """A 64-128-10 MLP: random ReLU features with a least-squares readout.

    Solved in closed form rather than trained with autograd: deterministic and instant, and
    accurate enough (~90 %) for a classification gate to mean something.
    """
    torch = pytest.importorskip("torch")

    class DigitsNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(64, 128)
            self.out = torch.nn.Linear(128, 10)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    torch.manual_seed(0)
    net = DigitsNet().eval()
    with torch.no_grad():
        h = torch.relu(net.hidden(torch.from_numpy(digits.X_train))).numpy().astype(np.float64)
        h1 = np.hstack([h, np.ones((len(h), 1))])
        onehot = np.eye(10)[digits.y_train]
        w = np.linalg.solve(h1.T @ h1 + 1e-2 * np.eye(h1.shape[1]), h1.T @ onehot)
        net.out.weight.copy_(torch.from_numpy(w[:-1].T.astype(np.float32)))
        net.out.bias.copy_(torch.from_numpy(w[-1].astype(np.float32)))
    return net
