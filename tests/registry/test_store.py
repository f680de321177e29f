"""The artifact store: local folder and fsspec (memory://) stores, used through the Registry."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest

from optiserve.registry import Registry
from optiserve.registry.store import ArtifactStore, sha256_file
from tests.builders import linear_onnx, save_onnx
from tests.registry.fakes import SIG, FailingInsertRegistry

fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def memory_url():
    """A private root on fsspec's process-wide memory filesystem, removed afterwards."""
    root = f"/optiserve-test-{secrets.token_hex(6)}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _memory_files(url: str) -> list[str]:
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    return fs.find(root) if fs.exists(root) else []


def test_local_put_is_content_addressed(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    src = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    uri, sha, size = store.put(src, ".onnx")
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest() and size == src.stat().st_size
    assert Path(uri) == (tmp_path / "store" / sha[:2] / f"{sha}.onnx").resolve()
    assert store.put(src, ".onnx") == (uri, sha, size)  # idempotent
    assert not list((tmp_path / "store").rglob(".tmp-*"))  # no temporary left behind
    store.delete(uri)
    assert not Path(uri).exists()
    store.delete(uri)  # deleting twice is harmless


def test_sha256_file_streams(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"ab" * (1 << 20) + b"c")  # more than one 1 MiB chunk
    assert sha256_file(big) == (hashlib.sha256(big.read_bytes()).hexdigest(), 2 * (1 << 20) + 1)


def test_memory_store_via_artifact_url_setting(monkeypatch, tmp_path, memory_url):
    from optiserve.core.settings import load_settings

    monkeypatch.setenv("OPTISERVE_ARTIFACT_URL", memory_url)
    reg = Registry(load_settings(threads=1))
    try:
        src = save_onnx(linear_onnx(), tmp_path / "m.onnx")
        v = reg.add_version("m", src, framework="onnx", format="onnx", signature=SIG)
        assert v.uri.startswith("memory://") and v.sha256 in v.uri
        assert len(_memory_files(memory_url)) == 1
        local = reg.path(reg.get("m"))
        assert local.read_bytes() == src.read_bytes()
        assert tmp_path in local.parents  # the download cache honours the temp dir
    finally:
        reg.close()


def test_memory_store_via_artifact_url_argument(settings, registry_url, tmp_path, memory_url):
    reg = Registry(settings, database_url=registry_url, artifact_url=memory_url)
    try:
        src = save_onnx(linear_onnx(seed=3), tmp_path / "m.onnx")
        v1 = reg.add_version("m", src, framework="onnx", format="onnx", signature=SIG)
        v2 = reg.add_version("m", src, framework="onnx", format="onnx", signature=SIG)
        assert (v1.version, v2.version) == (1, 2) and v1.uri == v2.uri
        assert len(_memory_files(memory_url)) == 1
        assert sha256_file(reg.path(v2))[0] == v1.sha256
    finally:
        reg.close()


def test_memory_store_failed_insert_leaves_no_object(settings, registry_url, tmp_path,
                                                     memory_url):
    reg = FailingInsertRegistry(settings, database_url=registry_url, artifact_url=memory_url)
    try:
        src = save_onnx(linear_onnx(), tmp_path / "m.onnx")
        with pytest.raises(RuntimeError):
            reg.add_version("m", src, framework="onnx", format="onnx", signature=SIG)
        assert reg.stored_before_insert is True
        assert _memory_files(memory_url) == []
        assert reg.models() == []
    finally:
        reg.close()


def test_remote_cache_is_checked_by_hash(tmp_path, memory_url):
    """A file planted in the local cache under an artifact's hash is not trusted."""
    from optiserve.core.errors import ModelLoadError

    store = ArtifactStore(memory_url, cache_dir=tmp_path / "cache")
    src = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    uri, sha, _ = store.put(src, ".onnx")
    first = store.local_path(uri, sha)
    first.write_bytes(b"planted")  # tampered cache entry
    again = store.local_path(uri, sha)
    assert sha256_file(again)[0] == sha  # fetched anew from the store
    fsspec.filesystem("memory").pipe_file(uri.split("://", 1)[1], b"changed")
    again.unlink()
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        store.local_path(uri, sha)
