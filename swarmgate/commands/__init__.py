"""The subcommands of ``swarmgate``: each registers its flags (``add_command``) and runs the library."""
