import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VISIONZOO_TEST_THREADS", min(2, os.cpu_count() or 1))))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("VISIONZOO_FIXTURES", REPO.parent / "shared" / "fixtures"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (small ops on 2 shared cores are faster and steadier that way)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _caplog_sees_visionzoo(request):
    """A run sets up the 'visionzoo' logger to print on its own (no propagation to the root logger), so a later
    test's caplog would miss its records: hand caplog's handler to that logger directly."""
    if "caplog" not in request.fixturenames:
        yield
        return
    import logging

    handler = request.getfixturevalue("caplog").handler
    logger = logging.getLogger("visionzoo")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
