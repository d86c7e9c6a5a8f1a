"""Workers as Ray actors, on a local Ray or an existing cluster, restarted the Ray way.

One actor per worker, placed by a placement group (``pack``, ``spread``, ...) sized from
``resources_per_worker``. Each actor reports an address; the list becomes the TF collectives'
peers, and each actor runs the ordinary ktrain worker path in its own process. Rank 0's epoch
lines stream to the driver's console through Ray's log forwarding. When an actor (or its
node) dies, the group is torn down and started again from the newest checkpoint, up to
``max_failures`` times (Ray Train's ``FailureConfig`` name).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ktrain import console
from ktrain.config import RayConfig
from ktrain.environment import RAY_JOB_ENV, rank_environment, ray_job_working_dir
from ktrain.errors import KtrainError, Stopped, UserError, first_line
from ktrain.launch import read_plan, train_here, worker_environment
from ktrain.ray_data import RayShard, ray_data_shards
from ktrain.rendezvous import free_ports
from ktrain.session import Session
from ktrain.stopping import relaying_stops, reported_stop
from ktrain.strategies.base import MultiProcessStrategy
from ktrain.strategies.multiworker import collective_session
from ktrain.supervisor import Failure, blame_chief_first, echo_log, echoed_report, log_tail


class RayStrategy(MultiProcessStrategy):
    name = "ray"
    config: RayConfig

    fixed_size = "ktrain's ray strategy places one group of actors of one size"

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

    def run_group(self, run, train, size, environment):
        import ray

        started = self._connect()
        try:
            return self._run_actors(run, train, size, environment)
        finally:
            if started:
                ray.shutdown()

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
        cpus = (os.cpu_count() or 1) + self._needed().get("CPU", 0)
        # "local": a private Ray, even if a cluster runs on this machine (plain ray.init()
        # would attach to that one, and then refuse num_cpus).
        try:
            ray.init(address="local", num_cpus=int(cpus), _node_ip_address="127.0.0.1", **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot start a local Ray: {err}", where="strategy.address",
                            hint="see Ray's log in /tmp/ray/session_latest/logs; or set "
                                 "strategy.address to a running cluster") from None
        return True

    def _needed(self) -> dict[str, float]:
        return {k: v * self.config.size_range[1] for k, v in self.config.resources_per_worker.items()}

    def _check_resources(self) -> None:
        import ray

        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0)) for k, v in self._needed().items() if v > have.get(k, 0)}
        if short:
            detail = ", ".join(f"{k}: needs {need:g}, has {got:g}" for k, (need, got) in short.items())
            raise UserError(f"{self.config.size_range[1]} workers with resources_per_worker "
                            f"{self.config.resources_per_worker} need more than the Ray cluster "
                            f"has ({detail})", where="strategy.resources_per_worker",
                            hint="lower strategy.workers or resources_per_worker, or add nodes")

    def _run_actors(self, run, train, n, environment):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._check_resources()
        bundles = [dict(self.config.resources_per_worker) for _ in range(n)]
        group = placement_group(bundles, strategy=self.config.placement.upper())
        ready, _ = ray.wait([group.ready()], timeout=self.config.start_timeout)
        if not ready:
            remove_placement_group(group)
            raise UserError(f"Ray could not place {n} workers with {bundles[0]} each within "
                            f"strategy.start_timeout ({self.config.start_timeout:g}s)",
                            where="strategy.resources_per_worker",
                            hint="the cluster is busy or too small: see `ray status`")
        actor_class = ray.remote(_WorkerActor)
        options = {k: v for k, v in (("num_cpus", bundles[0].get("CPU", 0)),
                                     ("num_gpus", bundles[0].get("GPU", 0)))}
        custom = {k: v for k, v in bundles[0].items() if k not in ("CPU", "GPU")}
        actors = [actor_class.options(
            **options, resources=custom, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r)
        ).remote(r) for r in range(n)]
        try:
            shards = ray_data_shards(run, n)
            peers = ray.get([actor.address.remote() for actor in actors],
                            timeout=self.config.start_timeout)
            plan = worker_environment(run, train)
            stopped = {}  # rank -> its "stopped by ..." report
            with relaying_stops(run.checkpoint.stop_signals, run.output_dir) as (_, env), \
                    echo_log(f"{run.output_dir}/logs/rank-0.log"):
                driver_env = {**console.environment(), **env, **environment}
                pending = {actor.train.remote(plan, peers, driver_env, shards and shards[r]): r
                           for r, actor in enumerate(actors)}
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    rank = pending.pop(done[0])
                    try:
                        outcome = ray.get(done[0])
                    except ray.exceptions.RayActorError as err:
                        log = f"{run.output_dir}/logs/rank-{rank}.log"
                        tail = log_tail(log)
                        return blame_chief_first(
                            Failure(rank, f"rank {rank}'s actor died ({first_line(err)})",
                                    tail, log=log, shown=echoed_report(rank, tail)),
                            f"{run.output_dir}/logs/rank-0.log")
                    except ray.exceptions.RayTaskError as err:
                        return Failure(rank, f"rank {rank} failed: {first_line(err)}")
                    if outcome is not None and outcome[0] == "stopped":
                        stopped[rank] = outcome[1]
                    elif outcome is not None:
                        kind, message = outcome
                        return Failure(rank, f"rank {rank}: {message}",
                                       user_error=kind == "user")
            if stopped:  # every rank stopped at one step, as asked
                raise reported_stop(stopped.get(0) or next(iter(stopped.values())), shown=False)
            return None
        finally:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(group)


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
            return ("user" if isinstance(err, UserError) else "crash", err.render())
        return None
