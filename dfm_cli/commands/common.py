"""What every `dfm` command shares: the Typer app, the console, and user-error handling.

No math lives in the commands. User mistakes (`DfmError`) become a one-line `error: ...` on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from dfm_cli.errors import DfmError

app = typer.Typer(
    help="Decomposable Flow Matching: progressive multi-scale generation (arXiv 2506.19839).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


def user_errors(fn):
    """Turn a `DfmError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DfmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_list(text: str | None, kind: type, flag: str) -> list | None:
    """`"30,10"` → `[30, 10]`; a clear error names the flag otherwise."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DfmError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values, e.g. 30,10") from None
