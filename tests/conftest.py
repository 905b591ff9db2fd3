"""Shared fixtures: Flink job server jar and a standalone Flink cluster.

Flink tests never skip: without Java, the jar or the Flink distribution they fail with a
message that says what to install (``make setup`` does all of it).
"""
from __future__ import annotations

import pytest

from dataflow import flink


@pytest.fixture(scope="session")
def flink_job_server_jar() -> str:
    try:
        return flink.job_server_jar()
    except flink.FlinkSetupError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def flink_cluster(tmp_path_factory, flink_job_server_jar):
    """A standalone cluster from .venv-flink, stopped afterwards even when a test fails."""
    try:
        cluster = flink.FlinkCluster(task_slots=2,
                                     workdir=str(tmp_path_factory.mktemp("flink-cluster")))
        cluster.start()
    except flink.FlinkSetupError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
