"""Workers as one Spark barrier stage: from a laptop's ``local[N]`` to ``spark-submit`` on a
cluster, or through a Spark Connect server.

The driver runs one barrier stage with ``workers`` tasks, as ``DataFrame.mapInArrow(...,
barrier=True)``, which classic and Spark Connect sessions both offer (Connect has no RDDs; this
is how PySpark's TorchDistributor runs there too). Each task gathers every task's
address with ``BarrierTaskContext.allGather`` (the same rendezvous TF collectives need), then
starts the ordinary ktrain worker (``ktrain.worker_entry``) in a child process, so TensorFlow
starts fresh whatever Python worker Spark reuses. A failing worker fails its task, which fails
the barrier stage; the driver reports the task's error and log tail, and restarts the stage
from the newest checkpoint up to ``max_restarts`` times.

An elastic run (``workers: {min, max}``) goes on with a smaller stage when a task or its
executor is lost, and grows back to ``max`` once the cluster offers that many slots again.
Spark kills the stage's other tasks (and so their workers) when one fails, so a new stage
resumes from the newest checkpoint, never from a survivor's memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys

from ktrain import console
from ktrain.config import SparkConfig
from ktrain.environment import PARTITION_ENV, rank_environment
from ktrain.errors import UserError
from ktrain.launch import worker_command, worker_environment
from ktrain.regroup import LEFT_TO_GROW, PEER_LOST, RegroupFolder
from ktrain.rendezvous import free_ports
from ktrain.session import Session
from ktrain.stopping import STOP_REPORT, relaying_stops, reported_stop
from ktrain.strategies.base import MultiProcessStrategy, group_log_dir
from ktrain.strategies.multiworker import collective_session
from ktrain.supervisor import (LEFT_TO_GROW_OUTCOME, Failure, blame_chief_first,
                               captured_output_env, describe_exit, die_with_parent, echo_log,
                               echoed_report, log_tail)

_FAILURE = re.compile(r"KTRAIN_FAILURE (\d+) (user|crash|peer) (.*?) KTRAIN_END", re.S)
_EXECUTOR_LOST = re.compile(r"(?:barrier task \w+\(\d+, |Lost task )(\d+)\D.*?"
                            r"ExecutorLostFailure \(executor (\S+) .*?\) Reason: ([^\n]*)", re.S)
_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")
_SLOTS_EVERY = 2.0
"""Seconds between two looks at the cluster's task slots, for room to grow."""


class SparkStrategy(MultiProcessStrategy):
    name = "spark"
    config: SparkConfig

    def prepare(self, run) -> None:
        super().prepare(run)
        if self.config.elastic and run.data.read_by_spark:
            raise UserError(
                f"strategy.workers is a range, and data.{'parquet' if run.data.parquet else 'table'}"
                f" gives each Spark task a partition of its own, which changes with the number of "
                f"tasks: a group that re-formed at another size would train on other batches",
                where="strategy.workers",
                hint="read the same Parquet files with data.files (the same examples at any "
                     f"size), or set workers: {self.config.size_range[1]}")
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise UserError("the spark strategy needs pyspark, which is not installed",
                            where="strategy.name",
                            hint='pip install "ktrain-launcher[spark]"') from None
        _require_java()
        local = re.fullmatch(r"local\[(\d+)\]", self.config.master or "")
        if local and int(local.group(1)) < self.config.size_range[1]:
            raise UserError(
                f"a barrier stage of {self.config.size_range[1]} tasks needs {self.config.size_range[1]} "
                f"task slots; {self.config.master} has {local.group(1)}", where="strategy.master",
                hint=f"use local[{self.config.size_range[1]}] or fewer strategy.workers")

    def open_session(self, run) -> Session:
        return collective_session(self.config.start_timeout, run.output_dir)

    _session = None
    """The Spark session of the run's stages and whether ktrain created it: a group that
    re-forms keeps the application and the executors it has left."""

    def launch(self, run, train):
        try:
            return super().launch(run, train)
        finally:
            spark, created = self._session or (None, False)
            if created:
                spark.stop()
            self._session = None

    def run_group(self, run, train, size, environment):
        """The whole group as one barrier stage; a Failure, LEFT_TO_GROW_OUTCOME, or None if
        every task finished."""
        with group_log_dir(run.output_dir) as (logs, _):
            if self._session is None:
                self._session = self._spark_session(run, logs)
            return self._barrier_stage(self._session[0], run, train, size, environment)

    def _spark_session(self, run, logs):
        """The session to run on, and whether ktrain created it. Spark's own log goes to
        ``logs/spark-driver.log`` when ktrain starts the JVM; under spark-submit, Spark prints
        its warnings and errors only, once its context starts."""
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
        from pyspark import SparkConf, SparkContext
        from pyspark.java_gateway import launch_gateway  # to send the JVM's output to a file
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            return active, False
        if remote := self._connect_url():
            return self._connect(remote), True
        if self.config.master is None and os.environ.get("PYSPARK_GATEWAY_PORT"):
            # Under spark-submit: its --master and --conf already configure the session.
            return SparkSession.builder.appName("ktrain").config("spark.log.level", "WARN") \
                .getOrCreate(), False
        master = self.config.master or f"local[{self.config.size_range[1]}]"
        # A failed task fails the stage at once: strategy.max_restarts, not Spark, retries.
        conf = SparkConf().setMaster(master).setAppName("ktrain") \
            .set("spark.ui.showConsoleProgress", "false").set("spark.task.maxFailures", "1")
        if master.startswith("local"):  # keep a laptop's Spark on loopback, with this Python
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            conf.set("spark.driver.host", "127.0.0.1").set("spark.driver.bindAddress", "127.0.0.1") \
                .set("spark.ui.enabled", "false")
        for key, value in self._spark_conf().items():
            conf.set(key, value)
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "spark-driver.log", "ab") as log:  # the JVM keeps its own copy
            gateway = launch_gateway(conf, popen_kwargs={"stdout": log, "stderr": log})
        context = SparkContext(conf=conf, gateway=gateway)
        context.setLogLevel("ERROR")
        return SparkSession(context), True

    def _spark_conf(self) -> dict[str, str]:
        return {key: str(value).lower() if isinstance(value, bool) else str(value)
                for key, value in self.config.spark_conf.items()}

    def _connect_url(self) -> str | None:
        master = self.config.master
        if master is None:
            return os.environ.get("SPARK_REMOTE")
        return master if master.startswith("sc://") else None

    def _connect(self, url: str):
        """A Spark Connect session, once the server answers (the client itself would retry an
        absent server for minutes)."""
        import socket
        from urllib.parse import urlparse

        from pyspark.sql import SparkSession

        where = "strategy.master" if self.config.master else "SPARK_REMOTE"
        try:
            address = urlparse(url)
            socket.create_connection((address.hostname, address.port or 15002), timeout=10).close()
        except (OSError, ValueError) as err:
            raise UserError(f"no Spark Connect server answers at {url} ({err})", where=where,
                            hint="start one (the pyspark package's sbin/start-connect-server.sh) "
                                 "or correct the address") from None
        builder = SparkSession.builder.remote(url)
        for key, value in self._spark_conf().items():
            builder = builder.config(key, value)
        return builder.getOrCreate()

    def _barrier_stage(self, spark, run, train, n, environment):
        connect = type(spark).__module__.startswith("pyspark.sql.connect")
        if not connect:  # Spark Connect does not expose the scheduler: Spark checks the slots
            _check_slots(spark.sparkContext, n, min(self.config.start_timeout, 30.0))
        if run.data.read_by_spark:  # each task trains on its partition of the DataFrame
            columns = (list(run.data.features), run.data.label, run.train.global_batch_size)
            partitions = _dataframe(spark, run, n)
        else:  # each task reads its share of the data fn's result or data.files
            columns, partitions = None, spark.range(n, numPartitions=n)
        master = self._connect_url() if connect else spark.sparkContext.master
        console.info(f"training on {n} Spark barrier tasks ({master}); "
                     f"each rank logs to {run.output_dir}/logs/rank-<r>.log")
        chief_log = f"{run.output_dir}/logs/rank-0.log"
        regroup = RegroupFolder.of_run(run.output_dir)
        regroup.clear()
        try:
            with relaying_stops(run.checkpoint.stop_signals, run.output_dir) as (stop, env):
                task = _barrier_task(worker_environment(run, train), run.output_dir,
                                     {**console.environment(), **env, **environment,
                                      **regroup.environment()}, columns)
                # Spark Connect does not show its scheduler: a group there does not grow back
                growing = regroup.offering_growth(
                    lambda: _slots(spark.sparkContext) >= self.config.size_range[1],
                    every=_SLOTS_EVERY) if self.may_grow(n) and not connect else \
                    contextlib.nullcontext()
                with echo_log(chief_log), growing:
                    ended = partitions.mapInArrow(task, "rank long, status long",
                                                  barrier=True).collect()
        except Exception as err:  # Py4J's (classic) or gRPC's (Connect) report of the stage
            text = str(err)
            if "BarrierJobSlotsNumberCheckFailed" in text:
                raise UserError(f"a barrier stage of {n} tasks needs {n} task slots, more than "
                                f"the cluster offers", where="strategy.workers",
                                hint="lower strategy.workers or add executors/cores") from None
            found = _FAILURE.search(text)
            missing = _MISSING_MODULE.search(text)
            if missing and not found:  # the executors' Python could not even load the task
                raise UserError(f"Spark's Python workers cannot import '{missing.group(1)}'",
                                where="strategy",
                                hint="install ktrain-launcher[spark] (with TensorFlow) in the "
                                     "Python the executors run, or point them at one that has "
                                     "it (PYSPARK_PYTHON, spark.pyspark.python)") from None
            lost = _EXECUTOR_LOST.search(text)
            if lost:  # the task died with its executor: no report of its own
                rank = int(lost.group(1))
                log = f"{run.output_dir}/logs/rank-{rank}.log"
                failure = Failure(rank, f"rank {rank}'s Spark executor {lost.group(2)} was lost "
                                        f"({lost.group(3).strip()})", log_tail(log), log=log,
                                  lost=[rank])
            elif found:
                rank, kind, report = int(found.group(1)), found.group(2), found.group(3)
                summary, _, tail = report.partition("\n")
                lines = tail.splitlines()
                failure = blame_chief_first(
                    Failure(rank, summary, lines, user_error=kind == "user",
                            log=f"{run.output_dir}/logs/rank-{rank}.log",
                            shown=echoed_report(rank, lines),
                            lost=[rank] if kind == "crash" else []), chief_log)
            else:
                raise
            failure.completed_step = max(regroup.held_steps().values(), default=None)
            return failure
        finally:
            regroup.remove()
        if ended and all(row.status == LEFT_TO_GROW for row in ended):
            return LEFT_TO_GROW_OUTCOME
        said = [line for line in log_tail(chief_log) if line.startswith(STOP_REPORT)]
        if stop.received and said:  # the ranks stopped as asked (so their tasks succeeded)
            raise reported_stop(said[-1], shown=console.verbosity() >= console.NORMAL)
        return None


def _slots(context) -> int:
    """How many tasks the cluster can run at once (a barrier stage needs one slot a task)."""
    scala = context._jsc.sc()
    return scala.maxNumConcurrentTasks(scala.resourceProfileManager().defaultResourceProfile())


def _check_slots(context, needed: int, wait: float) -> None:
    """Fail in seconds, not after Spark's ten minutes of barrier slot-check retries, when the
    cluster cannot run every task at once. Executors that are still registering get ``wait``
    seconds."""
    import time

    deadline = time.monotonic() + wait
    while (slots := _slots(context)) < needed:
        if time.monotonic() > deadline:
            raise UserError(f"a barrier stage of {needed} tasks needs {needed} task slots; the "
                            f"cluster ({context.master}) offers {slots}",
                            where="strategy.workers",
                            hint="lower strategy.workers, or add executors or cores "
                                 "(slots = cores / spark.task.cpus, and GPUs per task if set)")
        time.sleep(0.5)


_VALIDATION_COLUMN = "_ktrain_validation"


def _dataframe(spark, run, partitions: int):
    """The data.parquet / data.table source: feature and label columns, a validation flag
    drawn with the run's seed, in one partition per worker."""
    from pyspark.sql import functions

    data = run.data
    source = spark.read.parquet(data.parquet) if data.parquet else spark.table(data.table)
    wanted = [*data.features, data.label]
    missing = [c for c in wanted if c not in source.columns]
    if missing:
        raise UserError(f"column(s) {missing} are not in {data.parquet or data.table}",
                        where="data.features" if data.label not in missing else "data.label",
                        hint=f"its columns are: {', '.join(source.columns)}")
    flag = functions.rand(run.train.seed) < run.train.validation_split
    return source.select(*wanted).withColumn(_VALIDATION_COLUMN, flag).repartition(partitions)


def _write_partition(batches, columns, folder: str) -> int:
    """Stream this task's rows (Arrow record batches) into the Parquet files its worker reads
    (train.parquet, validation.parquet), one batch at a time; return its training rows."""
    import pyarrow.compute as compute
    import pyarrow.parquet as pq

    features, label, _ = columns
    kept = [*features, label]
    writers: dict[str, pq.ParquetWriter] = {}
    rows = 0
    try:
        for batch in batches:
            held_out = batch.column(_VALIDATION_COLUMN)
            for name, rows_of in (("train", compute.invert(held_out)), ("validation", held_out)):
                part = batch.filter(rows_of).select(kept)
                if name not in writers:
                    writers[name] = pq.ParquetWriter(os.path.join(folder, f"{name}.parquet"),
                                                     part.schema)
                if part.num_rows:
                    writers[name].write_batch(part)
                rows += part.num_rows if name == "train" else 0
    finally:
        for writer in writers.values():
            writer.close()
    return rows


def _barrier_task(plan_env: dict, output_dir: str, driver_env: dict, columns=None):
    """The function each barrier task runs (pickled to the executors). ``plan_env``: the run
    and its training function (ktrain.launch); ``driver_env``: the driver's console settings
    and stop relay; with ``columns`` (features, label, global batch size) the
    task's rows are its worker's data."""

    def run(batches):
        import tempfile
        from collections import deque

        # Imported here, where the task runs: an executor whose Python lacks ktrain's packages
        # then fails on ktrain itself (at unpickling), which is what the driver reports.
        import fsspec
        import pyarrow
        from pyspark import BarrierTaskContext, SparkFiles

        context = BarrierTaskContext.get()
        rank = context.partitionId()
        infos = context.getTaskInfos()
        host = infos[rank].address.rsplit(":", 1)[0]
        # In the application's own folder (a temp folder Spark deletes at exit in local mode,
        # the worker's app folder that spark.worker.cleanup clears on a cluster), not /tmp:
        # a task that Spark kills (a failed or stopped run) cannot clean up after itself.
        scratch = tempfile.mkdtemp(prefix="ktrain-partition-",
                                   dir=os.path.abspath(SparkFiles.getRootDirectory()))
        examples = _write_partition(batches, columns, scratch) if columns else 0
        gathered = [g.split("|") for g in
                    context.allGather(f"{host}:{free_ports(1, host)[0]}|{examples}")]
        peers = [address for address, _ in gathered]
        env = {**os.environ, **plan_env, **rank_environment(rank, len(infos), peers=peers),
               **captured_output_env(driver_env)}
        if columns:  # every worker takes as many steps as the smallest partition allows
            steps = min(int(n) for _, n in gathered) // (columns[2] // len(infos))
            env[PARTITION_ENV] = f"{scratch}:{steps}"
        gpus = context.resources().get("gpu")
        if gpus is not None:  # Spark's GPU scheduling picked this task's GPUs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)
        fs, out = fsspec.core.url_to_fs(output_dir)
        fs.makedirs(f"{out}/logs", exist_ok=True)
        tail = deque(maxlen=60)
        with fs.open(f"{out}/logs/rank-{rank}.log", "a") as log:
            process = subprocess.Popen(worker_command(), env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, errors="replace", preexec_fn=die_with_parent)
            for line in process.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
            code = process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
        if code not in (0, LEFT_TO_GROW):  # that one: the group stopped to re-form larger
            kind = "user" if code == 2 else "peer" if code == PEER_LOST else "crash"
            raise RuntimeError(f"KTRAIN_FAILURE {rank} {kind} rank {rank} {describe_exit(code)}\n"
                               + "\n".join(tail) + " KTRAIN_END")
        yield pyarrow.RecordBatch.from_pydict({"rank": [rank], "status": [code]})

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
