"""The one exception type for user mistakes, and how failures reading user files become one.

The CLI turns a `DfmError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback. A file the user handed us can fail in many library-specific ways
(a truncated `.npz` is a `zipfile.BadZipFile`, a corrupt PNG a `PIL.UnidentifiedImageError`,
a Latin-1 recipe a `UnicodeDecodeError`); `reading` wraps the code that reads one file and
turns those into a `DfmError` that names it, and `file_error_message` lets the command
boundary (`commands/common.user_errors`) do the same for the ones that carry a file name.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


class DfmError(ValueError):
    """A problem with the user's input (recipe, file, flag), with a message that says how to fix it."""


DIFFUSERS_HINT = 'pip install "dfm-cli[diffusers]"'


def import_diffusers(what: str) -> ModuleType:
    """The optional `diffusers` package, or a one-line `DfmError` saying that `what` needs it
    and how to install it (every path that builds a diffusers model goes through here)."""
    try:
        return importlib.import_module("diffusers")
    except ImportError:
        raise DfmError(f"{what} needs diffusers: {DIFFUSERS_HINT}") from None


# Errors that mean "this file's bytes are not what they claim to be", never a bug of ours.
FORMAT_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, EOFError, UnicodeDecodeError)
# What `reading` turns into a `DfmError`: the format errors, and a bad path or value.
_READ_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, *FORMAT_ERRORS)
# Errors a disk or file system gives for any path, with or without a file name.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# Libraries that decode files: an `OSError` raised inside them ("image file is truncated")
# is about the bytes of a file, even when it does not name it.
FILE_READERS = ("PIL", "zipfile", "numpy.lib", "safetensors", "tomllib", "gzip")


def raised_in_reader(e: BaseException) -> bool:
    """True when the innermost frame of `e` belongs to a file-decoding library."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return any(module == lib or module.startswith(lib + ".") for lib in FILE_READERS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _unidentified_image(e: BaseException) -> bool:
    try:
        from PIL import UnidentifiedImageError
    except ImportError:  # PIL is a dependency; this only keeps errors.py free of hard imports
        return False
    return isinstance(e, UnidentifiedImageError)


def file_error_message(e: BaseException) -> str | None:
    """A one-line message for a failure on a user's file, or None if `e` may be a bug.

    Only errors that name their file (or that any path can raise: a full or read-only disk)
    qualify, so an `OSError` deep in our own code is never hidden.

    >>> file_error_message(PermissionError(13, "Permission denied", "runs/x/recipe.toml"))
    'runs/x/recipe.toml: Permission denied'
    >>> file_error_message(KeyError("step")) is None
    True
    """
    if _unidentified_image(e):
        return f"{_first_line(e)} (not a readable image; delete or replace it)"
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else None
        reason = e.strerror or _first_line(e)
        if where is not None:
            extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
            return f"{where}{extra}: {reason}"
        if e.errno in DISK_ERRNOS:
            return f"{reason} (free space or pick another output folder)"
    return None


@contextmanager
def reading(path: str | Path, what: str = "file") -> Iterator[None]:
    """Turn a failure while reading the user's `path` into a `DfmError` that names it.

    Use it around the code that opens and parses one user file, not around computation:
    inside it, a `KeyError` is a missing field and a `ValueError` a malformed one.

    >>> with reading("broken.npz", "sample set"):
    ...     raise zipfile.BadZipFile("File is not a zip file")
    Traceback (most recent call last):
    ...
    dfm_cli.errors.DfmError: broken.npz: not a readable sample set (File is not a zip file)
    """
    try:
        yield
    except DfmError:
        raise
    except KeyError as e:
        raise DfmError(f"{path}: not a readable {what} (missing {e})") from None
    except _READ_ERRORS as e:
        named = file_error_message(e) if isinstance(e, OSError) and e.filename is not None else None
        raise DfmError(named or f"{path}: not a readable {what} ({_first_line(e)})") from None


def suggest(word: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the nearest of `options`, or nothing."""
    near = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""
