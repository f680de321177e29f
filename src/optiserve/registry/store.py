"""Artifact store: a local folder by default, any fsspec URL (s3://, memory://) otherwise.

Writes are atomic: bytes go to a temporary name beside the target and are renamed into place
(local) or put in one call (object stores), so a reader never sees half a file. Paths are
content-addressed by sha256, so identical artifacts are stored once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from optiserve.core.deps import require
from optiserve.core.errors import ModelLoadError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class ArtifactStore:
    """Put, fetch and delete artifact files by content hash."""

    def __init__(self, location: str, cache_dir: Path):
        self.location = location
        self.local = "://" not in location or location.startswith("file://")
        self._cache = cache_dir  # remote artifacts are fetched here, checked by sha256
        if self.local:
            self.root = Path(location.removeprefix("file://"))
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            fsspec = require("fsspec", extra="s3", feature=f"Artifact store at {location}")
            self.fs, self.root_path = fsspec.core.url_to_fs(location)

    def _key(self, sha: str, suffix: str, folder: str) -> str:
        return f"{folder or sha[:2]}/{sha}{suffix}"

    def put(self, src: str | Path, suffix: str, folder: str = "") -> tuple[str, str, int]:
        """Store a file in `folder` (default: by the first two hex digits of its hash);
        returns (uri, sha256, size). Safe to call twice with the same bytes."""
        sha, size = sha256_file(src)
        key = self._key(sha, suffix, folder)
        if self.local:
            dest = self.root / key
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=suffix)
                os.close(fd)
                try:
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dest)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return str(dest.resolve()), sha, size
        dest = f"{self.root_path.rstrip('/')}/{key}"
        if not self.fs.exists(dest):
            self.fs.put_file(str(src), dest)
        return f"{self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol}://{dest}", sha, size

    def local_path(self, uri: str, sha: str) -> Path:
        """A local path holding the artifact (downloaded to a cache for remote stores)."""
        if self.local:
            return Path(uri)
        target = self._cache / sha[:2] / (sha + Path(uri).suffix)
        if target.exists() and sha256_file(target)[0] == sha:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        self.fs.get_file(uri.split("://", 1)[1], str(tmp))
        if sha256_file(tmp)[0] != sha:
            os.unlink(tmp)
            raise ModelLoadError(uri, "the stored artifact does not match its sha256",
                                 hint="The artifact store was changed outside optiserve.")
        os.replace(tmp, target)
        return target

    def exists(self, uri: str) -> bool:
        return Path(uri).exists() if self.local else self.fs.exists(uri.split("://", 1)[1])

    @contextmanager
    def removing(self, uris: Iterable[str]):
        """Remove files when the block succeeds: each is renamed aside first, deleted after
        the block, and renamed back if the block raises (a registry commit that failed)."""
        aside = []
        for uri in uris:
            path = Path(uri) if self.local else uri.split("://", 1)[1]
            gone = f"{path}.deleting"
            try:
                os.replace(path, gone) if self.local else self.fs.mv(path, gone)
            except FileNotFoundError:
                continue
            aside.append((path, gone))
        try:
            yield
        except BaseException:
            for path, gone in aside:
                os.replace(gone, path) if self.local else self.fs.mv(gone, path)
            raise
        for _, gone in aside:
            Path(gone).unlink(missing_ok=True) if self.local else self.fs.rm_file(gone)

    def files(self) -> list[Path]:
        """Every file of a local store, temporary ones included (a half-written file would
        show here)."""
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    def delete(self, uri: str) -> None:
        if self.local:
            Path(uri).unlink(missing_ok=True)
        else:
            path = uri.split("://", 1)[1]
            if self.fs.exists(path):
                self.fs.rm_file(path)
