"""One module per group of `tumorflow` subcommands; each exposes `register(subparsers)`."""
