"""One module per ``teal`` subcommand; each defines ``register(subparsers)``."""
