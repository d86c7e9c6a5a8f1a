"""Entry point of a worker process started by a multi-process strategy.

The run plan (the validated config, as JSON) arrives in KTRAIN_PLAN: it is the only thing that
crosses the process boundary. Rank and world size come from the environment (launcher.environment).
"""

import os
import sys

import strategies
from launcher.cli import guarded
from launcher.config import RunConfig
from launcher.worker import run_worker

PLAN_ENV = "KTRAIN_PLAN"


def main() -> int:
    run = RunConfig.model_validate_json(os.environ[PLAN_ENV])
    return guarded(lambda: run_worker(run, strategies.create(run.strategy)) and 0)


if __name__ == "__main__":
    sys.exit(main())
