"""The SLURM allocation of a batch script (or ``salloc`` shell) that runs ``ktrain run`` itself,
outside any ``srun`` step: where an elastic group's ranks run, each as a one-task ``srun`` step
of its own, so that the group can go on with the ranks left when one ends, and start ranks on
the allocation's nodes again.

What SLURM allows: steps start and end within a job's allocation at any time, on any of its
nodes (``srun --nodelist``), and a step that fails ends that step only; ``--overlap`` lets the
steps of a node share its resources, as the processes of ktrain's launcher share a machine.
What it does not: a running job's allocation never grows, so a group grows back onto the nodes
it was given only; and a node that fails ends the whole job unless it was submitted with
``--no-kill`` (then the group goes on without the node, which SLURM marks down).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from ktrain.environment import parse_slurm_nodelist

_UP = {"allocated", "mixed", "idle", "completing"}
"""sinfo's long node states (``%T``) in which a node runs steps; "*" after one: not responding."""
PROBE_TIMEOUT = 30.0
"""Seconds a node has to run an empty step before it does not count as room to grow."""


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: tuple[str, ...]
    """In the order ranks fill them: the batch host (where the launcher runs) first."""
    slots: tuple[int, ...]
    """How many ranks each node takes: its tasks in the allocation (``SLURM_TASKS_PER_NODE``)."""
    launcher_host: str | None
    """The node this process runs on (a batch script's); None in ``salloc`` on a login node."""

    @classmethod
    def of_this_process(cls, env: dict[str, str] | None = None) -> Allocation | None:
        """The allocation this process runs in outside any step, else None."""
        env = os.environ if env is None else env
        if "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" in env:
            return None
        nodes = parse_slurm_nodelist(env.get("SLURM_JOB_NODELIST", ""))
        if not nodes:
            return None
        slots = _tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""), len(nodes))
        here = env.get("SLURMD_NODENAME")
        order = sorted(range(len(nodes)), key=lambda i: nodes[i] != here)  # stable: here first
        return cls(env["SLURM_JOB_ID"], tuple(nodes[i] for i in order),
                   tuple(slots[i] for i in order), here if here in nodes else None)

    @property
    def tasks(self) -> int:
        return sum(self.slots)

    def up(self) -> tuple[str, ...]:
        """The nodes of the allocation that SLURM says run steps now, in order."""
        listed = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(self.nodes), "-o", "%N %T"],
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        states = dict(line.split() for line in listed.stdout.splitlines() if line.strip())
        return tuple(node for node in self.nodes if states.get(node, "").rstrip("+") in _UP)

    def places(self, size: int, nodes: tuple[str, ...]) -> list[tuple[str, int]]:
        """(node, local rank) of ranks 0..size-1, filling ``nodes`` (some of the allocation's)
        in order; fewer where they have fewer slots."""
        places = [(node, local) for node in nodes
                  for local in range(self.slots[self.nodes.index(node)])]
        return places[:size]

    def step(self, node: str, command: list[str]) -> list[str]:
        """``command`` as a step of one task on ``node`` (its output on this one's stdout)."""
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
                "--overlap", "--kill-on-bad-exit=0", "--quiet", *command]

    def runs_steps(self, node: str) -> bool:
        """Whether ``node`` runs an empty step now: a node SLURM has not yet found dead does
        not."""
        try:
            return subprocess.run(self.step(node, ["true"]), capture_output=True,
                                  timeout=PROBE_TIMEOUT).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def _tasks_per_node(said: str, nodes: int) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]; one each where SLURM does not say."""
    counts = [int(count) for count, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", said)
              for _ in range(int(times or 1))] if said else []
    return counts if len(counts) == nodes else [1] * nodes
