"""Entry point of a rank process that a strategy started (``python -m ktrain.worker_entry``):
the run and the training function come from its environment (``ktrain.launch``), its place in
the group too (``ktrain.environment``)."""

import sys

from ktrain import strategies
from ktrain.cli import guarded
from ktrain.launch import read_plan, train_here


def main() -> int:
    run, train = read_plan()
    strategy = strategies.create(run.strategy)
    return guarded(lambda: train_here(run, strategy.open_session, train) and 0)


if __name__ == "__main__":
    sys.exit(main())
