"""Where is ktrain running? The one place that reads schedulers' environment variables.

Probed in this order, first match wins: ktrain's own launcher (KTRAIN_*) > torchrun >
horovodrun (Gloo) > TF_CONFIG > SLURM (inside an ``srun`` step) > Open MPI > MPICH/PMI > local
(the innermost launcher first: torchrun inside an ``srun`` step sees SLURM's variables too). Schedulers that differ only in
variable names are rows of a table, not code.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterEnvironment:
    name: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    nodes: tuple[str, ...] = ("127.0.0.1",)
    """The hosts of this launch; rank 0 runs on the first."""
    master_port: int = 29500
    """Where rank 0 listens for the others (see ktrain.rendezvous)."""
    hint: str | None = None
    """A likely misconfiguration worth telling the user about."""
    one_host: bool = False
    """Every rank runs on this host (as far as the launcher tells)."""

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @property
    def launcher(self) -> str:
        """What started the ranks, as the user typed it."""
        return _LAUNCHERS.get(self.name, self.name)


# scheduler -> (rank, local rank, world size, ranks on this host) variable names
_SCHEDULERS = {
    "ktrain": ("KTRAIN_RANK", "KTRAIN_LOCAL_RANK", "KTRAIN_WORLD_SIZE", None),
    "torchrun": ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
    "horovodrun": ("HOROVOD_RANK", "HOROVOD_LOCAL_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", None),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),
}


_LAUNCHERS = {"slurm": "srun", "openmpi": "mpirun", "mpich": "mpiexec", "tf_config": "TF_CONFIG",
              "ktrain": "ktrain", "torchrun": "torchrun"}


def detect(env: dict[str, str] | None = None) -> ClusterEnvironment:
    env = os.environ if env is None else env
    if _SCHEDULERS["ktrain"][0] in env:
        return _from_ktrain(env)
    if TORCHRUN_ENV in env:
        return _from_torchrun(env)
    if _SCHEDULERS["horovodrun"][0] in env:
        return _from_table("horovodrun", env)
    if "TF_CONFIG" in env:
        return _from_tf_config(json.loads(env["TF_CONFIG"]))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _from_slurm(env)
    for name in ("openmpi", "mpich"):
        if _SCHEDULERS[name][0] in env:
            return _from_table(name, env)
    if int(env.get("SLURM_NTASKS", 1)) > 1:
        return ClusterEnvironment("local", hint=(
            f"this SLURM allocation has {env['SLURM_NTASKS']} tasks but ktrain was started "
            f"without srun, so it runs as one process; start it with `srun ktrain run ...`"))
    return ClusterEnvironment("local")


def visible_gpus(env: dict[str, str] | None = None, devices: str = "/dev") -> int:
    """The NVIDIA GPUs this process may use, told without loading a framework (a launcher never
    loads one): the driver's device files, narrowed by CUDA_VISIBLE_DEVICES, which CUDA reads
    up to its first invalid entry ("-1" hides them all)."""
    env = os.environ if env is None else env
    present = len(glob.glob(os.path.join(devices, "nvidia[0-9]*")))
    if "CUDA_VISIBLE_DEVICES" not in env:
        return present
    chosen = 0
    for entry in env["CUDA_VISIBLE_DEVICES"].split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        chosen += 1
    return min(present, chosen)


def _from_table(name: str, env) -> ClusterEnvironment:
    rank_var, local_var, size_var, local_size_var = _SCHEDULERS[name]
    size = int(env.get(size_var, 1))
    return ClusterEnvironment(name, int(env[rank_var]), int(env.get(local_var, 0)), size,
                              one_host=env.get(local_size_var or "", "") == str(size))


def _from_tf_config(spec: dict) -> ClusterEnvironment:
    workers = spec.get("cluster", {}).get("worker", [])
    hosts = tuple(w.rsplit(":", 1)[0] for w in workers) or ("127.0.0.1",)
    return ClusterEnvironment("tf_config", spec.get("task", {}).get("index", 0), 0,
                              max(len(workers), 1), hosts)


PEERS_ENV = "KTRAIN_PEERS"
"""host:port of every rank, comma-separated, when ktrain itself started the workers."""
MASTER_ENV = "KTRAIN_MASTER"
"""host:port where rank 0 gathers the others' addresses (``ktrain.rendezvous``), when ktrain
started the workers on other hosts (one ``srun`` step each) and cannot know their free ports."""
PORT_ENV = "KTRAIN_PORT"
"""Overrides the port rank 0 listens on for the others."""
PARTITION_ENV = "KTRAIN_DATA_PARTITION"
"""path:steps of a worker's own data partition, set by the Spark barrier task that starts it."""


def rank_environment(rank: int, world_size: int, local_rank: int = 0,
                     peers: list[str] | None = None, master: str | None = None) -> dict[str, str]:
    """The variables by which ktrain gives a process it starts its place (``detect`` reads them
    back as the "ktrain" scheduler); ``peers``: every rank's host:port, or ``master``: where
    rank 0 gathers them."""
    rank_var, local_var, size_var, _ = _SCHEDULERS["ktrain"]
    env = {rank_var: str(rank), local_var: str(local_rank), size_var: str(world_size)}
    if peers is not None:
        env[PEERS_ENV] = ",".join(peers)
    if master is not None:
        env[MASTER_ENV] = master
    return env


def _from_ktrain(env) -> ClusterEnvironment:
    found = _from_table("ktrain", env)
    if MASTER_ENV not in env:
        return found
    host, _, port = env[MASTER_ENV].rpartition(":")
    return ClusterEnvironment("ktrain", found.rank, found.local_rank, found.world_size, (host,),
                              int(port))


TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"
"""Set by torchrun (``torch.distributed.run``) in every process it starts; RANK alone could be
anyone's."""


def _from_torchrun(env) -> ClusterEnvironment:
    found = _from_table("torchrun", env)
    # torchrun's own store listens at MASTER_PORT: rank 0 gathers the ranks one port above.
    port = int(env.get(PORT_ENV) or int(env.get("MASTER_PORT", 29499)) + 1)
    host = "127.0.0.1" if found.one_host else env.get("MASTER_ADDR", "127.0.0.1")
    return ClusterEnvironment("torchrun", found.rank, found.local_rank, found.world_size,
                              (host,), port, one_host=found.one_host)


def _from_slurm(env) -> ClusterEnvironment:
    found = _from_table("slurm", env)
    nodes = parse_slurm_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                 or env.get("SLURM_NODELIST", ""))
    # Every task derives the same port without talking to the others; concurrent steps of one
    # job get different ones.
    job, step = (int(env[v]) if env.get(v, "").isdigit() else 0
                 for v in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
    port = int(env.get(PORT_ENV) or 20000 + (job * 64 + step) % 10000)
    return ClusterEnvironment("slurm", found.rank, found.local_rank, found.world_size,
                              nodes or ("127.0.0.1",), port, one_host=len(set(nodes)) <= 1)


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of a job that ``ray job submit`` started."""


def ray_job_working_dir(env: dict[str, str] | None = None) -> str | None:
    """Under ``ray job submit --working-dir``: the folder of Ray's temporary copy (this
    process' working directory), which is deleted with the job's cluster. Else None."""
    env = os.environ if env is None else env
    if RAY_JOB_ENV not in env:
        return None
    runtime_env = json.loads(env[RAY_JOB_ENV]).get("runtime_env") or {}
    return os.getcwd() if runtime_env.get("working_dir") else None


def parse_slurm_nodelist(nodelist: str) -> tuple[str, ...]:
    """Expand ``gpu[01-04,07],cpu1`` into host names without calling ``scontrol``."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            start, _, end = part.partition("-")
            for number in range(int(start), int(end or start) + 1):
                hosts.append(f"{prefix}{number:0{len(start)}d}")
    return tuple(hosts)
