"""One module per `k2rl` subcommand (see k2rl.cli)."""


def set_arguments(overrides) -> list[str]:
    """Config overrides (KEY=VALUE) as the `--set` arguments the commands read, for a child `k2rl` process."""
    return [a for override in overrides for a in ("--set", override)]
