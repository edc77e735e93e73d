"""One module per `k2rl` subcommand (see k2rl.cli)."""


def set_arguments(overrides) -> list[str]:
    """Config overrides (KEY=VALUE) as the `--set` arguments the commands read, for a child `k2rl` process."""
    return [a for override in overrides for a in ("--set", override)]


def add_set_argument(parser, example: str = "optimizer.lr=1e-3") -> None:
    """The repeatable `--set KEY=VALUE` config override that every command and script takes
    (`args.overrides`, in order: a later one wins)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")
