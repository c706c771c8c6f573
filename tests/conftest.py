"""Shared fixtures of the atomnas_mm tests (see ``harness.py``)."""
import pytest

import harness


@pytest.fixture(scope='module', autouse=True)
def toys_registered():
    """The harness's toys registered by name for one test module (before
    its module fixtures), removed after it."""
    with harness.toys_registered():
        yield


@pytest.fixture(autouse=True)
def fresh_mmengine_globals():
    """mmengine's global instances forgotten after every test."""
    yield
    harness.clear_global_instances()


@pytest.fixture(scope='session')
def tiny_arch():
    """The toy arch 'tiny' (3 stages, head 32); do not mutate it."""
    return harness.toy_arch('tiny')


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: end-to-end tests in subprocesses (deselect with '
        '-m "not slow")')
