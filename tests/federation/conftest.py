"""Fixtures of the federation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def flower_cache(tmp_path_factory):
    """One cache folder for every Flower test: the small benchmark's image features are computed once
    (about 8 s each time otherwise), and the nodes' state snapshots live under it (named by run id)."""
    return tmp_path_factory.mktemp("flower-cache")
