"""Starting points for `ktrain init --template NAME` (see ktrain.cli.TEMPLATES)."""
