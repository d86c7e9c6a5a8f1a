"""Fixtures shared by the tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any test module imports TensorFlow

import shutil  # noqa: E402

import pytest  # noqa: E402

from helpers import FIXTURES, Background, base_config, run_cli, write_config  # noqa: E402


@pytest.fixture
def background():
    started: list[Background] = []

    def start(*args: str, **options) -> Background:
        started.append(Background(*args, **options))
        return started[-1]

    yield start
    for process in started:
        process.close()


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory):
    """The reference: a 1-replica mirrored run of a fixture model fn (run once per session)."""
    done = {}

    def get(model_fn: str):
        if model_fn not in done:
            folder = tmp_path_factory.mktemp(f"reference-{model_fn}")
            config = base_config(folder / "out", model={"fn": f"{FIXTURES}:{model_fn}"})
            result = run_cli("run", write_config(folder / "config.yaml", config), "-q")
            assert result.returncode == 0, result.stderr
            done[model_fn] = folder / "out"
        return done[model_fn]

    return get


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM (munged, slurmctld, slurmd on 127.0.0.1), for the session."""
    from clusters import LocalSlurm

    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("a local SLURM needs root and apt-get (Debian) to install slurm-wlm")
    cluster = LocalSlurm()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _two_hosts():
    from clusters import TwoHosts

    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2's `ip`")
    return TwoHosts()


@pytest.fixture
def two_hosts():
    """Two network namespaces, 10.77.0.1 and 10.77.0.2, removed when the test ends."""
    hosts = _two_hosts()
    try:
        yield hosts.start()
    finally:
        hosts.stop()


@pytest.fixture(scope="module")
def slurm_on_two_hosts():
    """A real two-node SLURM, one slurmd in each of two network namespaces."""
    from clusters import LocalSlurm

    hosts = _two_hosts()
    try:
        cluster = LocalSlurm(hosts.start())
        try:
            yield cluster.start()
        finally:
            cluster.stop()
    finally:
        hosts.stop()


@pytest.fixture(scope="module")
def spark_cluster():
    """A real Spark standalone master and worker (2 cores) on 127.0.0.1."""
    pytest.importorskip("pyspark", reason="pyspark is not installed: bash scripts/setup.sh")
    from clusters import SparkStandalone

    cluster = SparkStandalone(cores=2)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (with its job server) at 10.77.0.1, in a namespace of its own."""
    pytest.importorskip("ray", reason="ray is not installed: bash scripts/setup.sh installs it")
    from clusters import RayHead

    hosts = _two_hosts()
    try:
        head = RayHead(hosts.start())
        try:
            yield head.start()
        finally:
            head.stop()
    finally:
        hosts.stop()
