"""Entry point of a worker process started by a multi-process strategy.

The run plan (the validated config, as JSON) arrives in KTRAIN_PLAN: it is the only thing that
crosses the process boundary. Rank and world size come from the environment (ktrain.environment).
"""

import os
import sys

from ktrain import console
from ktrain.cli import guarded

PLAN_ENV = "KTRAIN_PLAN"


def main() -> int:
    from ktrain.config import RunConfig

    run = RunConfig.model_validate_json(os.environ[PLAN_ENV])
    console.import_keras(run.backend)  # before anything else loads it, so its start-up lines go
    from ktrain import strategies
    from ktrain.worker import run_worker

    return guarded(lambda: run_worker(run, strategies.create(run.strategy)) and 0)


if __name__ == "__main__":
    sys.exit(main())
