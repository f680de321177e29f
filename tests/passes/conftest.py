"""Fixtures shared by the training-pass tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Two intra-op threads on a busy two-core box make these tiny training steps up to 50x
    slower; a module that trains asks for one (pytest.mark.usefixtures("one_thread"))."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
