"""Example configs and the model/data functions they point at (shipped so `ktrain init` can copy them)."""
