"""Entry point of a worker process started by a multi-process strategy.

The run plan (the validated config, as JSON) arrives in KTRAIN_PLAN: it is the only thing that
crosses the process boundary. Rank and world size come from the environment (ktrain.environment).
"""

import os
import sys

from ktrain.cli import guarded

PLAN_ENV = "KTRAIN_PLAN"


def main() -> int:
    from ktrain import strategies
    from ktrain.config import RunConfig
    from ktrain.strategies.base import train_here

    run = RunConfig.model_validate_json(os.environ[PLAN_ENV])
    return guarded(lambda: train_here(run, strategies.create(run.strategy)) and 0)


if __name__ == "__main__":
    sys.exit(main())
