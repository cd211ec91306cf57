"""The `dfm` command: the Typer app with its subcommands (see `dfm_cli/commands/`)."""

from dfm_cli.commands import ablate_cmd, decompose_cmd, encode_cmd, eval_cmd, import_cmd, sample_cmd, train_cmd  # noqa: F401  (registers commands)
from dfm_cli.commands.common import app


def main() -> None:
    app()
