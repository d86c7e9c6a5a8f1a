"""The training loop every rank of every strategy runs, as an outline: assemble the model and
data (ktrain.assembly) and check everything, only then touch output_dir, restore the newest
checkpoint (ktrain.resume), join the group, fit with ktrain's callbacks (ktrain.callbacks), then
write the model, the summary and what follows a run (exports, report, MLflow).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import sys
import time

import keras
import numpy as np

from ktrain import STARTED_AT, backends, console, regroup, sharding
from ktrain.assembly import model_and_data
from ktrain.callbacks import (Checkpoints, CompletedSteps, GroupSizes, LeaveToGrow, RunRecorder,
                              StopNow, callbacks_in_order, metrics_of, optional_callbacks)
from ktrain.checkpoint import CheckpointStore, Position, TrainingState
from ktrain.config import RunConfig
from ktrain.data import Splits, evaluation_batches, steps_per_epoch, training_batches
from ktrain.errors import KtrainError, UserError, WorkersFailed, first_line
from ktrain.exports import export_after_run
from ktrain.jax_runtime import even_share
from ktrain.optimizers import optimizer_variables
from ktrain.output import RunOutput, RunResult
from ktrain.report import write_report
from ktrain.resume import (check_resumable, fit_phases, restore, run_fingerprint,
                           starting_state)
from ktrain.session import Session
from ktrain.sources import ShardAudit
from ktrain.stopping import REQUEUE_SIGNAL, StopRequest, requeue_slurm_job
from ktrain.supervisor import is_supervised, mark
from ktrain.tracking import MlflowRun
from ktrain.watchdog import watching_for_stalls

tf = backends.optional_tensorflow()
# What model.fit raises when the model and the data do not fit together, and when a collective
# fails (TensorFlow's own errors, where it is installed).
_MISFIT = (ValueError, TypeError) + ((tf.errors.InvalidArgumentError,
                                      tf.errors.UnimplementedError) if tf else ())
_OP_ERROR = tf.errors.OpError if tf else ()
# How a collective that lost a peer fails on JAX (XLA's Gloo collectives, as a ValueError) and
# on torch (torch.distributed's Gloo or NCCL, as a RuntimeError).
_TRANSPORT_FAILED = re.compile(r"Gloo \w+ failed|Connection (reset|closed) by peer|"
                               r"UNAVAILABLE:|NCCL (error|communicator was aborted)")


class TrainingFailed(UserError):
    """The user's model or data failed inside ``fit`` (e.g. a shape mismatch)."""


def run_worker(run: RunConfig, session: Session) -> RunResult:
    """Train ``run`` in this rank of ``session`` (what every strategy's ranks run)."""
    if session.world_size > 1 and session.log_to_file:  # no supervisor sorts our output by rank
        console.share_terminal(session.rank, every_rank=getattr(
            run.strategy, "console_ranks", "chief") == "all")
    shard = getattr(run.strategy, "shard", "none")
    session = sharding.sharded(session, run.strategy, run.base_dir)
    model, splits = model_and_data(run, session)
    sharding.split_state(model, session.distribution, shard)
    output = RunOutput(run.output_dir, is_chief=session.is_chief, rank=session.rank,
                       keep_log=session.log_to_file)
    store = CheckpointStore(output.checkpoints_url, keep=run.checkpoint.keep,
                            is_chief=session.is_chief)
    fingerprint = run_fingerprint(run, model, splits)
    state = starting_state(run, store, fingerprint)
    output.check_writable()
    if state is not None:
        restore(model, state)
    flags = None
    if session.communicator is not None:
        if run.checkpoint.stop_signals or getattr(run.strategy, "stall_timeout", None) or \
                regroup.can_regroup():  # one flag per stop signal, and one to grow
            flags = session.communicator.flags(len(run.checkpoint.stop_signals) + 1)
        output.say(_join_group(run, session, model, flags))
    return _fit(run, session, model, splits, output, store, state, flags, fingerprint)


def _join_group(run: RunConfig, session: Session, model: keras.Model, flags) -> str:
    """Average gradients (and ``flags``) over the workers, in every optimizer the model updates
    with, and start every worker from rank 0's state; on JAX the train step reduces the
    gradients, and every worker built the same state from the same seed (or checkpoint)."""
    communicator = session.communicator
    if communicator.reduces_gradients:
        communicator.average_updates(model, flags, compression=run.strategy.compression,
                                     bucket_bytes=run.strategy.bucket_bytes)
        model.jit_compile = False  # numpy_function, Horovod and collective ops are not XLA ops
    mark(session.rank, "arrived")
    if communicator.reduces_gradients:
        communicator.copy_from_chief(model.variables + optimizer_variables(model))
        own_random_draws(model, session.rank)
    else:
        communicator.barrier()
    mark(session.rank, "joined")
    return (f"rank {session.rank} of {session.world_size} joined "
            f"({communicator.name}, host {socket.gethostname()}, pid {os.getpid()}, "
            f"{', '.join(session.devices)})")


_SEED_STRIDE = 1_000_003


def own_random_draws(model: keras.Model, rank: int) -> None:
    """Once every rank holds rank 0's state: a random stream of its own for each rank's random
    layers (Dropout, noise, random augmentation), as one process draws independent numbers for
    every example of a batch. With rank 0's seeds everywhere, the k-th example of every rank's
    share would get the same dropout mask. Rank 0 keeps its stream (a checkpoint holds it)."""
    for variable in model.non_trainable_variables:
        if variable.path.endswith("seed_generator_state"):
            state = variable.numpy()
            state[0] += rank * _SEED_STRIDE
            variable.assign(state)


def _fit(run: RunConfig, session: Session, model: keras.Model, splits: Splits,
         output: RunOutput, store: CheckpointStore, state: TrainingState | None,
         flags, fingerprint: dict) -> RunResult:
    train = run.train
    start = state.position if state else Position(0)
    history = list(state.history) if state else []
    if state:
        check_resumable(state, train)
        output.say(f"resuming from the checkpoint {start}")
    early_stopped = (state.callbacks.get("EarlyStopping", {}).get("stopped_epoch", 0)
                     if state else 0)
    if (start.epoch >= train.epochs or early_stopped) and output.has_model():
        return _nothing_to_train(output, start, train.epochs, early_stopped)
    partitioned = splits.partition_steps is not None
    communicator = session.communicator
    validation, validation_share = evaluation_batches(
        splits.validation, global_batch_size=train.global_batch_size, rank=session.rank,
        world_size=session.world_size, partitioned=partitioned,
        common_share=even_share(session)) if splits.validation else (None, 0)
    phases = [] if early_stopped else fit_phases(start, train.epochs)
    steps = steps_per_epoch(splits.train, train.global_batch_size, splits.partition_steps)
    stop = StopRequest(run.checkpoint.stop_signals)
    recorder = RunRecorder(run, output, history)
    optional = optional_callbacks(run, session, steps)
    sizes = list(state.world_sizes) if state else []
    record = {"fingerprint": fingerprint, "written_by": _written_by(run, session),
              "world_sizes": sizes}
    grow_flag = len(stop.signals) if flags is not None and regroup.can_regroup() else None
    checkpoints = Checkpoints(run, store, history, steps, stop, flags, optional,
                              state.callbacks if state else {}, record, CompletedSteps(steps),
                              grow_flag)
    tracker = None
    if run.mlflow and session.is_chief:
        tracker = MlflowRun(run, output, output.say)
    audit = ShardAudit(splits.train, session.rank, session.world_size) if run.data.audit \
        else None
    group = GroupSizes(sizes, session.world_size, start, steps,
                       regroup.Reformation.of_this_group(), output)
    callbacks = callbacks_in_order(session, recorder, tracker, history, optional, checkpoints,
                                    audit, steps * train.global_batch_size // session.world_size,
                                    validation_share, getattr(run.strategy, "audit_steps", None),
                                    group)
    fit_started = time.perf_counter()
    arrivals = flags.arrived if flags else (lambda: recorder.steps)

    def raise_flag(received) -> None:  # every rank learns of the stop after the same step
        if flags is not None:
            flags.raise_flag(stop.signals.index(received))

    def offer_to_grow() -> None:  # every rank stops after the next checkpoint
        flags.raise_flag(grow_flag)

    with tracker.ending_on_failure() if tracker else contextlib.nullcontext():
        try:
            with stop.listening(on_signal=raise_flag), \
                    stop.following_requests(raise_flag, follow=session.is_chief), \
                    regroup.following_offers(offer_to_grow,
                                             follow=session.is_chief and grow_flag is not None), \
                    watching_for_stalls(session, getattr(run.strategy, "stall_timeout", None),
                                        arrivals, output,
                                        getattr(run.strategy, "network_interface", None)):
                for first_epoch, end_epoch, first_step in phases:
                    batches, _ = training_batches(
                        splits.train, global_batch_size=train.global_batch_size,
                        rank=session.rank, world_size=session.world_size, shuffle=train.shuffle,
                        shuffle_buffer=train.shuffle_buffer, seed=train.seed,
                        first_epoch=first_epoch, epochs=end_epoch, first_step=first_step,
                        partition_steps=splits.partition_steps, audit=audit)
                    if flags is not None and not communicator.reduces_gradients:
                        batches = flags.counting(batches)
                    checkpoints.completed.first_step = first_step
                    _fit_phase(run, session, model, checkpoints, output, batches, first_epoch,
                               end_epoch, steps - first_step, validation, callbacks)
                    if model.stop_training:  # early stopping
                        break
        except LeaveToGrow as leaving:
            raise _left_to_grow(session, output, leaving.position) from None
        except StopNow as stopped:
            raise _stopped(run, session, store, stop, stopped.position) from None
    fit_ended = time.perf_counter()
    store.wait()
    early_stopping = _early_stopping_report(model, optional, output)
    if communicator is not None and communicator.reduces_gradients:
        communicator.plain_updates(model)
    held = sharding.bytes_per_device(model, getattr(run.strategy, "shard", "none"),
                                     session.num_replicas)
    sharding.unsplit(model)
    summary = {**_summary(run, session, recorder, history, start.epoch, fit_started, fit_ended,
                          output.save_model(model)),
               "world_size_history": sizes,
               "early_stopping": early_stopping,
               "peak_memory_mib": _peak_memory_by_rank(session),
               "bytes_per_device": held,
               **_audit_report(audit, output)}
    output.write_summary(summary)
    if session.is_chief:
        summary = _after_training(run, output, summary, tracker)
    output.flush_log()
    return RunResult(summary, model)


def _written_by(run: RunConfig, session: Session) -> dict:
    """How this run runs, recorded in its checkpoints (``ktrain checkpoints`` shows it)."""
    return {"strategy": run.strategy.name, "backend": keras.backend.backend(),
            "world_size": session.world_size, "replicas": session.num_replicas}


def _nothing_to_train(output: RunOutput, start: Position, epochs: int,
                      early_stopped: int) -> RunResult:
    """A re-run of a finished run: it says where the model is and changes nothing."""
    reason = (f"early stopping ended this run after epoch {start.epoch}" if early_stopped
              else f"all {epochs} epochs are done")
    output.say(f"nothing to train: {reason}; the model is {output.url}/model.keras "
               f"(raise train.epochs to train on, or use a new output_dir)")
    output.flush_log()
    return RunResult(output.update_summary(epochs_this_run=0, nothing_to_train=reason))


def _stopped(run: RunConfig, session: Session, store: CheckpointStore, stop: StopRequest,
             position: Position) -> UserError:
    """The error a stop request ends the run with, once its checkpoint is committed."""
    store.wait()
    if session.communicator is not None:
        session.communicator.barrier()  # no rank exits before the chief committed
    requeued, said = None, False
    if run.checkpoint.requeue and stop.received == REQUEUE_SIGNAL and session.is_chief:
        def announce(requeueing: str) -> None:  # SLURM ends the job as it requeues it
            nonlocal said
            console.info(stop.stopped(str(position), requeueing).render())
            said = True

        failed = requeue_slurm_job(announce)
        requeued, said = failed or "SLURM requeued the job", said and failed is None
    error = stop.stopped(str(position), requeued)
    error.shown = said
    if not session.is_chief:  # rank 0 tells the user; the others say it in their logs
        console.info(error.render())
        error.shown = True
    if is_supervised():  # ktrain's launcher, a Spark task or a Ray actor reports the stop
        error.exit_code = 0  # so that mpirun or horovodrun do not call it a crash
    return error


def _left_to_grow(session: Session, output: RunOutput, position) -> KtrainError:
    """How every rank exits when the group stops to re-form larger: the checkpoint at
    ``position`` is committed, and the launcher says the rest."""
    if session.is_chief:
        output.say(f"the group stops {position} to re-form with more workers; the checkpoint "
                   f"there is committed")
        output.flush_log()
    error = KtrainError("left the group to let it re-form larger")
    error.exit_code, error.shown = regroup.LEFT_TO_GROW, True
    return error


def _audit_report(audit: ShardAudit | None, output: RunOutput) -> dict:
    if not audit:
        return {}
    output.say(f"data.audit: in each of {audit.epochs_checked} epoch(s) the workers read "
               f"every example once")
    return {"data_audit": {"epochs_checked": audit.epochs_checked}}


def _after_training(run: RunConfig, output: RunOutput, summary: dict,
                    tracker) -> dict:
    """The chief's exports, report and MLflow artifacts. The run is complete by now, so a
    failure here is a warning that says how to retry, never the run's failure."""
    if run.export:
        export_after_run(output.url, run.export, output.say)
    fields = {}
    if run.report:
        try:
            fields["report"] = write_report([output.url])
        except Exception as err:
            output.say(f"warning: the report was not drawn: {err} (`ktrain report "
                       f"{output.url}` tries again)")
    if tracker:
        fields["mlflow"] = {"tracking_uri": run.mlflow.tracking_uri, "run_id": tracker.run_id}
    summary = output.update_summary(**fields)
    if tracker:
        try:
            tracker.finish(summary)
        except Exception as err:
            output.say(f"warning: MLflow did not take the run's files and figures: {err}")
    return summary


def _peak_memory_by_rank(session: Session) -> list[float]:
    """Each rank's peak resident memory so far, in MiB (every rank calls this)."""
    mine = np.zeros(session.world_size)
    mine[session.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return [round(float(m), 1) for m in session.summed(mine)]


def _early_stopping_report(model: keras.Model, callbacks: list, output: RunOutput) -> dict | None:
    """When early stopping ended the run (said to the user), and which epoch's weights the
    model holds; None when it did not."""
    stopper = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
    if not (model.stop_training and stopper):
        return None
    stopped, best = stopper.stopped_epoch + 1, stopper.best_epoch + 1
    restored = stopper.restore_best_weights and stopper.best_weights is not None
    output.say(f"early stopping ended the run after epoch {stopped}: {stopper.monitor} has not "
               f"improved for {stopper.patience} epoch(s) since epoch {best} "
               f"({stopper.monitor} {float(stopper.best):.4f}); the model holds "
               + (f"epoch {best}'s weights (restore_best_weights)" if restored
                  else f"epoch {stopped}'s weights (set restore_best_weights for the best)"))
    return {"stopped_after_epoch": stopped, "best_epoch": best, "monitor": stopper.monitor,
            "best_value": float(stopper.best), "weights_of_epoch": best if restored else stopped}


def _fit_phase(run, session, model, checkpoints, output, batches, first_epoch, end_epoch,
               steps, validation, callbacks) -> None:
    """``model.fit`` over epochs [first_epoch, end_epoch) of ``steps`` steps each, with
    ktrain's failure messages."""
    try:
        with session.scope():
            model.fit(batches, epochs=end_epoch, initial_epoch=first_epoch,
                      steps_per_epoch=steps, validation_data=validation or None,
                      validation_freq=run.train.validation_freq, shuffle=False,
                      callbacks=callbacks,
                      verbose=1 if console.verbosity() >= console.VERBOSE else 0)
    except _MISFIT as err:
        if session.communicator is not None and _TRANSPORT_FAILED.search(str(err)):
            raise _peer_lost(session, err, model, checkpoints, output) from err  # JAX's collectives
        raise TrainingFailed(
            f"training failed: {type(err).__name__}: {_without_graph_stack(err)}",
            where="model.fit",
            hint="this usually means the model and the data do not fit together (input "
                 "shape, number of classes, label format): check your model and data fns"
        ) from err
    except _OP_ERROR as err:
        if session.communicator is None:
            raise
        raise _peer_lost(session, err, model, checkpoints, output) from err
    except RuntimeError as err:  # torch.distributed's (Gloo, NCCL)
        if session.communicator is None or not _TRANSPORT_FAILED.search(str(err)):
            raise
        raise _peer_lost(session, err, model, checkpoints, output) from err


def _without_graph_stack(err: Exception) -> str:
    """TensorFlow's message without the Python stack where the failing op was defined (the
    launcher's frames, not the user's) and the op names around it."""
    message = err.message if tf and isinstance(err, tf.errors.OpError) else str(err)
    kept = [line.strip() for line in message.splitlines()
            if line.strip() and not line.startswith("  File ") and not line.lstrip().startswith("[[")
            and line.strip() not in ("Graph execution error:",)
            and not line.startswith("Detected at node")]
    return re.sub(r"\s*\[Op:[^\]]*\]", "", " ".join(kept)).strip()


def _peer_lost(session: Session, err: Exception, model: keras.Model,
               checkpoints: Checkpoints, output: RunOutput) -> WorkersFailed:
    """A collective failed mid-training: almost always another rank died. Say so, once."""
    store = checkpoints.store
    store.wait()
    message = first_line(err)
    peer = re.search(r"/task:(\d+)", str(err))
    lost = f"rank {peer.group(1)}" if peer and int(peer.group(1)) != session.rank else "a peer"
    if regroup.can_regroup():
        return _leave_broken_group(session, model, checkpoints, output, lost)
    saved = store.positions()
    resume = f" ({saved[-1]})" if saved else ""
    return WorkersFailed(
        f"rank {session.rank} lost contact with {lost} during training, so the group is "
        f"stopping ({type(err).__name__}: {message})",
        hint=f"see the other ranks' output for the first failure; re-run the same command to "
             f"resume from the newest checkpoint{resume}")


def _leave_broken_group(session: Session, model: keras.Model, checkpoints: Checkpoints,
                        output: RunOutput, lost: str) -> WorkersFailed:
    """Under a launcher that re-forms the group: tell it the last step this rank completed;
    the rank it names saves that step's state from memory, so the next group loses none."""
    jax = backends.current() == "jax"
    regroup.note_completed(session.rank, None if jax else checkpoints.completed.global_step)
    saved = None
    if not jax and regroup.saver() == session.rank:
        own_random_draws(model, -session.rank)  # rank 0's random streams, as checkpoints hold
        saved = checkpoints.save_in_memory_state()
    said = f"rank {session.rank} lost contact with {lost} during training" + (
        f"; it saved the state {saved} for the group that follows" if saved else "")
    output.say(said)
    output.flush_log()
    if jax:  # its variables hold the failed step's results, and jax.distributed's shutdown
        sys.stdout.flush()  # at exit would wait for the lost peer: leave now
        os._exit(regroup.PEER_LOST)
    error = WorkersFailed(said)
    error.exit_code, error.shown = regroup.PEER_LOST, True
    return error


def _summary(run, session, recorder, history, first_epoch, fit_started, fit_ended,
             model_path) -> dict:
    train = run.train
    steps = recorder.steps
    if steps > 1 and recorder.first_step_done is not None:
        per_second = (steps - 1) * train.global_batch_size / (fit_ended - recorder.first_step_done)
    elif steps:
        per_second = steps * train.global_batch_size / (fit_ended - fit_started)
    else:
        per_second = 0.0
    first_step = (recorder.first_step_done - fit_started) if recorder.first_step_done else None
    return {
        "strategy": run.strategy.name,
        "backend": keras.backend.backend(),
        "world_size": session.world_size,
        "num_replicas": session.num_replicas,
        "transport": session.communicator.name if session.communicator else None,
        "devices": list(session.devices),
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs_this_run": (history[-1]["epoch"] - first_epoch) if history else 0,
        "resumed_from_epoch": first_epoch or None,
        "final_metrics": metrics_of(history[-1]) if history else {},
        "samples_per_second": round(per_second, 2),
        "time_to_first_step_seconds": round(first_step, 3) if first_step else None,
        "seconds_to_first_step_since_start": (
            round(recorder.first_step_done - STARTED_AT, 3) if first_step else None),
        "first_step_unix_time": recorder.first_step_unix_time,
        "wall_seconds": round(time.perf_counter() - STARTED_AT, 3),
        "model_path": model_path,
    }
