"""Two "hosts" (network namespaces with their own addresses, 10.77.0.1 and 10.77.0.2): workers
that find each other across addresses other than loopback, as on a real cluster; and a real
two-node SLURM with one slurmd on each."""

import json

import pytest

from clusters import TwoHosts
from helpers import (KTRAIN, assert_same_weights, cli_env, needs_horovod, run_command,
                     with_strategy, write_config)


def tf_config(hosts, rank: int) -> dict:
    workers = [f"{address}:{23456}" for address in hosts.addresses]
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                     "task": {"type": "worker", "index": rank}})}


def slurm_step(hosts, rank: int) -> dict:
    """What srun puts in each task's environment, one task per node."""
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
            "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": ",".join(hosts.addresses)}


def test_workers_given_tf_config_across_two_hosts_match_one_process(tmp_path, two_hosts,
                                                                  single_process_run):
    """TF_CONFIG alone says where the workers are (srun's environment: the real srun, across two
    nodes, below)."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, "multiworker"))
    workers = [two_hosts.run_in(rank, [KTRAIN, "run", config], cwd=tmp_path,
                                env=cli_env(tf_config(two_hosts, rank))) for rank in (0, 1)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)
    assert "rank 0 of 2 joined" in outputs[0]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(single_process_run("mlp"), out)


@pytest.mark.parametrize("strategy", [
    pytest.param({"name": "multiworker", "communicator": "mpi"}, id="mpi4py"),
    pytest.param({"name": "multiworker", "communicator": "collective"}, id="tf-collectives"),
    pytest.param({"name": "horovod"}, id="horovod-gloo", marks=needs_horovod),
    pytest.param({"name": "horovod", "controller": "mpi"}, id="horovod-mpi", marks=needs_horovod),
])
def test_mpirun_across_two_hosts_matches_one_process(tmp_path, two_hosts, strategy,
                                                     single_process_run):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, strategy["name"], strategy))
    mpirun = two_hosts.run_in(0, two_hosts.mpirun(tmp_path, [KTRAIN, "run", config]),
                              cwd=tmp_path, env=cli_env())
    output = mpirun.communicate(timeout=300)[0]
    assert mpirun.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    # mpirun only starts the ranks: each transport then carries the gradients, collectives too
    assert (summary["world_size"], summary["transport"]) == (
        2, strategy.get("communicator", strategy["name"]))
    assert_same_weights(single_process_run("mlp"), out)


def test_a_network_interface_this_host_lacks_is_a_clear_error(tmp_path, two_hosts):
    config = write_config(tmp_path / "c.yaml", with_strategy(
        tmp_path / "out", "multiworker", {"network_interface": "ib0"}))
    worker = two_hosts.run_in(1, [KTRAIN, "run", config], cwd=tmp_path,
                              env=cli_env(slurm_step(two_hosts, 1)))
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 2, output
    assert "strategy.network_interface 'ib0'" in output and TwoHosts.INTERFACE in output


@needs_horovod
def test_horovod_gloo_where_host_names_resolve_to_loopback_is_a_clear_error(tmp_path, two_hosts):
    """Horovod's Gloo would abort with "connect [127.0.0.1]:N: Connection refused"."""
    config = write_config(tmp_path / "c.yaml", with_strategy(tmp_path / "out", "horovod"))
    workers = [two_hosts.run_in(rank, [KTRAIN, "run", config], cwd=tmp_path, own_hostname=False,
                                env=cli_env(slurm_step(two_hosts, rank))) for rank in (0, 1)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [2, 2], "\n".join(outputs)
    for output, address in zip(outputs, two_hosts.addresses):
        assert "resolves to 127.0.0.1" in output and f"to {address}" in output, output
        assert "Traceback" not in output


@pytest.mark.parametrize("strategy, srun_options", [
    pytest.param({"name": "multiworker"}, ["-N2", "-n4", "--distribution=cyclic"],
                 id="tf-collectives-cyclic"),  # auto: no PMIx; two tasks on each node
    pytest.param({"name": "multiworker", "communicator": "mpi"}, ["-N2", "-n2", "--mpi=pmix"],
                 id="mpi4py"),
    pytest.param({"name": "horovod", "controller": "mpi"}, ["-N2", "-n2", "--mpi=pmix"],
                 id="horovod-mpi", marks=needs_horovod),
    pytest.param({"name": "horovod", "network_interface": TwoHosts.INTERFACE},
                 ["-N2", "-n4", "--distribution=cyclic"], id="horovod-gloo-cyclic",
                 marks=needs_horovod),
])
def test_srun_across_two_nodes_matches_one_process(tmp_path, slurm_on_two_hosts, strategy,
                                                   srun_options, single_process_run):
    slurm, out = slurm_on_two_hosts, tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, strategy["name"], strategy))
    result = run_command(slurm.command("srun", *srun_options, KTRAIN, "run", config),
                         env=slurm.env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == int(srun_options[1][2:])
    assert_same_weights(single_process_run("mlp"), out)
    assert result.stdout.count("done:") == 1, result.stdout  # the ranks share one terminal
    assert "help file" not in result.stdout + result.stderr  # Open MPI/PMIx "Sorry!" boxes


def test_a_step_on_one_node_of_a_two_node_job(tmp_path, slurm_on_two_hosts, single_process_run):
    """Rank 0 is on the step's first node, not the job's (10.77.0.1 runs nothing here)."""
    slurm, out = slurm_on_two_hosts, tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, "multiworker"))
    script = tmp_path / "step.sh"
    script.write_text(f"#!/bin/bash\nsrun -N1 -n2 --relative=1 {KTRAIN} run {config}\n")
    result = run_command(slurm.command("sbatch", "--wait", "-N2", "--ntasks-per-node=2",
                                       f"--output={tmp_path}/job.out", script),
                         env=slurm.env, timeout=300)
    assert result.returncode == 0, (tmp_path / "job.out").read_text()
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(single_process_run("mlp"), out)
