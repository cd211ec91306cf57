"""`.npz` members read and written a chunk of rows at a time, so that an evaluation set of any
size is assembled from its parts without ever being held whole in memory. The zip is
uncompressed `.npy` members, which `np.load` reads exactly like `np.savez` output."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from dfm_cli.errors import DfmError

CHUNK = 64 * 2**20  # bytes of rows read or written at a time


_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@contextmanager
def npz_member(path: Path, name: str) -> Iterator[tuple[tuple[int, ...], np.dtype, IO[bytes]]]:
    """Member `name` of an `.npz`, open after its header: shape, dtype and the stream of its
    rows. A member that is truncated, pickled or not C-ordered raises ValueError."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        with zf.open(info) as f:
            read = _HEADERS.get(np.lib.format.read_magic(f))
            if read is None:
                raise ValueError(f"{name}: unknown .npy version")
            shape, fortran, dtype = read(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{name}: not a plain C-ordered array")
            if info.file_size != f.tell() + math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name}: truncated")
            yield tuple(shape), dtype, f


def npz_rows(f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype, count: int) -> Iterator[np.ndarray]:
    """The first `count` rows of an array of `shape` read from `f`, a bounded chunk at a time."""
    row = math.prod(shape[1:]) * dtype.itemsize
    step = max(1, CHUNK // max(row, 1))
    for done in range(0, count, step):
        k = min(step, count - done)
        data = f.read(k * row)
        if len(data) != k * row:
            raise ValueError("truncated")
        yield np.frombuffer(data, dtype).reshape(k, *shape[1:])


def write_member(zf: zipfile.ZipFile, name: str, dtype: type, shape: tuple[int, ...], rows: Iterable[np.ndarray]):
    """Write `.npy` member `name` of `shape` from `rows`, chunk after chunk, never whole."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        n = 0
        for chunk in rows:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            n += len(chunk)
        if n != shape[0]:
            raise DfmError(f"{name}: wrote {n} rows of {shape[0]}; run the command again")
