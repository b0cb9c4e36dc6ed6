"""Subcommands of the xlaserve CLI, one module each (see xlaserve/cli.py)."""
