"""Subcommands of the lnstaging command line; each module has register(subparsers)."""
