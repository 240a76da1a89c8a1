"""The ``lnstaging`` command line: entry point, shared options and one module per subcommand."""
