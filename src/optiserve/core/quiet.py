"""Third-party chatter goes to optiserve's log at debug level, not to the user's terminal.

Two kinds reach a terminal uninvited:

- **Python log records** that libraries emit at INFO/WARNING about their own internals (ONNX
  Runtime's `ort_format_model.utils [INFO] - Created config in ...`, onnxscript's "version
  conversion is not supported ... fallback is enabled", torch.onnx's "Setting ONNX exporter to
  use operator set version 18" and "torchvision is not installed", transformers' "`loss_type=
  None` was set in the config but it is unrecognized"). `route_logs()` puts a filter on those
  loggers and messages: the record is dropped there and logged again at DEBUG on the
  `optiserve.third_party` logger, prefixed with the library's logger name.
- **C++ lines written straight to file descriptor 2** (TensorFlow's absl lines at import,
  which TF_CPP_MIN_LOG_LEVEL does not reach; the TFLite converter's `fully_quantize: 0,
  inference_type: 6, ...`; LiteRT's `INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`).
  No environment variable silences them, so `fd_to_log()` points fd 2 at a temporary file
  around the call that writes them and logs what it caught at DEBUG. Use it only around short
  calls: whatever else the process writes to stderr meanwhile (another thread's log line, a
  progress bar frame) is caught too, and goes to the debug log with it.

Turn the log on to see it all, e.g. `logging.basicConfig(level=logging.DEBUG)`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("optiserve.third_party")

#: logger name -> the messages of it that are internal chatter (None: every record below ERROR)
NOISY: dict[str, re.Pattern | None] = {
    # onnxruntime.tools.ort_format_model: one INFO line per reduced-operator config written
    "ort_format_model.utils": None,
    # torch.onnx (dynamo) downgrading the opset through the ONNX C API: it works, says so
    "onnxscript.version_converter": re.compile(r"version conversion is not supported"),
    # torch.onnx (dynamo): exports at opset 18 and converts down; optional torchvision ops
    "torch.onnx._internal.exporter._compat": re.compile(
        r"Setting ONNX exporter to use operator set version"),
    "torch.onnx._internal.exporter._registration": re.compile(r"torchvision is not installed"),
    # tracing a Hugging Face model reads its `loss_function` property (training only)
    "transformers.modeling_utils": re.compile(r"loss_type="),
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
_installed = False
_fd_lock = threading.Lock()
_fd_busy = False
_done_once: set[str] = set()


class _Demote(logging.Filter):
    """Drops the matching records of one logger, logging them again at DEBUG on ours."""

    def __init__(self, pattern: re.Pattern | None):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        if self.pattern is not None and not self.pattern.search(message):
            return True
        log.debug("%s: %s", record.name, message)
        return False


def route_logs() -> None:
    """Install the filters (once per process; cheap, imports nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, pattern in NOISY.items():
        logging.getLogger(name).addFilter(_Demote(pattern))


@contextmanager
def fd_to_log(what: str, *, once: str | None = None) -> Iterator[None]:
    """Catch what is written to file descriptor 2 during the block and log it at DEBUG as
    `what: line`. `once`: a key; after the first block with that key has run, later ones
    leave fd 2 alone (for lines a library prints once per process). A block inside another
    (or beside one in another thread) leaves fd 2 to the one already catching."""
    global _fd_busy
    with _fd_lock:
        skip = _fd_busy or (once is not None and once in _done_once)
        if not skip:
            _fd_busy = True
    if skip:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (a daemon), or stderr closed: nothing to hide
        with _fd_lock:
            _fd_busy = False
        yield
        return
    caught = tempfile.TemporaryFile()
    try:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        with _fd_lock:
            _fd_busy = False
            if once is not None:
                _done_once.add(once)
        caught.seek(0)
        text = caught.read().decode("utf-8", "replace")
        caught.close()
        for line in _ANSI.sub("\n", text).splitlines():
            if line.strip():
                log.debug("%s: %s", what, line.rstrip())
