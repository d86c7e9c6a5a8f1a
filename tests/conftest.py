"""Fixtures shared by the tests."""

import pytest

from helpers import Background


@pytest.fixture
def background():
    started: list[Background] = []

    def start(*args: str) -> Background:
        started.append(Background(*args))
        return started[-1]

    yield start
    for process in started:
        process.close()
