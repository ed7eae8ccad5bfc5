import pytest
import torch

from tests.dist_pool import PoolRegistry


def pytest_collection_modifyitems(config, items):
    # The torchrun end-to-end tests take most of the suite's time: `-m "not slow"` leaves them out.
    for item in items:
        if "functional" in item.path.parts:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_teardown(item, nextitem):
    # The worker pools serve the tests that take `run_dist`; closed when the next test does not
    # (they are rebuilt on demand), so their idle processes do not slow the torchrun tests.
    if nextitem is None or "run_dist" not in getattr(nextitem, "fixturenames", ()):
        registry = item.funcargs.get("_pools") if hasattr(item, "funcargs") else None
        if registry is not None:
            registry.close()


@pytest.fixture(scope="session")
def _pools():
    registry = PoolRegistry()
    yield registry
    registry.close()


@pytest.fixture
def run_dist(_pools):
    """`run_dist(world_size, fn, *args)` -> list of per-rank results of `fn(rank, world, *args)`."""
    return _pools.run
