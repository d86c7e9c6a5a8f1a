"""ktrain: train an ordinary Keras 3 model under the execution strategy a YAML file names."""

import time

__version__ = "0.1.0"

STARTED_AT = time.perf_counter()
"""When this process started ktrain: time-to-first-step and wall time count from here."""


def __getattr__(name: str):
    """``ktrain.Files`` for data fns, without importing TensorFlow with every ``import ktrain``."""
    if name == "Files":
        from ktrain.sources import Files

        return Files
    raise AttributeError(f"module 'ktrain' has no attribute '{name}'")
