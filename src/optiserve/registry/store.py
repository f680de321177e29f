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
        self._local = "://" not in location or location.startswith("file://")
        self._cache = cache_dir  # remote artifacts are fetched here, checked by sha256
        if self._local:
            self.root = Path(location.removeprefix("file://"))
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            fsspec = require("fsspec", extra="s3", feature=f"Artifact store at {location}")
            self.fs, self.root_path = fsspec.core.url_to_fs(location)

    def _key(self, sha: str, suffix: str) -> str:
        return f"{sha[:2]}/{sha}{suffix}"

    def put(self, src: str | Path, suffix: str) -> tuple[str, str, int]:
        """Store a file; returns (uri, sha256, size). Safe to call twice with the same bytes."""
        sha, size = sha256_file(src)
        key = self._key(sha, suffix)
        if self._local:
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
        if self._local:
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

    def delete(self, uri: str) -> None:
        if self._local:
            Path(uri).unlink(missing_ok=True)
        else:
            path = uri.split("://", 1)[1]
            if self.fs.exists(path):
                self.fs.rm_file(path)
