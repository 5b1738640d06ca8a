"""The command line: ``swarmgate`` and its subcommands, which turn flags into the libraries' configuration."""
