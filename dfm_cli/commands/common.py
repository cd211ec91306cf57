"""What every `dfm` command shares: the Typer app, the console, and the error boundary.

No math lives in the commands. User mistakes (`DfmError`) and failures on the user's own
files (unreadable, missing, corrupt, a full disk) become a one-line `error: ...` on stderr and
exit code 2, never a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from dfm_cli.errors import FORMAT_ERRORS, DfmError, file_error_message, raised_in_reader

app = typer.Typer(
    help="Decomposable Flow Matching: progressive multi-scale generation (arXiv 2506.19839).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


def _input_files(arguments: dict) -> list[str]:
    """The command's arguments that name existing files or folders (the suspects for a format error)."""
    found = []
    for value in arguments.values():
        if isinstance(value, (str, Path)) and str(value) and Path(value).exists():
            found.append(str(value))
    return found


def boundary_message(e: Exception, arguments: dict) -> str | None:
    """The one line a command prints for `e`, or None when `e` is a bug (keep its traceback).

    A format error that names no file (`zipfile.BadZipFile` from a truncated `.npz`, PIL's
    "image file is truncated") is laid at the command's input files: they are the only bytes
    `dfm` reads that it did not write.

    >>> boundary_message(DfmError("train.lr = -1: must be > 0"), {})
    'train.lr = -1: must be > 0'
    >>> boundary_message(IsADirectoryError(21, "Is a directory", "out.npz"), {})
    'out.npz: Is a directory'
    >>> boundary_message(KeyError("num_classes"), {}) is None
    True
    """
    if isinstance(e, DfmError):
        return str(e)
    message = file_error_message(e)
    if message is None and (isinstance(e, FORMAT_ERRORS) or (isinstance(e, OSError) and raised_in_reader(e))):
        inputs = _input_files(arguments)
        where = inputs[0] if len(inputs) == 1 else f"one of {', '.join(inputs)}" if inputs else "an input file"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        message = f"{where}: not readable ({type(e).__name__}: {first})"
    return message


def user_errors(fn):
    """The error boundary of a command: user mistakes become one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (sorted below: bugs are re-raised untouched)
            message = boundary_message(e, kwargs)
            if message is None:
                raise
            typer.echo("error: " + " ".join(message.split()), err=True)
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


T = TypeVar("T")


def from_flags(cls: type[T], flags: dict[str, Any], **renamed: Any) -> T:
    """The dataclass `cls` from a command's flags of the same names (`flags` is the command's
    `locals()`), with `renamed` for the fields whose flag has another name or needs parsing."""
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in flags.items() if k in names}, **renamed})
