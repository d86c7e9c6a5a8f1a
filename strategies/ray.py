"""Workers as Ray actors, on a local Ray or an existing cluster, restarted the Ray way.

One actor per worker, placed by a placement group (``pack``, ``spread``, ...) sized from
``resources_per_worker``. Each actor reports an address; the list becomes the TF collectives'
peers, and each actor runs the ordinary ktrain worker path in its own process. Rank 0's epoch
lines stream to the driver's console through Ray's log forwarding. When an actor (or its
node) dies, the group is torn down and started again from the newest checkpoint, up to
``max_failures`` times (Ray Train's ``FailureConfig`` name).

A lost actor shows first in its peers: their collectives fail within a second, and each notes
the last step it completed (``ktrain.regroup``), while Ray may take its health checks' time to
declare a dead node's actors dead. The driver then names the rank holding the newest step,
which saves it from memory, as ktrain's own launcher does; an elastic group (``workers: {min,
max}``) goes on with the actors left, and grows back once the cluster has room for ``max``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

from ktrain import console
from ktrain.config import RayConfig
from ktrain.environment import RAY_JOB_ENV, rank_environment, ray_job_working_dir
from ktrain.errors import KtrainError, Stopped, UserError, first_line
from ktrain.launch import read_plan, train_here, worker_environment
from ktrain.ray_data import RayShard, ray_data_shards
from ktrain.regroup import LEFT_TO_GROW, PEER_LOST, SURVIVORS_LEAVE, RegroupFolder
from ktrain.rendezvous import free_ports
from ktrain.session import Session
from ktrain.stopping import relaying_stops, reported_stop
from ktrain.strategies.base import MultiProcessStrategy
from ktrain.strategies.multiworker import collective_session
from ktrain.supervisor import (LEFT_TO_GROW_OUTCOME, Failure, blame_chief_first, echo_log,
                               echoed_report, log_tail)

_POLL = 0.5
"""Seconds between two looks at the ranks (and their notes) while they train."""
_DEATH_WAIT = 60.0
"""Seconds to wait for Ray to declare lost actors dead (its health checks find a dead node),
so that the next group is not placed on that node."""
_ROOM_EVERY = 2.0
"""Seconds between two looks at the cluster's free resources, for room to grow."""


class RayStrategy(MultiProcessStrategy):
    name = "ray"
    config: RayConfig

    def prepare(self, run) -> None:
        super().prepare(run)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("the ray strategy needs ray, which is not installed",
                            where="strategy.name", hint='pip install "ktrain-launcher[ray]"') from None
        _check_output_outlives_the_job(run.output_dir)

    data_shard: RayShard | None = None
    """Set in each actor: its share of a ray.data.Dataset the driver split."""

    def open_session(self, run) -> Session:
        return dataclasses.replace(collective_session(self.config.start_timeout, run.output_dir),
                                   data_shard=self.data_shard)

    _started = False
    """Whether this driver started Ray (or connected to a cluster), to end it with the run:
    a group that re-forms uses the same."""

    def launch(self, run, train):
        try:
            return super().launch(run, train)
        finally:
            if self._started:
                import ray

                ray.shutdown()
                self._started = False

    def run_group(self, run, train, size, environment):
        self._started = self._connect() or self._started
        return self._run_actors(run, train, size, environment)

    def _connect(self) -> bool:
        """Attach to the configured cluster, or start a local Ray; True if we started it."""
        import ray

        if ray.is_initialized():
            return False
        quiet = {"include_dashboard": False, "log_to_driver": True, "logging_level": "ERROR"}
        if not sys.stdout.isatty():  # no colour codes in a file or a pipe
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        # A job's driver (ray job submit) trains on the job's cluster.
        address = self.config.address or ("auto" if os.environ.get(RAY_JOB_ENV) else None)
        if address:
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise UserError(f"cannot reach the Ray cluster at '{address}': {err}",
                                where="strategy.address",
                                hint="check the address (auto, or ray://head:10001) and that "
                                     "the cluster is up (`ray status`)") from None
            return True
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        # Logical CPUs for the actors plus the machine's own, so Ray Data tasks that a data fn
        # starts inside an actor still find CPUs while the actors hold theirs.
        cpus = (os.cpu_count() or 1) + self._needed(self.config.size_range[1]).get("CPU", 0)
        # "local": a private Ray, even if a cluster runs on this machine (plain ray.init()
        # would attach to that one, and then refuse num_cpus).
        try:
            ray.init(address="local", num_cpus=int(cpus), _node_ip_address="127.0.0.1", **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot start a local Ray: {err}", where="strategy.address",
                            hint="see Ray's log in /tmp/ray/session_latest/logs; or set "
                                 "strategy.address to a running cluster") from None
        return True

    def _needed(self, workers: int) -> dict[str, float]:
        return {k: v * workers for k, v in self.config.resources_per_worker.items()}

    def _fitting(self, n: int) -> int:
        """How many of ``n`` workers the cluster holds: ``n``, or (in an elastic run) fewer but
        at least ``workers.min``; else a UserError."""
        import ray

        have, fewest = ray.cluster_resources(), self.config.size_range[0]

        def fits(workers: int) -> bool:
            return all(v <= have.get(k, 0) for k, v in self._needed(workers).items())

        if fits(n):
            return n
        if self.config.elastic and fits(fewest):
            return max(w for w in range(fewest, n) if fits(w))
        short = {k: (v, have.get(k, 0)) for k, v in self._needed(n).items() if v > have.get(k, 0)}
        detail = ", ".join(f"{k}: needs {need:g}, has {got:g}" for k, (need, got) in short.items())
        raise UserError(f"{n} workers with resources_per_worker "
                        f"{self.config.resources_per_worker} need more than the Ray cluster "
                        f"has ({detail})", where="strategy.resources_per_worker",
                        hint="lower strategy.workers or resources_per_worker, or add nodes")

    def _run_actors(self, run, train, n, environment):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = dict(self.config.resources_per_worker)
        if (fitting := self._fitting(n)) < n:  # an elastic run on a cluster that shrank
            return Failure(None, f"the Ray cluster holds {fitting} workers with {bundle} each",
                           lost=list(range(fitting, n)))
        group = placement_group([bundle] * n, strategy=self.config.placement.upper())
        ready, _ = ray.wait([group.ready()], timeout=self.config.start_timeout)
        if not ready:
            remove_placement_group(group)
            said = (f"Ray could not place {n} workers with {bundle} each within "
                    f"strategy.start_timeout ({self.config.start_timeout:g}s)")
            if self.config.elastic and n > self.config.size_range[0]:  # taken since it offered
                return Failure(None, said, lost=[n - 1])
            raise UserError(said, where="strategy.resources_per_worker",
                            hint="the cluster is busy or too small: see `ray status`")
        actor_class = ray.remote(_WorkerActor)
        options = {k: v for k, v in (("num_cpus", bundle.get("CPU", 0)),
                                     ("num_gpus", bundle.get("GPU", 0)))}
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actors = [actor_class.options(
            **options, resources=custom, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r)
        ).remote(r) for r in range(n)]
        regroup = RegroupFolder.of_run(run.output_dir)
        regroup.clear()
        try:
            shards = ray_data_shards(run, n)
            if shards and self.config.elastic:
                raise UserError(
                    "strategy.workers is a range, and the data fn returned a ray.data.Dataset, "
                    "whose rows reach the actors in an order Ray decides: a group that re-formed "
                    "at another size would train on other examples", where="strategy.workers",
                    hint=f"read the data with data.files (the same examples at any size), or "
                         f"set workers: {self.config.size_range[1]}")
            peers = ray.get([actor.address.remote() for actor in actors],
                            timeout=self.config.start_timeout)
            plan = worker_environment(run, train)
            with relaying_stops(run.checkpoint.stop_signals, run.output_dir) as (_, env), \
                    echo_log(f"{run.output_dir}/logs/rank-0.log"), \
                    (regroup.offering_growth(lambda: self._has_room(n), every=_ROOM_EVERY)
                     if self.may_grow(n) else contextlib.nullcontext()):
                driver_env = {**console.environment(), **env, **environment,
                              **regroup.environment()}
                pending = {actor.train.remote(plan, peers, driver_env, shards and shards[r]): r
                           for r, actor in enumerate(actors)}
                return _watch(run, pending, regroup)
        finally:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(group)
            regroup.remove()

    def _has_room(self, size: int) -> bool:
        """Whether the cluster's free resources hold the workers a group of ``size`` lacks
        (and, for strict_spread, it has a live node for each)."""
        import ray

        most, free = self.config.size_range[1], ray.available_resources()
        if any(v > free.get(k, 0) for k, v in self._needed(most - size).items()):
            return False
        return self.config.placement != "strict_spread" or \
            sum(node["Alive"] for node in ray.nodes()) >= most


def _watch(run, pending: dict, regroup: RegroupFolder):
    """Wait for every rank's ``train`` (``pending``: its ObjectRef -> rank): None when all
    finished, LEFT_TO_GROW_OUTCOME when they stopped to grow, else the Failure (see
    ``_after_loss``)."""
    import ray

    outcomes: dict[int, tuple[str, str]] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL)
        for ref in done:
            outcomes[pending.pop(ref)] = _outcome(ref)
        if any(kind in _TROUBLE for kind, _ in outcomes.values()) or regroup.completed_steps():
            return _after_loss(run, pending, outcomes, regroup, seen=time.time())
    stopped = [said for _, (kind, said) in sorted(outcomes.items()) if kind == "stopped"]
    if stopped:  # every rank stopped at one step, as asked (rank 0's report first)
        raise reported_stop(stopped[0], shown=False)
    if outcomes and all(kind == "grow" for kind, _ in outcomes.values()):
        return LEFT_TO_GROW_OUTCOME
    return None


_TROUBLE = ("died", "crash", "user", "left")


def _outcome(ref) -> tuple[str, str]:
    """How a rank's ``train`` ended: (kind, what it said); "died" if its actor did."""
    import ray

    try:
        return ray.get(ref) or ("done", "")
    except ray.exceptions.RayActorError as err:
        return ("died", first_line(err))
    except ray.exceptions.RayTaskError as err:
        return ("crash", first_line(err))


def _after_loss(run, pending: dict, outcomes: dict, regroup: RegroupFolder,
                seen: float) -> Failure:
    """A rank failed, or lost a peer: name the rank holding the newest step to save it, let
    the ranks that said their step leave, wait for Ray to declare the others dead (a new group
    must not be placed on a dead node), and tell who was lost. A mistake in the input is
    reported at once."""
    import ray

    def wait(refs: list, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while refs:
            done, refs = ray.wait(refs, num_returns=1,
                                  timeout=max(0.0, deadline - time.monotonic()))
            for ref in done:
                outcomes[pending.pop(ref)] = _outcome(ref)
            if not done:
                return

    def running() -> list[int]:
        wait(list(pending), 0)  # those that ended meanwhile (the others end with a stalled
        return sorted(pending.values())  # rank 0) have nothing to say

    users = sorted(rank for rank, (kind, _) in outcomes.items() if kind == "user")
    if users:
        return Failure(users[0], f"rank {users[0]}: {outcomes[users[0]][1]}", user_error=True,
                       since=seen)
    saver = regroup.ask_newest_to_save(running)
    noted = regroup.completed_steps()  # every survivor, those with no step to save too
    wait([ref for ref, rank in pending.items() if rank in noted], SURVIVORS_LEAVE)
    if not any(kind in ("died", "crash") for kind, _ in outcomes.values()):
        wait(list(pending), _DEATH_WAIT)  # only the survivors spoke: the loss is Ray's to say
    lost = [rank for rank in sorted({*outcomes, *pending.values()}) if rank not in noted]
    # the cause: a lost rank's end before a survivor's (on JAX, survivors' actors exit too)
    causes = sorted((rank not in lost, kind != "died", rank) for rank, (kind, _) in
                    outcomes.items() if kind in ("died", "crash"))
    if causes:
        rank = causes[0][2]
        kind, said = outcomes[rank]
        summary = f"rank {rank}'s actor died ({said})" if kind == "died" else f"rank {rank}: {said}"
    else:
        rank = lost[0] if lost else None
        summary = (f"rank {rank} stopped answering (Ray has not declared its actor dead)"
                   if lost else "a rank lost contact with its peers")
    log = f"{run.output_dir}/logs/rank-{rank}.log" if rank is not None else None
    tail = log_tail(log) if log else []
    failure = blame_chief_first(Failure(rank, summary, tail, log=log, since=seen,
                                        shown=echoed_report(rank, tail)),
                                f"{run.output_dir}/logs/rank-0.log")
    if failure.rank == rank:  # not a failure of rank 0 that the others followed
        failure.lost = lost
        completed = regroup.held_steps()
        failure.completed_step = max(completed.values(), default=None)
        if saver in completed and outcomes.get(saver, ("",))[0] == "left":
            failure.saved_by = saver  # it left as asked, its state saved
    return failure


def _check_output_outlives_the_job(output_dir: str) -> None:
    copy = ray_job_working_dir()
    if copy and "://" not in output_dir and os.path.commonpath([copy, output_dir]) == copy:
        raise UserError(
            f"output_dir '{output_dir}' is inside Ray's temporary copy of --working-dir, which "
            f"is deleted with the job's cluster", where="output_dir",
            hint="set output_dir to an absolute path on storage every node shares, or a URL "
                 "(e.g. s3://bucket/run), for example output_dir=/shared/runs/my-run")




class _WorkerActor:
    """One ktrain worker, living in its own Ray worker process."""

    def __init__(self, rank: int):
        self.rank = rank

    def __repr__(self) -> str:  # Ray prefixes the actor's forwarded output with this
        return f"rank {self.rank}"

    def address(self) -> str:
        import ray

        host = ray.util.get_node_ip_address()
        return f"{host}:{free_ports(1, host)[0]}"

    def train(self, plan: dict[str, str], peers: list[str], driver_env: dict,
              shard: RayShard | None = None):
        """Run the plan's training function (``plan``: see ktrain.launch) as this rank,
        speaking like the driver and following its stop requests
        (``driver_env``), on its ``shard`` of a ray.data.Dataset if the driver split one;
        None on success, else (kind, message)."""
        os.environ.update({**driver_env, **rank_environment(self.rank, len(peers), peers=peers)})
        # Ray forwards what an actor prints: its errors, but not its progress, which reaches the
        # driver from rank 0's log (so no line is lost when the run ends).
        console.set_verbosity(console.QUIET)
        console.speak_through_log()
        run, train = read_plan(plan)
        strategy = RayStrategy(run.strategy)
        strategy.data_shard = shard
        try:
            train_here(run, strategy.open_session, train)
        except Stopped as err:
            return ("stopped", err.what)
        except KtrainError as err:
            left = {LEFT_TO_GROW: "grow", PEER_LOST: "left"}.get(getattr(err, "exit_code", None))
            return (left or ("user" if isinstance(err, UserError) else "crash"), err.render())
        return None
