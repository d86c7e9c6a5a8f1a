"""The spark strategy on a real Spark: local[2], and a standalone master + worker, loopback only;
started by ktrain run and by spark-submit."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers import (FIXTURES, KTRAIN, REPO, assert_quiet_console, assert_same_weights,
                     base_config, cli_env, elastic_config, elastic_reference, hosts_of_ranks,
                     kill_rank_one_mid_training, run_cli, run_command, with_strategy, worker_pid,
                     write_config)

pytest.importorskip("pyspark", reason="pyspark is not installed: bash scripts/setup.sh installs it")


def spark(out, strategy=None, **sections):
    return with_strategy(out, "spark", strategy, **sections)


def test_two_barrier_tasks_match_one_process(tmp_path, single_process_run):
    out = tmp_path / "out"
    result = run_cli("run", write_config(tmp_path / "c.yaml", spark(out)))
    assert_quiet_console(result, out, 2)  # Spark's own log went to logs/spark-driver.log
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["epochs_completed"]) == ("spark", 2, 3)
    assert_same_weights(single_process_run("mlp"), out)
    assert "epoch 3/3" in (out / "logs" / "rank-1.log").read_text()


def spark_submit(master: str, *args, cwd):
    """The README's command: spark-submit runs ktrain's entry file (ktrain spark-entry)."""
    entry = run_command([KTRAIN, "spark-entry"]).stdout.strip()
    return run_command([Path(sys.executable).parent / "spark-submit", "--master", master,
                        "--conf", "spark.driver.host=127.0.0.1", "--conf",
                        "spark.ui.enabled=false", entry, *args], cwd=cwd, timeout=300,
                       env={"SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable})


def test_spark_submit_shows_rank_0_and_one_summary_without_spark_chatter(tmp_path):
    """spark-submit creates the session (ktrain does not): Spark's INFO log is quieted as the
    context starts, and rank 0's epoch lines reach the console of spark-submit."""
    out = tmp_path / "out"
    result = spark_submit("local[2]", "run", write_config(tmp_path / "c.yaml", spark(out)),
                          cwd=tmp_path)
    assert_quiet_console(result, out, 2)
    spark_info = [line for line in (result.stdout + result.stderr).splitlines() if " INFO " in line]
    assert len(spark_info) <= 3, spark_info  # those Spark prints before its level can be set


def test_spark_submit_to_a_standalone_cluster_matches_one_process(tmp_path, spark_cluster,
                                                                  single_process_run):
    out = tmp_path / "out"
    result = spark_submit(spark_cluster.url, "run", write_config(tmp_path / "c.yaml", spark(out)),
                          cwd=tmp_path)
    assert_quiet_console(result, out, 2)
    assert_same_weights(single_process_run("mlp"), out)


def test_barrier_tasks_on_two_hosts_match_one_process(tmp_path, spark_on_two_hosts,
                                                      single_process_run):
    """One 1-core Spark worker per host (network namespaces 10.77.0.1 and 10.77.0.2): the two
    ranks train on two hosts, talking over the addresses their executors have."""
    cluster, out = spark_on_two_hosts, tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", spark(out, {"master": cluster.url}))
    driver = cluster.hosts.run_in(0, [KTRAIN, "run", config], cwd=tmp_path, env=cli_env(
        {"SPARK_LOCAL_IP": cluster.addresses[0], "PYSPARK_PYTHON": sys.executable}))
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output
    assert sorted(hosts_of_ranks(out)) == sorted(cluster.addresses)
    assert_same_weights(single_process_run("mlp"), out)


def test_too_many_workers_for_a_standalone_cluster_fail_fast(tmp_path, spark_cluster):
    config = spark(tmp_path / "out", {"workers": 4, "master": spark_cluster.url,
                                      "start_timeout": 10},  # how long to wait for slots
                   train={"global_batch_size": 64})
    started = time.monotonic()
    result = run_cli("run", write_config(tmp_path / "c.yaml", config), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert "needs 4 task slots; the cluster" in result.stderr and "offers 3" in result.stderr


def test_a_stage_that_loses_an_executor_goes_on_smaller_and_grows_back_exactly(
        tmp_path, spark_cluster, background):
    """Three 1-core executors, workers {min: 2, max: 3}: rank 2's executor is SIGKILLed between
    two step checkpoints; the stage re-forms on the 2 slots left, from the newest checkpoint,
    grows back to 3 once the standalone master has started another executor, and the run ends
    with the weights of one process."""
    out = tmp_path / "elastic"
    config = elastic_config(out)
    config["strategy"] = {"name": "spark", "workers": {"min": 2, "max": 3},
                          "master": spark_cluster.url, "spark_conf": {"spark.executor.cores": 1}}
    run = background("run", write_config(tmp_path / "elastic.yaml", config),
                     env={"SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable})
    run.wait_for(lambda: (out / "checkpoints" / "ckpt-000002-0000005.npz").exists()
                 and worker_pid(out, 2), timeout=240)  # at step 5 of epoch 3
    os.kill(_executor_of(worker_pid(out, 2)), signal.SIGKILL)
    run.process.wait(timeout=300)
    output = run.process.stdout.read()
    assert run.process.returncode == 0, output[-3000:]
    # from the newest checkpoint; the steps lost are counted when the survivors managed to
    # say how far they had come before Spark ended them
    assert re.search(r"the group re-formed on 2 workers after rank 2's Spark executor \S+ was "
                     r"lost \(Command exited with code 137\): continuing at step 5 of epoch 3"
                     r"( from the newest checkpoint \(steps lost since it: not known\)|, \d+ "
                     r"step\(s\) lost \(from the newest checkpoint\))", output), output[-3000:]
    assert "the group grew to 3 workers (workers are available again)" in output
    history = json.loads((out / "summary.json").read_text())["world_size_history"]
    assert [(h["kind"], h["size"]) for h in history] == [("start", 3), ("shrink", 2),
                                                         ("grow", 3)], history
    assert history[1]["step"] == 25  # the checkpoint the kill came after
    assert_same_weights(out, elastic_reference(tmp_path), atol=1e-6)


def _executor_of(pid: int) -> int:
    """The Spark executor (JVM) whose task started process ``pid``."""
    while b"CoarseGrainedExecutorBackend" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert pid > 1, "the process does not descend from a Spark executor"
    return pid


def test_too_few_slots_for_the_barrier_stage(tmp_path):
    config = spark(tmp_path / "out", {"workers": 4, "master": "local[2]"},
                   train={"global_batch_size": 64})
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2
    assert "a barrier stage of 4 tasks needs 4 task slots; local[2] has 2" in result.stderr




@pytest.mark.parametrize("restarts, session", [(0, "classic"), (1, "classic"), (0, "connect")])
def test_killed_task_fails_clearly_or_restarts(tmp_path, background, restarts, session, request):
    out = tmp_path / "out"
    epochs = 400 if restarts == 0 else 40
    config = write_config(tmp_path / "c.yaml", spark(out, {"max_restarts": restarts},
                                                      train={"epochs": epochs}))
    env = ({"SPARK_REMOTE": request.getfixturevalue("spark_connect").url}
           if session == "connect" else None)
    code, output, seconds = kill_rank_one_mid_training(background, config, out, env)
    if restarts == 0:
        assert seconds < 60
        assert code == 1, output
        assert "rank 1 was killed by SIGKILL" in output and "rank-1.log" in output
    else:
        assert code == 0, output
        assert "restarting all workers from the newest checkpoint" in output
        assert json.loads((out / "summary.json").read_text())["epochs_completed"] == epochs


@pytest.fixture
def digits_parquet(tmp_path):
    import pandas as pd

    from ktrain.userfn import load_function

    x, y = load_function(f"{FIXTURES}:digits", "data.fn", str(tmp_path))()
    frame = pd.DataFrame(x, columns=[f"p{i}" for i in range(64)]).assign(label=y)
    frame.to_parquet(tmp_path / "digits.parquet")
    return tmp_path / "digits.parquet"


def test_parquet_partitions_train_as_well_as_the_array_path(tmp_path, digits_parquet):
    train = {"epochs": 8, "validation_split": 0.2, "seed": 0, "shuffle": True,
             "optimizer": {"name": "adam", "learning_rate": 0.003}}
    model = {"fn": f"{FIXTURES}:mlp", "kwargs": {"hidden": 64}}
    # The quickstart's own data fn: a random 20% held out, as the Parquet path does.
    arrays = base_config(tmp_path / "arrays", model=model, train={**train, "validation_split": 0},
                         data={"fn": f"{REPO / 'configs' / 'digits.py'}:load_data"})
    partitions = spark(tmp_path / "parquet", model=model, train=train)
    partitions["data"] = {"parquet": str(digits_parquet), "label": "label",
                          "features": [f"p{i}" for i in range(64)]}
    accuracy = {}
    for name, config in (("arrays", arrays), ("parquet", partitions)):
        result = run_cli("run", write_config(tmp_path / f"{name}.yaml", config), "-q")
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        accuracy[name] = summary["final_metrics"]["val_accuracy"]
    assert accuracy["parquet"] >= 0.9 and accuracy["arrays"] >= 0.9
    assert abs(accuracy["parquet"] - accuracy["arrays"]) < 0.05


def test_parquet_column_that_does_not_exist(tmp_path, digits_parquet):
    config = spark(tmp_path / "out")
    config["data"] = {"parquet": str(digits_parquet), "label": "digit",
                      "features": ["p0", "p1"]}
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2
    assert "data.label: column(s) ['digit'] are not in" in result.stderr
    assert "p63, label" in result.stderr


def test_an_elastic_stage_refuses_data_that_spark_partitions_by_task(tmp_path, digits_parquet):
    config = spark(tmp_path / "out", {"workers": {"min": 1, "max": 2}})
    config["data"] = {"parquet": str(digits_parquet), "label": "label", "features": ["p0"]}
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2, result.stderr
    assert "strategy.workers: strategy.workers is a range, and data.parquet gives each Spark " \
           "task a partition of its own" in result.stderr, result.stderr
    assert "read the same Parquet files with data.files" in result.stderr
    assert not (tmp_path / "out").exists()


def test_parquet_input_needs_the_spark_strategy(tmp_path, digits_parquet):
    config = base_config(tmp_path / "out")
    config["data"] = {"parquet": str(digits_parquet), "label": "label", "features": ["p0"]}
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2 and "need the spark strategy" in result.stderr


def test_a_spark_connect_session_matches_one_process(tmp_path, spark_connect,
                                                     single_process_run):
    """SPARK_REMOTE makes PySpark's sessions Spark Connect ones, which have no RDDs: the
    barrier stage runs as mapInArrow(barrier=True) on the server's executors."""
    out = tmp_path / "out"
    result = run_cli("run", write_config(tmp_path / "c.yaml", spark(out)),
                     env={"SPARK_REMOTE": spark_connect.url})
    assert_quiet_console(result, out, 2)
    assert f"({spark_connect.url})" in result.stdout
    assert_same_weights(single_process_run("mlp"), out)


def test_executors_whose_python_lacks_ktrain_are_a_clear_error(tmp_path):
    """The executors run the interpreter this venv was made from, without its packages."""
    result = run_cli("run", write_config(tmp_path / "c.yaml", spark(tmp_path / "out")),
                     env={"PYSPARK_PYTHON": sys._base_executable})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Spark's Python workers cannot import 'ktrain'" in result.stderr
    assert "PYSPARK_PYTHON" in result.stderr and "Traceback" not in result.stderr


def test_no_spark_connect_server_at_the_address_is_a_clear_error(tmp_path):
    from clusters import free_port

    url = f"sc://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli("run", write_config(tmp_path / "c.yaml", spark(tmp_path / "out",
                                                                    {"master": url})))
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert f"no Spark Connect server answers at {url}" in result.stderr
    assert "strategy.master" in result.stderr and "start-connect-server.sh" in result.stderr
