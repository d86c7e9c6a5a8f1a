"""Workers as one Spark barrier stage: from a laptop's ``local[N]`` to ``spark-submit`` on a cluster.

The driver runs one barrier stage with ``workers`` tasks. Each task gathers every task's
address with ``BarrierTaskContext.allGather`` (the same rendezvous TF collectives need), then
starts the ordinary ktrain worker (``launcher.worker_entry``) in a child process, so TensorFlow
starts fresh whatever Python worker Spark reuses. A failing worker fails its task, which fails
the barrier stage; the driver reports the task's error and log tail, and restarts the stage
from the newest checkpoint up to ``max_restarts`` times.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Literal

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

from launcher.errors import UserError
from strategies.base import MultiProcessConfig, MultiProcessStrategy, Session
from strategies.multiworker import collective_session

_FAILURE = re.compile(r"KTRAIN_FAILURE (\d+) (user|crash) (.*?) KTRAIN_END", re.S)


class SparkConfig(MultiProcessConfig):
    name: Literal["spark"] = "spark"
    master: str | None = None
    """spark://host:7077, yarn, k8s://...; default: the active session (spark-submit), else
    local[workers] on this machine (loopback only)."""
    spark_conf: dict[str, StrictStr | StrictInt | StrictFloat | StrictBool] = {}
    """Passed to the session builder, e.g. {spark.task.resource.gpu.amount: 1}."""


class SparkStrategy(MultiProcessStrategy):
    name = "spark"
    config_type = SparkConfig

    def prepare(self, run) -> None:
        super().prepare(run)
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise UserError("the spark strategy needs pyspark, which is not installed",
                            where="strategy.name",
                            hint='pip install "ktrain-launcher[spark]"') from None
        _require_java()
        local = re.fullmatch(r"local\[(\d+)\]", self.config.master or "")
        if local and int(local.group(1)) < self.config.workers:
            raise UserError(
                f"a barrier stage of {self.config.workers} tasks needs {self.config.workers} "
                f"task slots; {self.config.master} has {local.group(1)}", where="strategy.master",
                hint=f"use local[{self.config.workers}] or fewer strategy.workers")

    def open_session(self) -> Session:
        return collective_session(self.config.start_timeout)

    def run_group(self, run):
        """The whole group as one barrier stage; a Failure, or None if every task finished."""
        spark, created = self._spark_session()
        try:
            return self._barrier_stage(spark, run)
        finally:
            if created:
                spark.stop()

    def _spark_session(self):
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            return active, False
        master = self.config.master or f"local[{self.config.workers}]"
        builder = SparkSession.builder.master(master).appName("ktrain") \
            .config("spark.ui.showConsoleProgress", "false")
        if master.startswith("local"):  # keep a laptop's Spark on loopback, with this Python
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            builder = builder.config("spark.driver.host", "127.0.0.1") \
                             .config("spark.driver.bindAddress", "127.0.0.1") \
                             .config("spark.ui.enabled", "false")
        for key, value in self.config.spark_conf.items():
            builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        return spark, True

    def _barrier_stage(self, spark, run):
        from py4j.protocol import Py4JJavaError

        from launcher import console
        from launcher.supervisor import Failure

        n = self.config.workers
        task = _barrier_task(run.model_dump_json(), run.output_dir)
        console.info(f"training on {n} Spark barrier tasks ({spark.sparkContext.master}); "
                     f"each rank logs to {run.output_dir}/logs/rank-<r>.log")
        try:
            spark.sparkContext.parallelize(range(n), n).barrier().mapPartitions(task).collect()
            return None
        except Py4JJavaError as err:
            text = str(err)
            if "BarrierJobSlotsNumberCheckFailed" in text:
                slots = spark.sparkContext.defaultParallelism
                raise UserError(
                    f"a barrier stage of {n} tasks needs {n} task slots; the cluster offers "
                    f"about {slots}", where="strategy.workers",
                    hint="lower strategy.workers or add executors/cores") from None
            found = _FAILURE.search(text)
            if not found:
                raise
            rank, kind, report = int(found.group(1)), found.group(2), found.group(3)
            summary, _, tail = report.partition("\n")
            return Failure(rank, summary, tail.splitlines(), user_error=kind == "user",
                           log=f"{run.output_dir}/logs/rank-{rank}.log")


def _barrier_task(plan_json: str, output_dir: str):
    """The function each barrier task runs (pickled to the executors)."""

    def run(_):
        from collections import deque

        import fsspec
        from pyspark import BarrierTaskContext

        from launcher.supervisor import captured_output_env, describe_exit, die_with_parent
        from strategies.multiworker import free_ports

        context = BarrierTaskContext.get()
        rank = context.partitionId()
        infos = context.getTaskInfos()
        host = infos[rank].address.rsplit(":", 1)[0]
        peers = context.allGather(f"{host}:{free_ports(1)[0]}")
        env = {**os.environ, "KTRAIN_PLAN": plan_json, "KTRAIN_RANK": str(rank),
               "KTRAIN_WORLD_SIZE": str(len(infos)), "KTRAIN_LOCAL_RANK": "0",
               "KTRAIN_PEERS": ",".join(peers), **captured_output_env()}
        gpus = context.resources().get("gpu")
        if gpus is not None:  # Spark's GPU scheduling picked this task's GPUs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)
        fs, out = fsspec.core.url_to_fs(output_dir)
        fs.makedirs(f"{out}/logs", exist_ok=True)
        tail = deque(maxlen=20)
        with fs.open(f"{out}/logs/rank-{rank}.log", "a") as log:
            process = subprocess.Popen([sys.executable, "-m", "launcher.worker_entry"], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, errors="replace", preexec_fn=die_with_parent)
            for line in process.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
            code = process.wait()
        if code != 0:
            kind = "user" if code == 2 else "crash"
            raise RuntimeError(f"KTRAIN_FAILURE {rank} {kind} rank {rank} {describe_exit(code)}\n"
                               + "\n".join(tail) + " KTRAIN_END")
        yield rank

    return run


def _require_java() -> None:
    java = shutil.which("java") or (os.path.join(os.environ["JAVA_HOME"], "bin", "java")
                                    if os.environ.get("JAVA_HOME") else None)
    hint = "install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
    if not java:
        raise UserError("Spark needs Java, and no java was found", where="strategy.name",
                        hint=hint)
    version = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(\d+)(?:\.(\d+))?', version)
    major = int(found.group(1)) if found else 0
    major = int(found.group(2)) if major == 1 and found.group(2) else major  # "1.8" is Java 8
    if major < 17:
        raise UserError(f"Spark 4 needs Java 17 or newer; {java} is Java {major or '?'}",
                        where="strategy.name", hint=hint)
