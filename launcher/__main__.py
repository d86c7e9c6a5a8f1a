from ktrain.cli import entry

entry()
