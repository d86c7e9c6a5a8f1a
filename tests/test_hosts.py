"""Two "hosts" (network namespaces with their own addresses, 10.77.0.1 and 10.77.0.2): workers
that find each other across addresses other than loopback, as on a real cluster."""

import json

import pytest

from helpers import KTRAIN, assert_same_weights, cli_env, with_strategy, write_config


def tf_config(hosts, rank: int) -> dict:
    workers = [f"{address}:{23456}" for address in hosts.addresses]
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                     "task": {"type": "worker", "index": rank}})}


def slurm_step(hosts, rank: int) -> dict:
    """What srun puts in each task's environment, one task per node."""
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
            "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": ",".join(hosts.addresses)}


@pytest.mark.parametrize("environment", [tf_config, slurm_step], ids=["TF_CONFIG", "srun"])
def test_tf_collectives_across_two_hosts_match_one_process(tmp_path, two_hosts, environment,
                                                           single_process_run):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, "multiworker"))
    workers = [two_hosts.run_in(rank, [KTRAIN, "run", config], cwd=tmp_path,
                                env=cli_env(environment(two_hosts, rank))) for rank in (0, 1)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)
    assert "rank 0 of 2 joined" in outputs[0]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(single_process_run("mlp"), out)
