"""Unit tests run their tiny tensors on one thread: on a busy 2-core machine, thread
hand-offs made tiny matmuls up to ~200x slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
