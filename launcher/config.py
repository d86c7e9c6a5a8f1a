"""The run configuration: read once from YAML plus ``key.path=value`` overrides, validated once.

Everything after ``load_config`` works with the typed ``RunConfig`` and trusts it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AliasChoices, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveFloat, PositiveInt, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator, model_validator)

from ktrain import console
from ktrain.backends import BACKENDS, resolve
from ktrain.errors import UserError, all_of
from ktrain.schema import Section

DEFAULT_LANES = 12
"""data.lanes: divisible by 1, 2, 3, 4, 6 and 12 workers."""

EXPORT_FORMATS = ("saved_model", "tflite", "onnx")
"""What ``export:`` may list (see ktrain.exports)."""

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta", "adamax", "nadam",
              "ftrl", "lion", "lamb", "adafactor")


def _function_reference(value: str | None) -> str | None:
    if value is not None:
        where, _, name = value.rpartition(":")
        if not where or not name.isidentifier():
            raise ValueError(
                f"'{value}' is not of the form 'file.py:function' or 'package.module:function'")
    return value


class FnSpec(Section):
    fn: str
    """``path/to/file.py:function`` or ``package.module:function``."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments the fn is called with."""

    _check_fn = field_validator("fn")(_function_reference)


class DataSpec(Section):
    """A data fn; or files every worker streams its share of; or (with the spark strategy) a
    Parquet dataset or catalog table whose partitions the workers train on."""

    fn: str | None = None
    """A data fn, ``file.py:function``: arrays, a tf.data.Dataset or ``ktrain.Files``."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments the data fn is called with."""
    files: str | list[str] | None = None
    """Parquet or TFRecord files (paths, globs, fsspec URLs), streamed (see ktrain.sources)."""
    validation_files: str | list[str] | None = None
    """Files to validate on, read as data.files are."""
    format: Literal["parquet", "tfrecord"] | None = None
    """Of data.files; default: from their extension."""
    map: FnSpec | None = None
    """A per-example fn (x, y) -> (x, y) (or record -> (x, y)), run after sharding."""
    lanes: PositiveInt = DEFAULT_LANES
    """Interleaved parts of each epoch of data.files; strategy.workers must divide it."""
    audit: bool = False
    """Check every epoch that the workers' shards of data.files are disjoint and complete."""
    parquet: str | None = None
    """Path or URL of a Parquet dataset, read by Spark."""
    table: str | None = None
    """A table in the Spark catalog."""
    features: list[str] = []
    """Columns (or tf.train.Example keys) that make up the feature vector, in order."""
    label: str | None = None
    """The column (or tf.train.Example key) that holds the label."""

    _check_fn = field_validator("fn")(_function_reference)

    @property
    def read_by_spark(self) -> bool:
        return self.parquet is not None or self.table is not None

    @model_validator(mode="after")
    def _one_source(self):
        sources = [k for k in ("fn", "files", "parquet", "table") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(f"set exactly one of fn, files, parquet or table "
                             f"(got {sources or 'none'})")
        if sources[0] in ("parquet", "table") and (not self.features or not self.label):
            raise ValueError("a parquet or table source needs features (column list) and label")
        return self


class OptimizerSpec(Section):
    """Used when the model fn returns an uncompiled model; other keys go to the Keras optimizer.
    A name alone (``optimizer: adam``, as ``model.compile`` takes it) is ``{name: adam}``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: Literal[OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    """A Keras optimizer's name."""
    learning_rate: PositiveFloat = 0.001
    """The optimizer's learning rate."""


class EarlyStoppingSpec(Section):
    monitor: str = "val_loss"
    """The metric watched (as the console names it)."""
    patience: NonNegativeInt = 3
    """Epochs without improvement before the run stops."""
    min_delta: NonNegativeFloat = 0.0
    """The least change that counts as an improvement."""
    restore_best_weights: bool = False
    """End with the best epoch's weights rather than the last one's."""


class TrainSpec(Section):
    epochs: PositiveInt
    """Epochs the run ends after (a resumed run counts those already done)."""
    global_batch_size: PositiveInt
    """Examples per step, summed over all replicas (each takes an equal share)."""
    shuffle: bool = True
    """Shuffle every epoch, in an order that depends on (seed, epoch) only."""
    shuffle_buffer: PositiveInt = 10_000
    """Examples in the shuffle buffer of a tf.data.Dataset from the data fn."""
    seed: int = 0
    """Seeds the model's initial weights, its random layers and the data's order."""
    optimizer: OptimizerSpec = OptimizerSpec()
    """For a model the model fn returns uncompiled: a name, or a name with arguments."""
    loss: str | None = None
    """A Keras loss name, for an uncompiled model (required then)."""
    metrics: list[str] = []
    """Keras metric names, for an uncompiled model."""
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Hold out this last fraction of a data fn's (x, y) for validation."""
    validation_freq: PositiveInt = 1
    """Validate every this many epochs."""
    early_stopping: EarlyStoppingSpec | None = None
    """Stop when a metric stops improving (Keras' EarlyStopping; resumes with its state)."""
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    """Keras' dtype policy for the run."""
    jit_compile: Literal["auto"] | bool = "auto"
    """XLA for a model ktrain compiles (auto: Keras' choice)."""
    tensorboard: bool = False
    """Write TensorBoard logs to output_dir/logs/tensorboard/ (rank 0)."""
    callbacks: FnSpec | None = None
    """A fn returning a list of Keras callbacks, called in every worker once the model exists."""

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_by_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    def check_split(self, parts: int, what: str) -> None:
        """The one check that the global batch splits evenly over ``parts`` ``what`` (workers,
        devices): every replica takes the same share of every step."""
        size = self.global_batch_size
        if size % parts:
            raise UserError(
                f"train.global_batch_size {size} cannot be split evenly over {parts} {what}",
                where="train.global_batch_size",
                hint=f"use a multiple of {parts}, e.g. {(size // parts + 1) * parts}")


class CheckpointSpec(Section):
    every_epochs: PositiveInt = 1
    """Checkpoint at the end of every this many epochs."""
    every_steps: PositiveInt | None = None
    """Also mid-epoch, every this many global batches (counted from the run's start)."""
    every_minutes: PositiveFloat | None = None
    """Also mid-epoch, when this long has passed since the last checkpoint."""
    keep: PositiveInt = 3
    """The newest this many checkpoints are kept."""
    resume: str = "auto"
    """``auto`` (newest checkpoint in output_dir, if any), ``never``, or a checkpoint path."""
    stop_signals: list[str] = ["SIGTERM", "SIGINT", "SIGUSR1"]
    """Signals that stop every rank after the same step, with a checkpoint there."""
    requeue: bool = False
    """In a SLURM job, a stop by SIGUSR1 (``sbatch --signal=USR1@90``, a preemption notice)
    requeues the job, which resumes when it runs again; SIGTERM (scancel) does not."""

    @field_validator("stop_signals")
    @classmethod
    def _known_signals(cls, names: list[str]) -> list[str]:
        import signal

        known = {s.name for s in signal.Signals}
        names = [n if n.startswith("SIG") else f"SIG{n}" for n in map(str.upper, names)]
        unknown = [n for n in names if n not in known or n in ("SIGKILL", "SIGSTOP")]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a signal ktrain can catch; use names "
                             f"such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2")
        return names


class MlflowSpec(Section):
    """Experiment tracking with MLflow, from the chief (see ktrain.tracking)."""

    tracking_uri: str | None = None
    """Default: MLFLOW_TRACKING_URI. load_config settles it, so every worker gets the same."""
    experiment: str | None = None
    """Default: MLFLOW_EXPERIMENT_NAME, else the config file's name."""
    run_name: str | None = None
    """Default: output_dir's folder name."""


# ---------------------------------------------------------------------------- strategy:
# Each strategy's options, here with the rest of the schema; the code that runs them is in
# ktrain.strategies (one module each). A new strategy: its options class, a line in
# STRATEGY_OPTIONS, its module, a line in ktrain.strategies.REGISTRY.


class MeshSpec(Section):
    """``strategy.model_parallel.mesh``: devices along each axis (data x model = all of them)."""

    data: PositiveInt = 1
    """Groups the global batch is split over."""
    model: PositiveInt
    """Devices each split variable is cut over."""


class ModelParallelSpec(Section):
    """``strategy.model_parallel`` (JAX): variables cut over a model axis of the device mesh
    (docs/sharding.md)."""

    mesh: MeshSpec
    min_size: PositiveInt = 1024
    """Every variable of at least this many values is cut along its largest axis that
    mesh.model divides; smaller ones stay whole."""
    layout_fn: str | None = None
    """``file.py:function`` taking the ``keras.distribution.DeviceMesh`` (axes "batch" and
    "model") and returning a ``keras.distribution.LayoutMap``: its entries come first, the
    min_size rule lays out the rest."""


class StrategyConfig(Section):
    """The ``strategy:`` section; each strategy subclasses it with ``name: Literal[...]``."""

    name: str
    shard: Literal["none", "optimizer", "gradients", "parameters"] = "none"
    """On JAX, split training state over the data-parallel devices instead of a copy on each:
    the optimizers' state; also the gradients; also the parameters (ZeRO's stages 1-3;
    docs/sharding.md)."""
    model_parallel: ModelParallelSpec | None = None
    """On JAX, under mirrored: a device mesh {data: D, model: M} whose model axis large
    variables are cut over (docs/sharding.md)."""


class MirroredConfig(StrategyConfig):
    """One process, every local device (ktrain.strategies.mirrored)."""

    name: Literal["mirrored"] = "mirrored"
    devices: Literal["auto"] | PositiveInt = "auto"
    """``auto``: every GPU, else one CPU. ``N``: N GPUs, or N logical CPU devices when there is no GPU."""


class WorkerRange(Section):
    """The sizes an elastic group may take (see docs/elastic.md)."""

    min: PositiveInt
    """The fewest workers the run goes on with; losing more restarts the group
    (strategy.max_restarts counts it)."""
    max: PositiveInt
    """The workers it starts with, and grows back to."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


class MultiProcessConfig(StrategyConfig):
    """Options shared by every strategy that runs several worker processes."""

    workers: PositiveInt | WorkerRange = 2
    """Worker processes to start (where ktrain starts them; under srun or mpirun, theirs);
    {min: M, max: N}: an elastic run, which goes on with the workers that are left (at least
    M) when one is lost, and grows back to N."""
    grow: bool = True
    """In an elastic run: grow back to workers.max at the next checkpoint once workers are
    available again; false: go on at the size it shrank to."""
    start_timeout: PositiveFloat = 120.0
    """Seconds for every worker to start and join; the ranks that did not are named."""
    max_restarts: NonNegativeInt = 0
    """Restart the whole group from the last checkpoint up to this many times."""
    compression: Literal["none", "fp16", "bf16"] = "none"
    """fp16 or bf16 halves the bytes sent per gradient, where the transport supports it."""
    bucket_mb: PositiveFloat | None = 4.0
    """Gradients travel in fused buckets of at most this many MB, the last layers' first;
    null: one buffer per dtype. The default is the fastest measured (docs/performance.md)."""
    lr_scaling: Literal["off", "linear", "sqrt"] = "off"
    """Multiply the learning rate by the world size (linear) or its square root."""
    warmup_epochs: NonNegativeInt = 0
    """Ramp the scaled learning rate up from the unscaled one over this many epochs."""
    stall_timeout: PositiveFloat | None = 300.0
    """Seconds the other ranks may wait at a gradient allreduce for a rank that does not come;
    it is then named, with its Python stacks, and the group stops (or restarts). null: off."""
    audit_steps: PositiveInt | None = 1000
    """Every this many global batches, and at every epoch's end, the ranks compare a
    fingerprint of every trained and optimizer variable; one that differs stops the run,
    named. null: off."""
    console_ranks: Literal["chief", "all"] = "chief"
    """Which ranks' output the console shows (every rank's goes to logs/rank-<r>.log)."""

    @property
    def size_range(self) -> tuple[int, int]:
        """(fewest, most) workers: one size unless ``workers`` is a range."""
        workers = self.workers
        return (workers.min, workers.max) if isinstance(workers, WorkerRange) else \
            (workers, workers)

    @property
    def elastic(self) -> bool:
        """Whether the group may change size."""
        fewest, most = self.size_range
        return fewest < most

    @property
    def bucket_bytes(self) -> int | None:
        """``bucket_mb`` as ``ktrain.collectives`` takes it."""
        return int(self.bucket_mb * 2**20) if self.bucket_mb else None

    @field_validator("lr_scaling", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class ClusterProcessConfig(MultiProcessConfig):
    """Options of the strategies whose workers may run on several hosts under srun or mpirun."""

    network_interface: str | None = None
    """The interface peers talk over (e.g. ib0, eth1); default: the one routing to rank 0."""


class MultiWorkerConfig(ClusterProcessConfig):
    """Worker processes averaging gradients (ktrain.strategies.multiworker)."""

    name: Literal["multiworker"] = "multiworker"
    communicator: Literal["auto", "mpi", "collective"] = "auto"
    """mpi: MPI Allreduce via mpi4py; collective: TensorFlow's collective ops over gRPC;
    auto: mpi where MPI can join the ranks on CPUs, else collective (the run's first line says
    which, and why)."""


class HorovodConfig(ClusterProcessConfig):
    """Horovod's allreduce under ktrain's gradient averaging (ktrain.strategies.horovod)."""

    name: Literal["horovod"] = "horovod"
    controller: Literal["gloo", "mpi"] = "gloo"
    """How horovodrun starts and connects the workers."""


class SparkConfig(MultiProcessConfig):
    """Workers as one Spark barrier stage (ktrain.strategies.spark)."""

    name: Literal["spark"] = "spark"
    master: str | None = None
    """spark://host:7077, yarn, k8s://..., or sc://host:15002 for a Spark Connect server;
    default: the active session (spark-submit), else SPARK_REMOTE (Spark Connect), else
    local[workers] on this machine (loopback only)."""
    spark_conf: dict[str, StrictStr | StrictInt | StrictFloat | StrictBool] = {}
    """Passed to the session builder, e.g. {spark.task.resource.gpu.amount: 1}."""


class RayConfig(MultiProcessConfig):
    """Workers as Ray actors (ktrain.strategies.ray)."""

    name: Literal["ray"] = "ray"
    address: str | None = None
    """auto (a running cluster), ray://head:10001, or none: start a local Ray (loopback only)."""
    resources_per_worker: dict[str, NonNegativeFloat] = {"CPU": 1.0}
    """Ray resources each worker actor needs, e.g. {CPU: 4, GPU: 1}."""
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """Ray's placement-group strategy: strict_spread puts every worker on a node of its own."""
    max_restarts: NonNegativeInt = Field(0, validation_alias=AliasChoices("max_failures",
                                                                          "max_restarts"))
    """Written ``max_failures`` in Ray's terms."""


STRATEGY_OPTIONS: dict[str, type[StrategyConfig]] = {
    options.model_fields["name"].default: options
    for options in (MirroredConfig, MultiWorkerConfig, HorovodConfig, SparkConfig, RayConfig)}
"""Strategy name -> its options; the first is the default strategy."""


def _strategy_union():
    return Annotated[Union[tuple(STRATEGY_OPTIONS.values())],  # type: ignore[valid-type]
                     Field(discriminator="name")]


class RunConfig(Section):
    backend: Literal[BACKENDS] | None = None  # type: ignore[valid-type]
    """Keras' backend: the config's, else KERAS_BACKEND's, else tensorflow (load_config
    settles it)."""
    model: FnSpec
    """The model fn, ``file.py:function``, returning a keras.Model, compiled or not."""
    data: DataSpec
    """Where the examples come from."""
    train: TrainSpec
    """How to train."""
    strategy: _strategy_union() = Field(default_factory=MirroredConfig)  # type: ignore[valid-type]
    """Where and how the replicas run; ``name`` picks the strategy, the other keys are its
    options (below, by strategy)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """When checkpoints are taken, kept and resumed from, and which signals stop a run."""
    export: list[Literal[EXPORT_FORMATS]] = []  # type: ignore[valid-type]
    """Formats the chief writes to output_dir/export/ after training (see ktrain.exports)."""
    report: bool = True
    """Write report.png and report.html (curves per epoch) into output_dir after training."""
    progress_seconds: PositiveFloat = 60.0
    """Where the console is not a terminal (a SLURM log, a Spark or Ray job's output): a line
    of rank 0's progress through the epoch every this many seconds. On a terminal, a line
    redrawn in place."""
    mlflow: MlflowSpec | None = None
    """Log the run's parameters, metrics and files to MLflow, from rank 0."""
    output_dir: str = ""
    """Where the run's folder is (a path or fsspec URL); default: runs/<config file name>."""
    base_dir: str = "."
    """The config file's folder: relative paths resolve against it. Set by load_config."""

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude={"base_dir"}), sort_keys=False)


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override, validate and resolve a config file; raise UserError on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file '{path}' does not exist",
                        hint="check the path, or create a starter config with `ktrain init`") from None
    except OSError as err:
        raise UserError(f"cannot read config file '{path}': {err.strerror}") from None
    raw, lines = _parse_yaml(text, str(path))
    override_paths = {}
    for item in overrides:
        keys = _apply_override(raw, item)
        override_paths[keys] = item
    if ("strategy", "name") in override_paths:
        _drop_other_strategy_keys(raw, override_paths, str(path))
    base_dir = path.resolve().parent
    raw.setdefault("output_dir", f"runs/{path.stem}")
    try:
        config = RunConfig.model_validate({**raw, "base_dir": str(base_dir)})
    except ValidationError as err:
        raise _explain(err.errors(), raw, str(path), lines, override_paths) from None
    _check_no_silent_options(config, str(path), lines, override_paths)
    settled = {"backend": resolve(config.backend)}
    if config.mlflow is not None:
        settled["mlflow"] = _settle_mlflow(config.mlflow, path)
    return _resolve_paths(config.model_copy(update=settled), base_dir)


def _check_no_silent_options(config: RunConfig, filename: str, lines: dict,
                             overrides: dict) -> None:
    """Options that would do nothing in this config, or change its math behind the user's
    back: refused where they are set (every one at once), not ignored."""
    data, train, strategy = config.data, config.train, config.strategy
    idle = []  # (key path, what, how to fix)
    if data.files is not None and train.validation_split:
        idle.append((("train", "validation_split"),
                     "train.validation_split holds out part of an in-memory dataset, and "
                     "data.files streams files, which it cannot split",
                     "name files to validate on with data.validation_files, and remove "
                     "train.validation_split"))
    if data.files is None:
        idle += [(("data", key), f"data.{key} applies to data.files, which this config does "
                                 f"not read", f"remove data.{key}, or read the data with data.files")
                 for key in ("validation_files", "format", "map", "lanes")
                 if getattr(data, key) != DataSpec.model_fields[key].default]
    if getattr(strategy, "warmup_epochs", 0) and strategy.lr_scaling == "off":
        idle.append((("strategy", "warmup_epochs"),
                     "strategy.warmup_epochs ramps up the scaled learning rate, and "
                     "strategy.lr_scaling is off", "set strategy.lr_scaling: linear (or sqrt), "
                                                   "or remove warmup_epochs"))
    if hasattr(strategy, "grow") and not strategy.grow and not strategy.elastic:
        idle.append((("strategy", "grow"), "strategy.grow applies to an elastic run, and "
                     "strategy.workers is one size", "remove grow, or give workers a range: "
                                                      "{min: M, max: N}"))
    if getattr(strategy, "elastic", False) and strategy.lr_scaling != "off":
        idle.append((("strategy", "lr_scaling"),
                     f"strategy.lr_scaling: {strategy.lr_scaling} would change the learning "
                     f"rate each time the elastic group changes size, and the run would no "
                     f"longer train as the config says at every size",
                     "set lr_scaling: off and the learning rate you want in train.optimizer"))
    if idle:
        raise all_of([UserError(what, where=_set_at(key, filename, lines, overrides), hint=hint)
                      for key, what, hint in idle])


def _set_at(loc: tuple, filename: str, lines: dict, overrides: dict) -> str:
    """Where the user set the key at ``loc``: the override that set it (or a section above
    it), else the config file's line of it (or of the nearest section above)."""
    override = next((item for keys, item in overrides.items() if loc[:len(keys)] == keys), None)
    if override:
        return f"override '{override}'"
    known = next((loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    return f"{filename}:{lines[known]}" if known is not None else filename


def _settle_mlflow(spec: MlflowSpec, path: Path) -> MlflowSpec:
    """MLflow's own environment variables fill what the config leaves out, here once, so that
    the chief logs to the same place wherever it runs (a Spark executor, a Ray actor)."""
    uri = spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("mlflow needs a tracking server or store, and neither mlflow.tracking_uri "
                        "nor MLFLOW_TRACKING_URI is set", where=f"{path}: mlflow.tracking_uri",
                        hint="set mlflow.tracking_uri (e.g. http://127.0.0.1:5000, or "
                             "sqlite:///mlflow.db), or export MLFLOW_TRACKING_URI")
    experiment = spec.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or path.stem
    return spec.model_copy(update={"tracking_uri": uri, "experiment": experiment})


def _drop_other_strategy_keys(raw: dict, overrides: dict, filename: str) -> None:
    """``strategy.name=X`` on the command line switches strategy: the file's options that X
    does not take (e.g. mirrored's ``devices``) are left out, with a notice, not an error."""
    section = raw.get("strategy")
    options = STRATEGY_OPTIONS.get(section.get("name")) if isinstance(section, dict) else None
    if options is None:
        return  # an unknown name: validation explains it
    fields = options.model_fields
    accepted = set(fields) | {alias for f in fields.values() if f.validation_alias is not None
                              for alias in getattr(f.validation_alias, "choices", ())}
    dropped = [key for key in section
               if key not in accepted and ("strategy", key) not in overrides]
    for key in dropped:
        del section[key]
    if dropped:
        console.note(f"{overrides[('strategy', 'name')]} leaves out "
                     f"{', '.join(f'strategy.{k}' for k in dropped)} from {filename}, which "
                     f"{section['name']} does not take")


def _parse_yaml(text: str, filename: str) -> tuple[dict, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"malformed YAML: {problem}", where=where,
                        hint="check indentation and that every 'key: value' has a space "
                             "after the colon") from None
    if raw is None:
        raise UserError("the config file is empty", where=filename,
                        hint="start from `ktrain init`, which writes a working config")
    if not isinstance(raw, dict):
        raise UserError(f"the config must be a mapping of sections, got a {type(raw).__name__}",
                        where=filename, hint="see configs/quickstart.yaml for the layout")
    lines: dict[tuple, int] = {}
    _index_lines(node, (), lines, filename)
    return raw, lines


def _index_lines(node, path: tuple, lines: dict, filename: str) -> None:
    """Map each key path to the line it is on, and reject duplicate keys (YAML keeps the last)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise UserError(f"key '{'.'.join(map(str, path + (key,)))}' appears twice",
                                where=f"{filename}:{key_node.start_mark.line + 1}",
                                hint="remove one of them")
            seen.add(key)
            _index_lines(value_node, path + (key,), lines, filename)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), lines, filename)


def _apply_override(raw: dict, item: str) -> tuple:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}' is not of the form key.path=value",
                        hint="e.g. train.epochs=1 strategy.devices=2")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    keys = tuple(key.split("."))
    target = raw
    for part in keys[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{part}' is not a section",
                            hint=f"'{part}' holds a value, not keys")
        target = child
    target[keys[-1]] = parsed
    return keys


def _explain(errors: list[dict], raw: dict, filename: str, lines: dict,
             overrides: dict) -> UserError:
    """Turn pydantic's errors into one message: for each key that is wrong, what, where
    (file:line or override), and how to fix it.

    Unknown keys are reported first: a typo there is usually why a key is "missing".
    """
    by_key: dict[tuple, list[dict]] = {}
    for error in sorted(errors, key=lambda e: e["type"] != "extra_forbidden"):
        by_key.setdefault(_user_path(error["loc"], raw), []).append(error)
    return all_of([_explain_key(loc, found, errors, raw, filename, lines, overrides)
                   for loc, found in by_key.items()])


def _explain_key(loc: tuple, found: list[dict], errors: list[dict], raw: dict, filename: str,
                 lines: dict, overrides: dict) -> UserError:
    error = found[0]
    if error["type"] == "union_tag_invalid":  # blame the strategy's name, not the whole section
        loc, error = loc + ("name",), {**error, "input": error["input"].get("name")}
    dotted = ".".join(map(str, loc))
    kind = error["type"]
    where = _set_at(loc, filename, lines, overrides)

    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = (f"did you mean '{guess[0]}'?" if guess else "") + \
               f" Allowed keys here: {', '.join(allowed)}"
        return UserError(f"unknown key '{dotted}'", where=where, hint=hint.strip())
    if kind == "missing":
        section = ".".join(map(str, loc[:-1])) or "the top level"
        return UserError(f"missing required key '{dotted}'", where=where,
                         hint=f"add '{loc[-1]}:' under {section}")
    received = error.get("input")
    # A value may fail several members of a union (e.g. 'auto' or an int): say all of them.
    message = " or ".join(dict.fromkeys(
        _expectation(e) for e in errors if _user_path(e["loc"], raw) == loc))
    if kind == "union_tag_invalid":
        message = f"must be one of {error['ctx']['expected_tags']}"
    return UserError(f"invalid value {received!r} for '{dotted}': {message}", where=where,
                     hint=f"fix '{dotted}' in the config or pass {dotted}=VALUE on the command line")


def _expectation(error: dict) -> str:
    if error["type"] == "literal_error":
        return f"must be {error['ctx']['expected']}"
    return error["msg"][0].lower() + error["msg"][1:]


def _user_path(loc: tuple, raw: Any) -> tuple:
    """Drop the union tags pydantic inserts into error locations (e.g. strategy.mirrored.devices)."""
    path, node = [], raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part not in node and not last:
            continue
        if path and not isinstance(node, (dict, list)):
            break  # the rest names the union member that was tried
        path.append(part)
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node)
            else None)
    return tuple(path)


def _allowed_keys(section: tuple, raw: dict) -> list[str]:
    model: Any = RunConfig
    for part in section:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _section_type(field.annotation, part, raw)
    return [name for name in model.model_fields if name != "base_dir"]


def _section_type(annotation, part, raw: dict):
    if part == "strategy":
        name = (raw.get("strategy") or {}).get("name")
        return STRATEGY_OPTIONS.get(name, next(iter(STRATEGY_OPTIONS.values())))
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return annotation


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Inputs that travel with the config (fn files, data files) resolve against its folder;
    outputs (output_dir, a checkpoint to resume from) against the working directory, as
    with most command-line tools."""

    def fn(spec):
        if spec.fn is None:
            return spec
        target, _, name = spec.fn.rpartition(":")
        if target.endswith(".py") or "/" in target:
            target = str((base / target).resolve())
        return spec.model_copy(update={"fn": f"{target}:{name}"})

    def local(value: str, folder: Path) -> str:
        return value if "://" in value else str((folder / value).resolve())

    checkpoint = config.checkpoint
    if checkpoint.resume not in ("auto", "never"):
        checkpoint = checkpoint.model_copy(update={"resume": local(checkpoint.resume, Path.cwd())})
    data = fn(config.data)
    train = config.train
    if train.callbacks:
        train = train.model_copy(update={"callbacks": fn(train.callbacks)})
    if data.parquet:
        data = data.model_copy(update={"parquet": local(data.parquet, base)})
    for key in ("files", "validation_files"):
        value = getattr(data, key)
        if value is not None:
            data = data.model_copy(update={key: local(value, base) if isinstance(value, str)
                                           else [local(v, base) for v in value]})
    if data.map:
        data = data.model_copy(update={"map": fn(data.map)})
    return config.model_copy(update={
        "model": fn(config.model), "data": data, "train": train, "checkpoint": checkpoint,
        "output_dir": local(config.output_dir, Path.cwd())})
