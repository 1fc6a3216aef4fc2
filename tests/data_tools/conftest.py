"""Fixtures of the data_tools tests: the two-node Ray cluster, started once per test session."""

from __future__ import annotations

import pytest
from ray_cluster import RayCluster


@pytest.fixture(scope="session")
def cluster() -> RayCluster:
    """The two-node cluster (tests/ray_cluster.py), shared by every Ray test module of the session;
    nothing of it may be left running after."""
    with RayCluster() as ray_cluster:
        yield ray_cluster
    assert ray_cluster.leftovers() == []
