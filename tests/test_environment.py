"""Cluster detection, with the schedulers' environment variables faked (never the engine)."""

import importlib.util

import pytest

from ktrain.allocation import Allocation
from ktrain.environment import detect, parse_slurm_nodelist, rank_environment, visible_gpus
from ktrain.errors import UserError
from ktrain.strategies import multiworker

pytestmark = pytest.mark.fast  # the fast tier: README, Development


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07]", ("gpu01", "gpu02", "gpu03", "gpu04", "gpu07")),
    ("node1,node2", ("node1", "node2")),
    ("a[8-10],b", ("a8", "a9", "a10", "b")),
    ("rack1-n[001-002]", ("rack1-n001", "rack1-n002")),
])
def test_slurm_nodelists_expand_without_scontrol(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


SLURM_STEP = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
              "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu[01-02]"}


def test_srun_step():
    found = detect(SLURM_STEP)
    assert (found.name, found.rank, found.local_rank, found.world_size) == ("slurm", 3, 1, 4)
    assert found.nodes == ("gpu01", "gpu02") and found.master_addr == "gpu01"
    # a step on some of the job's nodes: rank 0 is on the step's first node
    assert detect({**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu02"}).master_addr == "gpu02"
    # concurrent steps of one job listen on different ports; KTRAIN_PORT overrides
    assert detect({**SLURM_STEP, "SLURM_STEP_ID": "1"}).master_port != found.master_port
    assert detect({**SLURM_STEP, "KTRAIN_PORT": "23456"}).master_port == 23456


def test_sbatch_without_srun_is_local_with_a_hint():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    found = detect(env)
    assert found.name == "local" and found.world_size == 1
    assert "without srun" in found.hint and "4 tasks" in found.hint


def test_a_batch_scripts_allocation_places_ranks_from_its_own_node_on():
    """Where an elastic group's srun steps go (ktrain.allocation); rank 0 beside the launcher."""
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-03]",
           "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURMD_NODENAME": "gpu02"}
    allocation = Allocation.of_this_process(env)
    assert (allocation.nodes, allocation.slots, allocation.tasks) == (
        ("gpu02", "gpu01", "gpu03"), (2, 2, 1), 5)
    assert allocation.places(4, ("gpu02", "gpu03")) == [("gpu02", 0), ("gpu02", 1), ("gpu03", 0)]
    assert Allocation.of_this_process({**env, "SLURM_STEP_ID": "0"}) is None  # inside srun
    # the ranks it starts: ktrain's own, gathering their addresses at rank 0
    found = detect({**SLURM_STEP, **rank_environment(1, 3, master="gpu02:23456")})
    assert (found.name, found.rank, found.world_size, found.master_addr, found.master_port) == (
        "ktrain", 1, 3, "gpu02", 23456)


def test_order_of_precedence():
    ktrain = {"KTRAIN_RANK": "1", "KTRAIN_LOCAL_RANK": "1", "KTRAIN_WORLD_SIZE": "2"}
    assert detect({**SLURM_STEP, **ktrain}).name == "ktrain"
    tf_config = {"TF_CONFIG": '{"cluster": {"worker": ["h1:2222", "h2:2222"]}, '
                              '"task": {"type": "worker", "index": 1}}'}
    found = detect({**SLURM_STEP, **tf_config})
    assert (found.name, found.rank, found.world_size, found.nodes) == ("tf_config", 1, 2, ("h1", "h2"))
    assert detect(SLURM_STEP).name == "slurm"
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert (detect(ompi).name, detect(ompi).rank) == ("openmpi", 1)
    assert detect({"PMI_RANK": "2", "PMI_SIZE": "3"}).world_size == 3
    assert detect({}).name == "local"


def test_torchrun_inside_srun_is_torchrun_and_gathers_beside_its_store():
    torchrun = {"TORCHELASTIC_RUN_ID": "r1", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}
    found = detect({**SLURM_STEP, **torchrun})
    assert (found.name, found.rank, found.local_rank, found.world_size, found.master_addr,
            found.master_port, found.launcher) == ("torchrun", 3, 1, 4, "gpu01", 29501,
                                                   "torchrun")
    one_host = detect({**torchrun, "LOCAL_WORLD_SIZE": "4", "KTRAIN_PORT": "23456"})
    assert (one_host.master_addr, one_host.master_port) == ("127.0.0.1", 23456)
    assert detect({"RANK": "1", "WORLD_SIZE": "2"}).name == "local"  # RANK alone: anyone's


def test_auto_communicator_is_mpi_where_mpi_joins_the_ranks(monkeypatch):
    def choose(env):
        return multiworker.choose_communicator(detect(env), env)

    mpirun = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert choose({}) == ("mpi", "mpi4py and mpirun are installed")  # ktrain starts them
    assert choose(mpirun) == ("mpi", "mpirun started the ranks")
    assert choose({**SLURM_STEP, "PMIX_RANK": "3"}) == ("mpi", "srun --mpi=pmix started the ranks")
    assert choose(SLURM_STEP) == ("collective", "srun started the ranks without an MPI world")
    assert choose({"KTRAIN_RANK": "1", "KTRAIN_WORLD_SIZE": "2"})[0] == "collective"

    monkeypatch.setattr(multiworker, "visible_gpus", lambda env: 1)
    assert choose(mpirun) == ("collective", "GPUs: TF collectives reduce on them with NCCL")
    monkeypatch.setattr(multiworker, "visible_gpus", lambda env: 0)
    assert multiworker.choose_communicator(detect(mpirun), mpirun, compression="bf16") == (
        "collective", "compression: bf16 travels over TF collectives")

    def no_mpirun():
        raise UserError("mpirun was not found")
    monkeypatch.setattr(multiworker, "find_mpirun", no_mpirun)
    assert choose({}) == ("collective", "mpirun was not found")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mpi4py" else find_spec(name, *a))
    assert choose(mpirun) == ("collective", "mpi4py is not installed")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert choose(mpirun)[0] == "collective"


def test_visible_gpus_are_the_drivers_devices_narrowed_by_cuda_visible_devices(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert visible_gpus({}, str(tmp_path)) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1"}, str(tmp_path)) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, str(tmp_path)) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, str(tmp_path)) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, str(tmp_path)) == 2
    assert visible_gpus({}, str(tmp_path / "none")) == 0
