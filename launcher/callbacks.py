"""The Keras callbacks ktrain trains with, in the order ``callbacks_in_order`` gives them:
global metrics, the shard audit, the recorder (metrics.csv, the console), the user's and the
config's (early stopping, learning-rate scaling, TensorBoard), the divergence audit, and
checkpoints with the stop on a signal last."""

from __future__ import annotations

import time

import keras
import numpy as np

from ktrain import backends, console
from ktrain.checkpoint import CheckpointStore, Position
from ktrain.config import RunConfig
from ktrain.errors import UserError, WorkersFailed
from ktrain.global_metrics import GlobalMetrics
from ktrain.optimizers import optimizer_variables, optimizers_of, steps_done
from ktrain.output import RunOutput
from ktrain.regroup import Reformation
from ktrain.report import TIMING
from ktrain.resume import capture
from ktrain.session import Session
from ktrain.sharding import replicated
from ktrain.sources import ShardAudit
from ktrain.stopping import StopRequest
from ktrain.userfn import call_user, load_function

tf = backends.optional_tensorflow()


class RunRecorder(keras.callbacks.Callback):
    """Per epoch: record history, write metrics.csv and the log, and print."""

    def __init__(self, run: RunConfig, output: RunOutput, history: list[dict]):
        super().__init__()
        self.run, self.output, self.history = run, output, history
        self.first_step_done: float | None = None
        self.first_step_unix_time: float | None = None
        self.steps = 0
        self._epoch_started = 0.0
        self._steps_before = 0
        self._config_written = False

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.first_step_done is None:
            self.first_step_done = time.perf_counter()
            self.first_step_unix_time = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._steps_before = self.steps

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        seconds = time.perf_counter() - self._epoch_started
        samples = (self.steps - self._steps_before) * self.run.train.global_batch_size
        row = {"epoch": done, **{k: float(v) for k, v in (logs or {}).items()},
               "epoch_seconds": round(seconds, 3),
               "samples_per_second": round(samples / seconds, 2) if seconds else 0.0}
        self.history.append(row)
        if not self._config_written:  # only once training works: a failing run changes nothing
            self.output.write_config(self.run.dump_yaml())
            self._config_written = True
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in metrics_of(row).items())
        self.output.say(f"epoch {done}/{self.run.train.epochs}  {metrics}  ({seconds:.1f}s)")
        self.output.write_metrics(self.history)
        self.output.flush_log()


class Progress(keras.callbacks.Callback):
    """Rank 0's way through the current epoch (step, samples/s, time left, its running loss):
    redrawn a few times a second where the console is a terminal (``console.progress``),
    else a line every ``every_seconds``, so an epoch longer than that is never silent. Only
    the console shows it: not the metrics, not the log."""

    REDRAW_EVERY = 0.25

    def __init__(self, epochs: int, steps: int, global_batch_size: int, every_seconds: float):
        super().__init__()
        self.epochs, self.steps, self.global_batch_size = epochs, steps, global_batch_size
        self.live = console.live_progress()
        self.every = self.REDRAW_EVERY if self.live else every_seconds
        self._epoch, self._began, self._shown = 0, 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._shown = epoch, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if batch == 0:  # timed from here: the first step also compiles
            self._began = now
        if batch == 0 or now - self._shown < self.every:
            return
        self._shown = now
        timed = batch  # steps since the first of this fit call (a resumed epoch's has fewer)
        left = self.params["steps"] - batch - 1
        seconds = now - self._began
        loss = f"  loss {float(logs['loss']):.4f}" if logs and "loss" in logs else ""
        text = (f"epoch {self._epoch + 1}/{self.epochs}  step {self.steps - left}/{self.steps}  "
                f"{timed * self.global_batch_size / seconds:.0f} samples/s  "
                f"{_clock(left * seconds / timed)} left{loss}")
        if self.live:
            console.progress(text)
        else:
            console.info(text)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else \
        f"{minutes}:{seconds:02d}"


class GroupSizes(keras.callbacks.Callback):
    """The run's ``world_size_history``: at this group's first step, the global step it
    started at, its size and why it was formed. When it replaced a group (``reformation``),
    also the seconds from the loss (or the stop to grow) to this first step and the steps that
    were lost; rank 0 says so in one line when the size changed."""

    def __init__(self, sizes: list[dict], world_size: int, start: Position,
                 steps_per_epoch: int, reformation: Reformation | None, output: RunOutput):
        super().__init__()
        self.sizes, self.world_size, self.start = sizes, world_size, start
        self.start_step = start.epoch * steps_per_epoch + start.step
        self.epoch = round(start.epoch + start.step / steps_per_epoch, 3)
        self.reformation, self.output = reformation, output
        self._recorded = False

    def on_train_batch_end(self, batch, logs=None):
        if self._recorded:
            return
        self._recorded = True
        change = self.reformation
        entry = {"step": self.start_step, "epoch": self.epoch, "size": self.world_size,
                 "kind": change.kind if change else "start" if not self.start_step else "resume"}
        if change:
            entry["reason"] = change.reason
            entry["seconds"] = round(time.time() - change.since, 2)
            if change.completed_step is not None:
                entry["steps_lost"] = max(0, change.completed_step - self.start_step)
        self.sizes.append(entry)
        if change and change.kind != "restart":
            self.output.say(self._line(entry, change))

    def _line(self, entry: dict, change: Reformation) -> str:
        if change.kind == "grow":
            return (f"the group grew to {self.world_size} workers ({change.reason}): continuing "
                    f"{self.start}, {entry['seconds']:.1f}s after it stopped to grow")
        if "steps_lost" not in entry:  # no rank left could say how far it had come
            lost = " from the newest checkpoint (steps lost since it: not known)"
        else:
            lost = f", {entry['steps_lost']} step(s) lost" + (
                f" (rank {change.saved_by} saved the last one from memory)"
                if change.saved_by is not None else " (from the newest checkpoint)")
        workers = "1 worker" if self.world_size == 1 else f"{self.world_size} workers"
        return (f"the group re-formed on {workers} after {change.reason}: "
                f"continuing {self.start}{lost}, {entry['seconds']:.1f}s after the loss")


class ShardsBroken(WorkersFailed):
    """data.audit found that the workers did not read the epoch's examples once each."""


class AuditShards(keras.callbacks.Callback):
    """data.audit, at each epoch's end. Every rank finds the same problem; rank 0 reports it
    (the others fail on the next collective once it is gone, after it)."""

    def __init__(self, audit: ShardAudit, session: Session):
        super().__init__()
        self.audit, self.session = audit, session

    def on_epoch_end(self, epoch, logs=None):
        problem = self.audit.problem(epoch, self.session.summed)
        if not problem:
            console.debug(f"data.audit: epoch {epoch + 1}'s shards are disjoint and complete")
        elif self.session.is_chief:
            raise ShardsBroken(
                f"data.audit: {problem}", hint="ktrain's own lanes never overlap: look for code "
                "that changes how the data is shared (a data fn, a map fn, a patched "
                "ktrain.sources); the run stops before checkpointing this epoch")


class Diverged(WorkersFailed):
    """The ranks' copies of the model differ (see ``AuditWeights``)."""


_FOLLOW_CHIEF = 30.0
"""Seconds a rank that found a divergence waits for rank 0, which reports it, to end the group."""


class AuditWeights(keras.callbacks.Callback):
    """strategy.audit_steps: every that many steps and at every epoch's end, the ranks compare
    one float64 per trained and optimizer variable (its sum); one that differs stops the run,
    named, before a checkpoint can keep it.

    Ranks apply the same averaged gradients to the same weights, so their copies are equal to
    the bit; a difference means an update that bypassed the averaging (an optimizer ktrain
    could not find, code that changes weights on some ranks) or a faulty transport. State that is
    per-rank by design (BatchNormalization's moving statistics, random generators) is not
    compared. Every rank finds the same difference and stops with it."""

    def __init__(self, session: Session, every: int):
        super().__init__()
        self.session, self.every = session, every
        self._audited = None
        """The step of the last audit, at which every rank was equal."""
        self._epoch_began = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_began = self._steps_done()

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch_began + batch + 1  # no read from the device on every step
        if self._audited is None or step // self.every > self._audited // self.every:
            self._audit(step)

    def on_epoch_end(self, epoch, logs=None):
        step = self._steps_done()
        if step != self._audited:
            self._audit(step)

    def _steps_done(self) -> int:
        return steps_done(optimizers_of(self.model).values())

    def _audit(self, step: int) -> None:
        variables = [v for v in [*self.model.trainable_variables,
                                 *optimizer_variables(self.model)] if replicated(v)]
        mine = np.array([np.sum(v.numpy(), dtype=np.float64) for v in variables])
        every = np.zeros((self.session.world_size, len(variables)))
        every[self.session.rank] = mine
        every = self.session.summed(every)  # each rank's row, on every rank
        differ = every != every[0]
        if differ.any():
            first = int(np.flatnonzero(differ.any(axis=0))[0])
            error = self._diverged(variables[first],
                                   sorted(np.flatnonzero(differ.any(axis=1))), step)
            if not self.session.is_chief:  # rank 0 reports it; ended with it, no rank is blamed
                console.info(f"rank 0 ends the group: {error.what}")
                time.sleep(_FOLLOW_CHIEF)
            raise error
        self._audited = step
        console.debug(f"audit: {len(variables)} variables equal on every rank at step {step}")

    def _diverged(self, variable, ranks: list, step: int) -> Diverged:
        optimizer = next((name for name, o in optimizers_of(self.model).items()
                          if any(variable is v for v in o.variables)), None)
        owner = f"optimizer {optimizer}" if optimizer else \
            f"layer '{variable.path.rsplit('/', 1)[0]}'"
        since = (f"every rank was equal at step {self._audited}" if self._audited is not None
                 else "the first audit of this start")
        return Diverged(
            f"rank(s) {[int(r) for r in ranks]} diverged from rank 0: variable "
            f"'{variable.path}' ({owner}) differs at step {step} ({since}); the run stops "
            f"before a checkpoint keeps it", where="strategy.audit_steps",
            hint="look for an update that bypasses the averaged gradients: an optimizer "
                 "ktrain cannot find (made inside train_step, or held outside the model), or a "
                 "callback or train_step that changes weights on some ranks only; a smaller "
                 "strategy.audit_steps narrows the step down")


class StopNow(Exception):
    """Raised out of ``fit`` once the checkpoint at ``position`` is taken."""

    def __init__(self, position: Position):
        super().__init__(str(position))
        self.position = position


class LeaveToGrow(StopNow):
    """Raised out of ``fit`` once the checkpoint at ``position`` is committed, when the group
    stops there to re-form larger."""


class CompletedSteps(keras.callbacks.Callback):
    """The count of steps: the first callback after each step, before any that reaches the
    peers (and may find one lost). ``position`` is where the state the model holds stands:
    None between an epoch's last step and the end of its callbacks (validation, metrics,
    audits), whose state is not a position a run can resume from."""

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.first_step = 0
        """Global batches of the current epoch done before this fit call (a resumed epoch)."""
        self.epoch = 0
        self.step = 0
        """Global batches of the current epoch done."""
        self.position: Position | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step = self.first_step + batch + 1
        self.position = (Position(self.epoch, self.step) if self.step < self.steps_per_epoch
                         else None)

    def ended_epoch(self, done: int) -> None:
        """Called by the last callback of an epoch's end."""
        self.position = Position(done, 0)

    @property
    def global_step(self) -> int | None:
        return None if self.position is None else \
            self.position.epoch * self.steps_per_epoch + self.position.step


class Checkpoints(keras.callbacks.Callback):
    """Checkpoints at epoch ends, every ``every_steps`` global batches and every
    ``every_minutes``; and the stop on a signal, at the step every rank agreed on.

    Goes after the stateful callbacks: its ``on_train_begin`` gives them back their state."""

    def __init__(self, run: RunConfig, store: CheckpointStore, history: list[dict],
                 steps_per_epoch: int, stop: StopRequest, flags,
                 callbacks: list[keras.callbacks.Callback], saved_callbacks: dict,
                 record: dict, completed: CompletedSteps, grow_flag: int | None = None):
        super().__init__()
        self.stateful = [c for c in callbacks if type(c) in CALLBACK_STATE]
        self.run, self.store, self.history = run, store, history
        self.steps_per_epoch, self.stop, self.flags = steps_per_epoch, stop, flags
        self.callback_state = dict(saved_callbacks)
        self.record = record
        """What every checkpoint carries besides the state: fingerprint and written_by."""
        self.completed = completed
        """The count of steps, which runs before every other callback."""
        self.grow_flag = grow_flag
        """The flag rank 0 raises when its launcher offers room to grow (None: none can)."""
        self._last_saved = time.monotonic()
        self._stop_at_epoch_end = False
        self._agreed: list[int] = []
        """The flags every rank learned after the last step (asked once a step: on JAX,
        asking is a collective)."""

    def on_train_begin(self, logs=None):
        for callback in self.stateful:
            for name, value in self.callback_state.get(type(callback).__name__, {}).items():
                setattr(callback, name, value)

    def on_train_batch_end(self, batch, logs=None):
        epoch, step = self.completed.epoch, self.completed.step
        if self.flags is not None:  # every rank learns them after the same step
            self._agreed = self.flags.agreed()
        if self._stop_requested():
            if step < self.steps_per_epoch:
                self._save(Position(epoch, step), background=False)
                raise StopNow(Position(epoch, step))
            self._stop_at_epoch_end = True  # the last step: finish the epoch, then stop
        if step >= self.steps_per_epoch:
            return  # the epoch's end checkpoints this position
        every = self.run.checkpoint
        if (every.every_steps and (epoch * self.steps_per_epoch + step) % every.every_steps
                == 0) or (every.every_minutes and
                          time.monotonic() - self._last_saved >= every.every_minutes * 60):
            self._save(Position(epoch, step))
            self._leave_if_growing(Position(epoch, step))

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        saved = (done % self.run.checkpoint.every_epochs == 0 or done == self.run.train.epochs
                 or self.model.stop_training or self._stop_at_epoch_end)
        if saved:
            self._save(Position(done, 0))
        if self._stop_at_epoch_end:
            raise StopNow(Position(done, 0))
        self.completed.ended_epoch(done)
        if saved and done < self.run.train.epochs and not self.model.stop_training:
            self._leave_if_growing(Position(done, 0))

    def _stop_requested(self) -> bool:
        if self.flags is not None:
            signals = [i for i in self._agreed if i != self.grow_flag]  # one flag per signal
            if signals:  # every rank names the same signal, received or not
                self.stop.received = self.stop.signals[signals[0]]
            return bool(signals)
        return self.stop.received is not None

    def _leave_if_growing(self, position: Position) -> None:
        """Once the checkpoint at ``position`` is committed, stop to re-form larger if the
        launcher offered room (every rank learned it at the same step)."""
        if self.grow_flag is not None and self.grow_flag in self._agreed:
            self.store.wait()
            raise LeaveToGrow(position)

    def save_in_memory_state(self) -> Position | None:
        """After a peer was lost: commit the state of the last completed step, which this
        rank holds as every rank did, whichever rank it is; None when it holds none (an
        epoch's end was under way)."""
        position = self.completed.position
        if position is not None and position not in self.store.positions():
            self.store = CheckpointStore(self.store.url, keep=self.store.keep)  # writes
            self._save(position, background=False)
        return position

    def _save(self, position: Position, background: bool = True) -> None:
        self.callback_state = {type(c).__name__: {name: _plain(getattr(c, name))
                                                  for name in CALLBACK_STATE[type(c)]}
                               for c in self.stateful}
        started = time.perf_counter()
        self.store.save(capture(self.model, position, self.history,
                                callbacks=self.callback_state,
                                global_batch_size=self.run.train.global_batch_size,
                                **self.record),
                        background=background)
        self._last_saved = time.monotonic()
        console.debug(f"checkpoint {position} captured in {time.perf_counter() - started:.2f}s")


def _plain(value):
    """A callback attribute as JSON can hold it (numpy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


class ScaledLearningRate(keras.callbacks.Callback):
    """Scale the learning rate of every optimizer the model updates with by ``factor``, ramping
    up linearly over ``warmup_epochs`` (counted in steps taken, so a resumed run ramps exactly
    as an unbroken one)."""

    def __init__(self, factor: float, warmup_epochs: int, steps_per_epoch: int):
        super().__init__()
        self.factor, self.warmup_steps = factor, warmup_epochs * steps_per_epoch
        self.base: list[float] | float | None = None
        """Each optimizer's own learning rate (a float in checkpoints of one optimizer's runs
        from before ktrain scaled several)."""
        self._ramping = True

    def on_train_begin(self, logs=None):
        self.optimizers = list(optimizers_of(self.model).values())
        constant = (keras.Variable, *((tf.Variable,) if tf else ()))
        if not all(isinstance(o.learning_rate, constant) for o in self.optimizers):
            raise UserError("strategy.lr_scaling needs a constant learning rate, not a schedule",
                            where="strategy.lr_scaling", hint="set lr_scaling: off")
        if self.base is None:  # fit may be called again (a resumed epoch, then the rest)
            self.base = [float(o.learning_rate.numpy()) for o in self.optimizers]
        elif not isinstance(self.base, list):
            self.base = [self.base]
        self._ramping = True

    def on_train_batch_begin(self, batch, logs=None):
        if not self._ramping:
            return
        done = steps_done(self.optimizers)  # found once, in on_train_begin: not every step
        progress = min(1.0, done / self.warmup_steps) if self.warmup_steps else 1.0
        for optimizer, base in zip(self.optimizers, self.base):
            optimizer.learning_rate.assign(base * (1 + (self.factor - 1) * progress))
        self._ramping = progress < 1.0


# The state of callbacks that decides a run's outcome, carried across fit calls and restarts
# (their on_train_begin resets it; the learning rate a checkpoint holds is already scaled).
CALLBACK_STATE = {keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
                   keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
                   keras.callbacks.ModelCheckpoint: ("best",),
                   ScaledLearningRate: ("base",)}


def optional_callbacks(run: RunConfig, session: Session,
                        steps: int) -> list[keras.callbacks.Callback]:
    callbacks = []
    scaling = getattr(run.strategy, "lr_scaling", "off")
    if scaling != "off" and session.world_size > 1:
        factor = session.world_size if scaling == "linear" else session.world_size ** 0.5
        callbacks.append(ScaledLearningRate(factor, run.strategy.warmup_epochs, steps))
    if run.train.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(**run.train.early_stopping.model_dump()))
    if run.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=f"{run.output_dir}/logs/tensorboard"))
    if run.train.callbacks:
        callbacks += _user_callbacks(run, session)
    if session.is_chief and console.verbosity() == console.NORMAL:  # -v: Keras' progress bar
        callbacks.append(Progress(run.train.epochs, steps, run.train.global_batch_size,
                                  run.progress_seconds))
    return callbacks


# Callbacks that write files: on rank 0 only, so that ranks do not overwrite each other.
_CHIEF_ONLY = (keras.callbacks.ModelCheckpoint, keras.callbacks.CSVLogger,
               keras.callbacks.TensorBoard)


def _user_callbacks(run: RunConfig, session: Session) -> list[keras.callbacks.Callback]:
    """The callbacks the user's ``train.callbacks`` fn returns; they see global metrics."""
    spec = run.train.callbacks
    made = call_user(load_function(spec.fn, "train.callbacks.fn", run.base_dir), spec.kwargs,
                     "train.callbacks.fn")
    made = list(made) if isinstance(made, (list, tuple)) else made
    if not isinstance(made, list) or not all(isinstance(c, keras.callbacks.Callback)
                                             for c in made):
        raise UserError(f"the callbacks fn returned {made!r:.80}, not a list of Keras callbacks",
                        where="train.callbacks.fn",
                        hint="return a list, e.g. [keras.callbacks.ReduceLROnPlateau(patience=2)]")
    if any(isinstance(c, keras.callbacks.BackupAndRestore) for c in made):
        raise UserError("BackupAndRestore would fight ktrain's own checkpoints",
                        where="train.callbacks.fn",
                        hint="remove it: ktrain checkpoints (checkpoint.every_epochs, "
                             "every_steps, every_minutes) and resumes by itself")
    return [c for c in made if session.is_chief or not isinstance(c, _CHIEF_ONLY)]


def metrics_of(row: dict) -> dict:
    """A metrics.csv row's metrics: without the epoch's number and timing."""
    return {k: v for k, v in row.items() if k != "epoch" and k not in TIMING}


def callbacks_in_order(session: Session, recorder: RunRecorder, tracker, history: list[dict],
                        optional: list, checkpoints: Checkpoints, audit: ShardAudit | None,
                        train_share: int, validation_share: int,
                        audit_steps: int | None, sizes: GroupSizes) -> list:
    """The count of completed steps first (later ones may reach the peers and fail), then
    global metrics, so that every later callback sees the same numbers on every rank; the
    shard audit and the divergence audit before any checkpoint takes the epoch (the latter
    after every callback that might change weights); checkpoints last."""
    callbacks = [recorder, sizes, *([tracker.callback(history)] if tracker else []), *optional,
                 checkpoints]
    if audit_steps and session.communicator is not None and session.world_size > 1:
        callbacks.insert(-1, AuditWeights(session, audit_steps))
    if audit:
        callbacks.insert(0, AuditShards(audit, session))
    if session.communicator is not None and session.communicator.reduces_gradients:
        callbacks.insert(0, GlobalMetrics(session.communicator, train_share, validation_share))
    return [checkpoints.completed, *callbacks]
