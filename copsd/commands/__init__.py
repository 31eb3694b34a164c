"""CLI subcommands (see copsd.cli)."""
