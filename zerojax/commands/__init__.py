"""Subcommands of the `zerojax` command line (see `zerojax.cli`)."""
