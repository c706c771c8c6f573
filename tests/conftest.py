"""Shared fixtures of the atomnas_mm tests."""
import copy

import pytest

# Three stages (16, 24, 32 channels), a branch per kernel size, a stride-2
# block and a residual one: small enough for a Runner on 32 px images.
TINY_ARCH = dict(
    rows=[[16, 1, 1, [3], [8], False],
          [24, 1, 2, [3, 5], [8, 4], True],
          [24, 1, 1, [3, 5, 7], [6, 4, 2], True],
          [32, 1, 2, [3], [12], True]],
    stem_channels=8, last_channels=32)


@pytest.fixture(scope='session')
def tiny_arch():
    """A small AtomNAS arch dict (3 stages, head 32); do not mutate it."""
    return copy.deepcopy(TINY_ARCH)


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: end-to-end tests in subprocesses (deselect with '
        '-m "not slow")')
