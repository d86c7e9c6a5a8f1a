"""Fixtures shared by the tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any test module imports TensorFlow
# Every JVM the tests start (Spark's launcher, master, workers, drivers, executors) is short-lived
# and light: see spark-conf/spark-defaults.conf.
_LIGHT_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
os.environ.setdefault("SPARK_CONF_DIR", os.path.join(os.path.dirname(__file__), "spark-conf"))
os.environ.setdefault("SPARK_DAEMON_JAVA_OPTS", _LIGHT_JVM)
os.environ.setdefault("SPARK_LAUNCHER_OPTS", _LIGHT_JVM)

import contextlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

import clusters  # noqa: E402
from helpers import FIXTURES, Background, base_config, run_cli, write_config  # noqa: E402


LONGEST_MODULES = ("test_preemption", "test_spark", "test_streaming", "test_backends",
                   "test_multiworker", "test_slurm", "test_ray", "test_hosts", "test_porting",
                   "test_after_training", "test_cli_errors", "test_model_families")
"""The slowest test modules, handed out first in this order (on two workers on a 2-core
machine, 2026-11-29: 864 s down to 166 s; test_model_families' zoo, 2026-12-07: about 200 s,
handed out last in the measured 42-minute run)."""


def pytest_collection_modifyitems(items):
    """CI runs the tests on two pytest-xdist workers, a module at a time (``--dist loadfile``:
    a module's clusters start once, on one worker); handing out the longest modules first
    leaves only short ones to balance the end of the run."""
    order = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: order.get(item.module.__name__, len(order)))


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

    def get(model_fn: str, **kwargs):
        key = (model_fn, *sorted(kwargs.items()))
        if key not in done:
            folder = tmp_path_factory.mktemp(f"reference-{model_fn}")
            model = {"fn": f"{FIXTURES}:{model_fn}", "kwargs": kwargs}
            config = base_config(folder / "out", model=model)
            result = run_cli("run", write_config(folder / "config.yaml", config), "-q")
            assert result.returncode == 0, result.stderr
            done[key] = folder / "out"
        return done[key]

    return get


@contextlib.contextmanager
def running(cluster):
    """``cluster.start()`` for the block; ``cluster.stop()`` whatever happens."""
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _needs_root(*tools: str) -> None:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in tools):
        pytest.skip(f"needs root and {', '.join(tools)} (a Debian machine, as in CI)")


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM (munged, slurmctld, slurmd on 127.0.0.1), for the session."""
    _needs_root("apt-get")
    with running(clusters.LocalSlurm()) as cluster:
        yield cluster


@pytest.fixture
def two_hosts():
    """Two network namespaces, 10.77.0.1 and 10.77.0.2, removed when the test ends."""
    _needs_root("ip")
    with running(clusters.TwoHosts()) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def slurm_on_two_hosts():
    """A real two-node SLURM, one slurmd in each of two network namespaces."""
    _needs_root("ip", "apt-get")
    with running(clusters.TwoHosts()) as hosts, running(clusters.LocalSlurm(hosts)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def spark_on_two_hosts():
    """A real Spark standalone master at 10.77.0.1 and a 1-core worker on each of two hosts."""
    pytest.importorskip("pyspark", reason="pyspark is not installed: bash scripts/setup.sh")
    _needs_root("ip")
    with running(clusters.TwoHosts()) as hosts, \
            running(clusters.SparkStandalone(cores=1, hosts=hosts)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def spark_connect():
    """A real Spark Connect server (running its jobs on local[2]) on 127.0.0.1."""
    pytest.importorskip("pyspark.sql.connect.session",
                        reason="pyspark's Connect client is not installed: bash scripts/setup.sh")
    with running(clusters.SparkConnectServer(cores=2)) as server:
        yield server


@pytest.fixture(scope="module")
def spark_cluster():
    """A real Spark standalone master and worker (3 cores) on 127.0.0.1."""
    pytest.importorskip("pyspark", reason="pyspark is not installed: bash scripts/setup.sh")
    with running(clusters.SparkStandalone(cores=3)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (with its job server) at 10.77.0.1, in a namespace of its own."""
    pytest.importorskip("ray", reason="ray is not installed: bash scripts/setup.sh installs it")
    _needs_root("ip")
    with running(clusters.TwoHosts()) as hosts, running(clusters.RayHead(hosts)) as head:
        yield head


@pytest.fixture(scope="module")
def mlflow_server():
    """A real MLflow tracking server (SQLite store, proxied artifacts) on 127.0.0.1."""
    pytest.importorskip("mlflow.server", reason="mlflow is not installed: bash scripts/setup.sh")
    with running(clusters.MlflowServer()) as server:
        yield server
