"""The ray strategy on a real local Ray (loopback only, no dashboard), also beside a running
Ray cluster (in a network namespace the test made)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import (FIXTURES, assert_quiet_console, assert_same_weights, elastic_config,
                     elastic_reference, hosts_of_ranks, kill_rank_one_mid_training, run_cli,
                     run_command, with_strategy, write_config)

pytest.importorskip("ray", reason="ray is not installed: bash scripts/setup.sh installs it")


def ray_config(out, strategy=None, **sections):
    return with_strategy(out, "ray", strategy, **sections)


def test_two_actors_match_one_process(tmp_path, single_process_run):
    out = tmp_path / "out"
    result = run_cli("run", write_config(tmp_path / "c.yaml", ray_config(out)))
    assert_quiet_console(result, out, 2)  # rank 0's progress reached the driver's console
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["epochs_completed"]) == ("ray", 2, 3)
    assert_same_weights(single_process_run("mlp"), out)


def test_more_gpus_than_the_cluster_has_fails_fast(tmp_path):
    config = ray_config(tmp_path / "out", {"workers": 1, "resources_per_worker": {"GPU": 3}},
                        train={"global_batch_size": 64})
    started = time.monotonic()
    result = run_cli("run", write_config(tmp_path / "c.yaml", config), timeout=120)
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert "GPU: needs 3, has 0" in result.stderr and "strategy.resources_per_worker" in result.stderr




@pytest.mark.parametrize("failures", [0, 1])
def test_killed_actor_fails_clearly_or_restarts(tmp_path, background, failures):
    out = tmp_path / "out"
    epochs = 400 if failures == 0 else 40
    config = write_config(tmp_path / "c.yaml", ray_config(out, {"max_failures": failures},
                                                          train={"epochs": epochs}))
    code, output, seconds = kill_rank_one_mid_training(background, config, out)
    if failures == 0:
        assert seconds < 60
        assert code == 1, output
        assert "rank 1's actor died" in output
    else:
        assert code == 0, output
        assert "restarting all workers from the newest checkpoint" in output
        assert json.loads((out / "summary.json").read_text())["epochs_completed"] == epochs


@pytest.mark.parametrize("data_fn, validation_split", [
    ("digits_ray_dataset", 0.2),  # held out by Ray's train_test_split
    ("digits_ray_datasets", 0.0)])  # {"train": ..., "validation": ...}, streamed throughout
def test_each_actor_streams_its_share_of_a_ray_dataset(tmp_path, data_fn, validation_split):
    out = tmp_path / "out"
    config = ray_config(out, train={"epochs": 15, "validation_split": validation_split,
                                    "seed": 0, "shuffle": True,
                                    "optimizer": {"name": "adam", "learning_rate": 0.003}},
                        model={"fn": f"{FIXTURES}:mlp", "kwargs": {"hidden": 64}})
    config["data"] = {"fn": f"{FIXTURES}:{data_fn}", "label": "label",
                      "features": [f"p{i}" for i in range(64)]}
    result = run_cli("run", write_config(tmp_path / "c.yaml", config), "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    console = result.stdout + result.stderr
    assert "ran out of data" not in console and "AutoGraph could not" not in console, console
    assert "Starting execution of Dataset" not in console, console  # Ray Data's, under -q
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_metrics"]["val_accuracy"] >= 0.85


def test_without_an_address_ktrain_starts_its_own_ray_beside_a_running_cluster(
        tmp_path, ray_head, single_process_run):
    """A Ray head runs on this machine (in a namespace); Ray records it in /tmp/ray, where a
    plain ray.init() would find it and attach."""
    # The head wrote this record as it started; a private Ray that an earlier test shut down
    # may have removed it since, so it is written again, as Ray writes it.
    ray_head.MARKER.write_text(ray_head.address)
    out = tmp_path / "out"
    result = run_cli("run", write_config(tmp_path / "c.yaml", ray_config(out)))
    assert_quiet_console(result, out, 2)
    assert_same_weights(single_process_run("mlp"), out)


def ray_job_submit(head, project: Path, *ktrain_args, timeout: float = 300):
    """The README's command, run from the project folder."""
    return run_command(head.command("ray", "job", "submit", "--address", head.jobs_url,
                                    "--working-dir", ".", "--", "ktrain", "run", *ktrain_args),
                       cwd=project, env=head.env, timeout=timeout)


def test_ray_job_submit_trains_on_the_cluster_like_one_process(tmp_path, ray_head,
                                                               single_process_run):
    out = tmp_path / "out"
    project = tmp_path / "project"
    project.mkdir()
    write_config(project / "config.yaml", ray_config(out, {"address": "auto"}))
    result = ray_job_submit(ray_head, project, "config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("done:") == 1 and "epoch 3/3" in result.stdout, result.stdout
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(single_process_run("mlp"), out)


def test_ray_workers_on_two_hosts_match_one_process(tmp_path, ray_head, single_process_run):
    """The cluster has a worker node on a second host (10.77.0.2); strict_spread puts one
    actor on each node, and the ranks talk over the nodes' addresses."""
    out = tmp_path / "out"
    project = tmp_path / "project"
    project.mkdir()
    write_config(project / "config.yaml",
                 ray_config(out, {"address": "auto", "placement": "strict_spread"}))
    result = ray_job_submit(ray_head, project, "config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(hosts_of_ranks(out)) == sorted(ray_head.hosts.addresses)
    assert_same_weights(single_process_run("mlp"), out)


def test_ray_job_submit_refuses_outputs_that_vanish_with_the_job(tmp_path, ray_head):
    project = tmp_path / "project"
    project.mkdir()
    write_config(project / "config.yaml", ray_config("runs/here"))  # relative: in Ray's copy
    result = ray_job_submit(ray_head, project, "config.yaml")
    assert result.returncode != 0
    assert "inside Ray's temporary copy of --working-dir" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout


def test_an_elastic_group_goes_on_without_a_lost_node_and_grows_back_when_one_joins(
        tmp_path, ray_head):
    """The module's last test: it kills the cluster's worker node, then starts another. Three
    actors of 2 CPUs each, two on the head (4 CPUs) and one on the worker node (2): the node is
    SIGKILLed between two step checkpoints; the two actors left go on from the step they hold,
    the group grows back to 3 when a node joins again, and ends with one process' weights."""
    out, project = tmp_path / "elastic", tmp_path / "project"
    project.mkdir()
    config = elastic_config(out)
    config["strategy"] = {"name": "ray", "address": "auto", "workers": {"min": 2, "max": 3},
                          "resources_per_worker": {"CPU": 2}}
    config["train"]["callbacks"]["kwargs"]["seconds"] = 0.4  # time for a node to join:
    config["train"]["epochs"] = 9  # under load a node took ~20 s, and 6 epochs had ended
    write_config(project / "config.yaml", config)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(ray_job_submit, ray_head, project, "config.yaml", timeout=500)
        wait_until(lambda: (out / "checkpoints" / "ckpt-000002-0000005.npz").exists(), job)
        on_node = hosts_of_ranks(out, 3).index(ray_head.hosts.addresses[1])
        ray_head.kill_node()
        chief = out / "logs" / "rank-0.log"
        wait_until(lambda: "rank 0 of 2 joined" in chief.read_text(), job)
        ray_head.add_node()
        result = job.result()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"the group re-formed on 2 workers after rank {on_node}'s actor died" in output, \
        output[-3000:]
    assert "the group grew to 3 workers (workers are available again)" in output
    history = json.loads((out / "summary.json").read_text())["world_size_history"]
    assert [(h["kind"], h["size"]) for h in history] == [("start", 3), ("shrink", 2),
                                                         ("grow", 3)], history
    if history[1]["step"] < 30:  # mid-epoch (not while epoch 3's end was under way)
        assert history[1]["steps_lost"] == 0, output[-3000:]
    assert_same_weights(out, elastic_reference(tmp_path, epochs=9), atol=1e-6)


def wait_until(condition, job, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert not job.done(), job.result().stdout[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
