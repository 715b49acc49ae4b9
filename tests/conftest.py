"""Fixtures for every test. Helpers that test files import live in tests/helpers (nothing here is imported)."""

import pytest
import torch

# Tests run many small ops on tiny models: one thread is as fast, and immune to OpenMP threads spinning against
# other processes on a shared machine (which slowed single tests here from about 1 s to 45 s). Set at import too:
# collection builds models (parametrize lists) before any fixture runs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Again before every test: the trainer, the CLI and the benchmarks apply their own ``--threads``, which would
    otherwise last into the tests after them."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(items):
    """Tests marked slow (``-m slow``: inductor per model, whole training runs) get an hour, not the 900 s the
    default run gives each test (pyproject's ``timeout``)."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(3600))
