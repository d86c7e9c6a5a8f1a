"""ktrain: train an ordinary Keras 3 model under the execution strategy a YAML file names.

What your own code may import (the rest of the package is ktrain's and may change):

- ``ktrain.Files``: a dataset in files, as a data fn's result (see ``ktrain.sources``).
- ``ktrain.collectives``: gradient averaging for your own training loops (its ``__all__``).
"""

import time

__version__ = "0.1.0"
__all__ = ["Files", "__version__"]

STARTED_AT = time.perf_counter()
"""When this process started ktrain: time-to-first-step and wall time count from here."""


def __getattr__(name: str):
    """``ktrain.Files`` for data fns, without importing TensorFlow with every ``import ktrain``."""
    if name == "Files":
        from ktrain.sources import Files

        return Files
    raise AttributeError(f"module 'ktrain' has no attribute '{name}'")
