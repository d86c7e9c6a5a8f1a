"""Train every family of the model zoo (tests/fixtures/zoo.py) in this process, one `ktrain run`
after another (``ktrain.cli.main``, as the command runs them): under `mpirun -np 2` as 2
workers averaging over MPI, else as 1 process (mirrored, 1 device). One process per rank for
the whole zoo, since loading TensorFlow costs far more than training these models.

    python tests/zoo_ranks.py OUT_DIR                  # 1 process
    mpirun -np 2 python tests/zoo_ranks.py OUT_DIR     # 2 workers
    python tests/zoo_ranks.py OUT_DIR 2                # 2 devices of 1 process (mirrored)

Keras' backend is the one KERAS_BACKEND names; on jax, the families of JAX_FAMILIES. A JAX
process joins its peers once (jax.distributed), so the zoo compares 2 devices of one process
with one device there: the same global-batch math XLA partitions over processes
(test_backends holds multiworker on JAX to one device).

Each family trains into OUT_DIR/<family>; OUT_DIR/<family>.status holds its exit status.
The families in RESUMED train on 2 workers in two starts."""

import sys
from pathlib import Path

import keras
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from zoo import FAMILIES, JAX_FAMILIES  # noqa: E402

from ktrain.cli import main  # noqa: E402
from ktrain.environment import detect  # noqa: E402


def families() -> dict:
    return JAX_FAMILIES if keras.backend.backend() == "jax" else FAMILIES


def config(family: str, out: Path, workers: int, devices: int = 1) -> dict:
    model_fn, data_fn = families()[family]
    strategy = ({"name": "multiworker", "communicator": "mpi"} if workers > 1 else
                {"name": "mirrored", "devices": devices})
    return {"backend": keras.backend.backend(), "model": {"fn": f"{FIXTURES}/zoo.py:{model_fn}"},
            "data": {"fn": f"{FIXTURES}/zoo.py:{data_fn}"},
            "train": {"epochs": 2, "global_batch_size": 32, "shuffle": False, "seed": 3},
            "strategy": strategy, "checkpoint": {"every_epochs": 1, "keep": 1},
            "report": False, "output_dir": str(out / family)}


RESUMED = {"gan"}
"""Families whose 2 workers stop after epoch 1 and resume (as a rerun of the same command
would): a GAN's optimizers have no state until a step is traced, and the checkpoint's must be
restored into it."""


def train_zoo(out: Path, devices: int) -> None:
    found = detect()
    for family in families():
        settings = config(family, out, found.world_size, devices)
        starts = [1, 2] if family in RESUMED and found.world_size * devices > 1 else [2]
        for epochs in starts:
            keras.backend.clear_session()
            keras.config.set_dtype_policy("float32")  # a family may have set another
            settings["train"]["epochs"] = epochs
            path = out / f"{family}-rank{found.rank}.yaml"
            path.write_text(yaml.safe_dump(settings))
            status = main(["run", str(path), "-q"])
            if status:
                break
        if found.rank == 0:
            (out / f"{family}.status").write_text(str(status))


if __name__ == "__main__":
    train_zoo(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
