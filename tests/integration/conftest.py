"""Fixtures shared by the integration tests."""

import pytest


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """IMGCLF_HOME for one test module (its jobs and endpoints)."""
    return tmp_path_factory.mktemp("home")
