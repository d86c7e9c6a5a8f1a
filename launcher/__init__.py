"""ktrain: train an ordinary Keras 3 model under the execution strategy a YAML file names."""

import time

__version__ = "0.1.0"

STARTED_AT = time.perf_counter()
"""When this process started ktrain: time-to-first-step and wall time count from here."""
