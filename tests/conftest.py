"""Shared fixtures: the devices present, and the two implementations of every kernel."""

import os

import pytest
import torch

import commcomp
from commcomp.ops import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def native(device):
    """torch.ops.commcomp, skipping where only the reference serves this device."""
    if commcomp.ops.backend(device) != "native":
        if os.environ.get("COMMCOMP_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native kernels required for {device} but not loaded")
        pytest.skip(f"no native kernels for {device}")
    return torch.ops.commcomp


@pytest.fixture
def ref():
    return reference
