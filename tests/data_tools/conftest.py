"""Fixtures of the data_tools tests: the two-node Ray cluster, started once per test session."""

from __future__ import annotations

import pytest
from ray_cluster import RayCluster


def private_cluster() -> RayCluster:
    """A RayCluster (not started yet) whose nodes and jobs run without Ray's token authentication.

    Ray >= 2.5x turns token auth on for ``ray start --head`` whenever ``~/.ray/auth_token`` exists (any
    earlier ``ray.init()`` on this machine writes one) but not for a joining ``ray start --address``, so
    the second node is refused. The cluster lives in a private network namespace, reachable by nothing
    else, so every process of it runs with ``RAY_AUTH_MODE=disabled``.
    """
    cluster = RayCluster()
    cluster.env["RAY_AUTH_MODE"] = "disabled"
    return cluster


@pytest.fixture(scope="session")
def cluster() -> RayCluster:
    """The two-node cluster (tests/ray_cluster.py), shared by every Ray test module of the session;
    nothing of it may be left running after."""
    with private_cluster() as ray_cluster:
        yield ray_cluster
    assert ray_cluster.leftovers() == []
