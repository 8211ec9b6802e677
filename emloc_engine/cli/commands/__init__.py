"""One module per ``emloc`` subcommand; each has ``register(subparsers)``."""
