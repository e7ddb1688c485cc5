"""One module per `foldtron` subcommand; each defines `register(subparsers)` (see pretrain/cli.py)."""
