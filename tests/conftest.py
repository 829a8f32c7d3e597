import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test file (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): small tensors gain nothing from threads, and on a shared 2-core machine
    OpenMP threads waiting for each other make every op many times slower."""
    from selfattn.testing import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def forget_backend_choices():
    """The backends' remembered choices (``backends.CHOICES``) start empty in every test: a
    test may change what a backend accepts (monkeypatch) before it calls ``attention``."""
    from selfattn.backends import forget_choices

    forget_choices()
    yield
    forget_choices()
