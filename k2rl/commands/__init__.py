"""One module per `k2rl` subcommand (see k2rl.cli)."""
