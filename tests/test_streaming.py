"""Data in files (Parquet, TFRecord), streamed: each worker reads only its lanes, N workers
train on 1 process's global batches, a resumed epoch continues exactly, the per-example map
runs once per example overall, and data.audit catches broken sharding."""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import (FIXTURES, assert_same_weights, base_config, run_cli, run_command,
                     write_config)

FILES = FIXTURES.parent / "file_datasets.py"
sys.path.insert(0, str(FIXTURES.parent))  # the fixtures write the files
EPOCHS = 3
FORMATS = ("parquet", "tfrecord")  # Parquet: ktrain reads the columns; TFRecord: the user's map fn


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    from file_datasets import write_digits

    folder = tmp_path_factory.mktemp("digits-files")
    return {fmt: write_digits(folder / fmt, fmt) for fmt in FORMATS}


def files_config(out: Path, fmt: str, digits_files: dict, strategy: dict, shuffle: bool = True,
                 **data) -> dict:
    from file_datasets import PIXELS

    train, validation = digits_files[fmt]
    source = ({"features": PIXELS, "label": "label"} if fmt == "parquet" else
              {"map": {"fn": f"{FILES}:parse_and_count", "kwargs": {"folder": str(out.parent)}}})
    config = base_config(out, train={**base_config(out)["train"], "shuffle": shuffle,
                                     "epochs": EPOCHS})
    config["data"] = {"files": train, "validation_files": validation, **source, **data}
    config["strategy"] = strategy
    return config


def train(tmp_path: Path, name: str, config: dict) -> Path:
    out = tmp_path / name / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {**config, "output_dir": str(out)}
    if "map" in config["data"]:  # the map fn leaves its notes beside this run's output
        config["data"] = {**config["data"], "map": {**config["data"]["map"],
                                                    "kwargs": {"folder": str(out.parent)}}}
    result = run_cli("run", write_config(out.parent / "c.yaml", config), "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, digits_files):
    """The reference for (format, shuffle): one process, one replica (made once, when asked)."""
    done = {}

    def get(fmt: str, shuffle: bool) -> Path:
        if (fmt, shuffle) not in done:
            folder = tmp_path_factory.mktemp("one-process")
            done[fmt, shuffle] = train(folder, fmt, files_config(
                folder, fmt, digits_files, {"name": "mirrored", "devices": 1}, shuffle))
        return done[fmt, shuffle]

    return get


def decoded(run_folder: Path) -> tuple[collections.Counter, int]:
    """How often the map fn decoded each example id, and in how many processes."""
    notes = list(run_folder.glob("decoded-*.txt"))
    return collections.Counter(int(line) for note in notes for line in note.read_text().split()), \
        len(notes)


# ----------------------------------------------------------------------- in one process


def batches_of(split, *, rank=0, world_size=1, shuffle=False, first_epoch=0, first_step=0):
    from ktrain.data import training_batches

    data, steps = training_batches(split, global_batch_size=12, rank=rank, world_size=world_size,
                                   shuffle=shuffle, shuffle_buffer=60, seed=7,
                                   first_epoch=first_epoch, epochs=2, first_step=first_step)
    return [np.asarray(batch[1]).tolist() for batch in data], steps


@pytest.mark.parametrize("fmt", [*FORMATS, "parquet-numpy"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_workers_lanes_rebuild_one_workers_global_batches(digits_files, fmt, shuffle,
                                                          monkeypatch):
    """Labels stand in for examples: the label column of the files is the example's id.
    parquet-numpy: read by pyarrow into NumPy, as where TensorFlow is not installed."""
    from file_datasets import PIXELS

    from ktrain.data import to_splits
    from ktrain.sources import Files

    if fmt == "parquet-numpy":
        monkeypatch.setattr("ktrain.sources.tf", None)
        fmt = "parquet"
    train_files, _ = digits_files[fmt]
    features = PIXELS if fmt == "parquet" else ["pixels"]
    split = to_splits(Files(train_files, features=features, label="id", lanes=6), 0).train
    assert split.size == 1024 and len(split.blocks) >= 8
    single, steps = batches_of(split, shuffle=shuffle)
    assert steps == 1024 // 12 and len(single) == 2 * steps
    for epoch in (single[:steps], single[steps:]):  # every example at most once an epoch
        ids = [i for batch in epoch for i in batch]
        assert len(set(ids)) == len(ids) == steps * 12
    assert (single[:steps] != single[steps:]) == shuffle  # each epoch its own order
    for world_size in (2, 3):
        workers = [batches_of(split, rank=r, world_size=world_size, shuffle=shuffle)[0]
                   for r in range(world_size)]
        for global_batch, parts in zip(single, zip(*workers)):
            assert sorted(global_batch) == sorted(i for part in parts for i in part)
    resumed, _ = batches_of(split, shuffle=shuffle, first_epoch=1, first_step=5)
    assert resumed == single[steps + 5:]  # a resumed epoch goes on with the same batches


def test_workers_that_cannot_share_the_lanes_are_told_the_fix(digits_files):
    from ktrain.data import to_splits
    from ktrain.errors import UserError
    from ktrain.sources import Files

    split = to_splits(Files(digits_files["parquet"][0], features=["p0"], label="label"), 0).train
    with pytest.raises(UserError, match=r"(?s)5 workers cannot share 12 lanes.*multiple of 5, e.g. 60"):
        split.check_workers(5, "strategy.workers")


def test_files_that_do_not_exist_are_named(tmp_path):
    config = base_config(tmp_path / "out")
    config["data"] = {"files": "missing/train-*.parquet", "features": ["a"], "label": "y"}
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2, result.stderr
    assert "no files match" in result.stderr and "missing/train-*.parquet" in result.stderr


# ----------------------------------------------------------------------- across processes


STRATEGIES = {"mirrored-2-devices": {"name": "mirrored", "devices": 2},
              "multiworker": {"name": "multiworker", "workers": 2},
              "spark": {"name": "spark", "workers": 2},
              "ray": {"name": "ray", "workers": 2}}
# Every strategy once and every (format, shuffle) pair once: a worker reads its files with the
# same code under every strategy, and both formats' lanes, shuffled or not, are checked against
# one worker's global batches above.
RUNS = [("parquet", False, "mirrored-2-devices"), ("tfrecord", True, "multiworker"),
        ("parquet", True, "spark"), ("tfrecord", False, "ray")]


@pytest.mark.parametrize("fmt, shuffle, strategy", RUNS)
def test_two_workers_match_one_process(tmp_path, digits_files, one_process, fmt, shuffle,
                                       strategy):
    audit = strategy == "multiworker"
    out = train(tmp_path, strategy, files_config(tmp_path, fmt, digits_files,
                                                 STRATEGIES[strategy], shuffle, audit=audit))
    assert_same_weights(one_process(fmt, shuffle), out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_replicas"] == 2
    if audit:  # the real sharding passes the audit
        assert summary["data_audit"] == {"epochs_checked": EPOCHS}
    if fmt == "tfrecord" and summary["world_size"] == 2:
        # The map decoded each example once per epoch, in one worker or the other. (One process
        # with 2 devices is left out: TF's distributed iterator reads a batch or two ahead.)
        counts, processes = decoded(out.parent)
        assert set(counts.values()) == {EPOCHS} and len(counts) == 1024 + 256
        assert processes == 2
        assert decoded(one_process(fmt, shuffle).parent)[0] == counts


def test_the_audit_stops_a_run_whose_workers_read_the_same_examples(tmp_path, digits_files):
    out = tmp_path / "out"
    config = base_config(out)
    config["strategy"] = {"name": "multiworker", "workers": 2}
    config["data"] = {"fn": f"{FILES}:every_rank_reads_rank_zeros_lanes",
                      "kwargs": {"files": digits_files["parquet"][0]}, "audit": True}
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    said = result.stdout + result.stderr
    assert result.returncode == 1
    assert said.count("ktrain: error:") == 1, said
    assert "data.audit: in epoch 1 the workers read 1024 examples (rank 0 512, rank 1 512)" \
           in said and "identical (ranks 0 and 1)" in said
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_two_workers_stream_more_data_than_their_memory_budget(tmp_path):
    """512 MiB of Parquet on 2 workers, each allowed 160 MiB above what it needs for a tiny
    slice of the same files (TensorFlow, the model, the pipeline): streaming stays within it,
    where loading the files (a third of them would do) could not."""
    from file_datasets import write_wide

    budget_mib = 160
    files = write_wide(tmp_path / "wide", files=16, rows_per_file=32768)  # 524,288 x 1 KiB
    slice_of_it = write_wide(tmp_path / "slice", files=2, rows_per_file=4096)
    dataset_mib = sum(f.stat().st_size for f in (tmp_path / "wide").iterdir()) / 2**20
    assert dataset_mib > 3 * budget_mib

    def peaks(name: str, data: dict) -> list[float]:
        config = base_config(tmp_path / name, model={"fn": f"{FILES}:linear", "kwargs": {}},
                             train={**base_config(tmp_path)["train"], "epochs": 1,
                                    "global_batch_size": 1024, "shuffle": True})
        config["data"] = data
        config["strategy"] = {"name": "multiworker", "workers": 2}
        result = run_cli("run", write_config(tmp_path / f"{name}.yaml", config), "-q")
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert len(summary["peak_memory_mib"]) == 2
        return summary["peak_memory_mib"]

    streamed = {"features": ["x"], "label": "y"}
    footprint = max(peaks("slice", {"files": slice_of_it, **streamed}))
    assert max(peaks("streamed", {"files": files, **streamed})) < footprint + budget_mib


def test_a_run_resumed_mid_epoch_on_two_workers_ends_with_the_unbroken_runs_weights(
        tmp_path, digits_files):
    """Shuffled TFRecord lanes: a 1-process checkpoint 5 global batches into epoch 2, resumed
    by 2 workers, ends where the unbroken run did."""
    from ktrain.checkpoint import CheckpointStore, Position

    unbroken = files_config(tmp_path, "tfrecord", digits_files, STRATEGIES["mirrored-2-devices"])
    unbroken["strategy"]["devices"] = 1
    unbroken["checkpoint"] = {**unbroken["checkpoint"], "every_steps": 7, "keep": 100}
    reference = train(tmp_path, "unbroken", unbroken)
    checkpoint = CheckpointStore(str(reference / "checkpoints")).file_for(Position(1, 5))
    resumed = files_config(tmp_path, "tfrecord", digits_files, STRATEGIES["multiworker"])
    resumed["checkpoint"] = {**resumed["checkpoint"], "resume": checkpoint}
    out = train(tmp_path, "resumed", resumed)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs_completed"]) == (2, EPOCHS)
    assert_same_weights(reference, out)


@pytest.mark.parametrize("config", ["parquet.yaml", "tfrecord.yaml"])
def test_the_readmes_file_configs_train(tmp_path, config):
    """configs/parquet.yaml and configs/tfrecord.yaml on the files configs/streaming.py writes."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    written = run_command([sys.executable, str(configs / "streaming.py"), str(tmp_path / "data")])
    assert written.returncode == 0, written.stderr
    fmt = config.split(".")[0]
    result = run_cli("run", str(configs / config), f"output_dir={tmp_path / 'out'}",
                     f"data.files={tmp_path}/data/{fmt}/train-*.{fmt}",
                     f"data.validation_files={tmp_path}/data/{fmt}/validation-*.{fmt}", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["final_metrics"]["val_accuracy"] >= 0.9
