"""Fixtures shared by every test folder: one thread for small tensors, quiet optional oracles."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch


@pytest.fixture
def one_thread(request):
    """Fast tests run on one thread: for small tensors, waking a second OpenMP thread costs more
    than the op (100x slowdowns seen on 2 shared cores). Slow tests keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _import_quietly(name: str):
    """The module, or a skip when it is missing; bitsandbytes' import-time notes muted."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


@pytest.fixture(scope="session")
def peft():
    return _import_quietly("peft")


@pytest.fixture(scope="session")
def bnb():
    return _import_quietly("bitsandbytes")


@pytest.fixture(scope="session")
def bnbf():
    """bitsandbytes.functional."""
    return _import_quietly("bitsandbytes.functional")
