"""Where is ktrain running? The one place that reads schedulers' environment variables.

Probed in this order, first match wins: ktrain's own launcher > TF_CONFIG > SLURM >
Open MPI > MPICH/PMI > local. Schedulers that differ only in variable names are rows of a
table, not code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterEnvironment:
    name: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    nodes: tuple[str, ...] = ("127.0.0.1",)

    @property
    def master_addr(self) -> str:
        return self.nodes[0]


# scheduler -> (rank, local rank, world size) variable names
_SCHEDULERS = {
    "ktrain": ("KTRAIN_RANK", "KTRAIN_LOCAL_RANK", "KTRAIN_WORLD_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    "mpich": ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
}


def detect(env: dict[str, str] | None = None) -> ClusterEnvironment:
    env = os.environ if env is None else env
    if "KTRAIN_RANK" in env:
        return _from_table("ktrain", env)
    if "TF_CONFIG" in env:
        spec = json.loads(env["TF_CONFIG"])
        workers = spec.get("cluster", {}).get("worker", [])
        index = spec.get("task", {}).get("index", 0)
        return ClusterEnvironment("tf_config", index, 0, max(len(workers), 1),
                                  tuple(w.rsplit(":", 1)[0] for w in workers) or ("127.0.0.1",))
    for name in ("slurm", "openmpi", "mpich"):
        if _SCHEDULERS[name][0] in env:
            return _from_table(name, env)
    return ClusterEnvironment("local")


def _from_table(name: str, env) -> ClusterEnvironment:
    rank_var, local_var, size_var = _SCHEDULERS[name]
    nodes = ("127.0.0.1",)
    if name == "slurm" and env.get("SLURM_JOB_NODELIST"):
        nodes = parse_slurm_nodelist(env["SLURM_JOB_NODELIST"])
    return ClusterEnvironment(name, int(env[rank_var]), int(env.get(local_var, 0)),
                              int(env.get(size_var, 1)), nodes)


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


def describe() -> str:
    """The report ``ktrain env`` prints."""
    lines = [f"python      {platform.python_version()} ({platform.platform()})"]
    for package in ("ktrain-launcher", "tensorflow", "tensorflow-cpu", "keras", "horovod",
                    "mpi4py", "pyspark", "ray", "fsspec"):
        try:
            lines.append(f"{package:<11} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            if package not in ("tensorflow", "tensorflow-cpu"):
                lines.append(f"{package:<11} not installed")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    lines.append(f"devices     {len(gpus)} GPU(s): {[g.name for g in gpus]}; "
                 f"{os.cpu_count()} CPU core(s)")
    found = detect()
    lines.append(f"cluster     {found.name}: rank {found.rank} of {found.world_size}, "
                 f"local rank {found.local_rank}, nodes {', '.join(found.nodes)}")
    return "\n".join(lines)
