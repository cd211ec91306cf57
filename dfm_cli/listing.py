"""The one folder lister: which files of a folder are data, and which class each belongs to.

Training (`data.name = "folder"`), `dfm encode` and `dfm eval` all read folders through
`list_files`, so the three agree on what a folder holds: the same suffixes, the same hidden
files skipped, the same class order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfm_cli.errors import DfmError
from dfm_cli.media import VIDEO_SUFFIXES

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Listing:
    """Files of a folder with their labels, and the class names the labels index."""

    files: tuple[tuple[Path, int], ...]
    class_names: tuple[str, ...]

    def digest(self, root: Path) -> str:
        """A short hash of the listing (relative names and labels): it changes when files are
        added, removed or relabelled, which would shift what an index points at."""
        h = hashlib.sha256()
        for path, label in self.files:
            h.update(f"{path.relative_to(root) if path.is_relative_to(root) else path}\t{label}\n".encode())
        return h.hexdigest()[:16]


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_files(
    root: str | Path, suffixes: set[str] = IMAGE_EXTENSIONS, labels_file: Path | None = None, what: str = "the folder"
) -> Listing:
    """The one folder lister of `train`, `encode` and `eval`.

    With `labels_file`, its `relative/path,label` lines name the files and labels. Otherwise
    every non-hidden subfolder of `root` is a class (sorted by name, so labels follow names)
    and its files (searched recursively) are that class; a folder without subfolders of
    matching files is one class, `all`. Only files whose suffix is in `suffixes` count, and
    nothing hidden (a name starting with `.`). `what` names the folder in errors (a flag or key).
    """
    root = Path(root)
    if not root.is_dir():
        raise DfmError(
            f"{what} {str(root)!r} is not a folder; point it at a folder of images "
            "(class subfolders, or one flat folder)"
        )
    if labels_file is not None:
        labels_file = Path(labels_file)
        if not labels_file.is_file():
            raise DfmError(f"--labels {labels_file}: no such file (expected 'relative/path,label' per line)")
        rows = [line.rsplit(",", 1) for line in labels_file.read_text().splitlines() if line.strip()]
        if not rows or any(len(r) != 2 for r in rows):
            raise DfmError(f"--labels {labels_file}: every line must be 'relative/path,label'")
        names = tuple(sorted({label.strip() for _, label in rows}))
        return Listing(tuple((root / path.strip(), names.index(label.strip())) for path, label in rows), names)

    def matching(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(f for f in found if f.suffix.lower() in suffixes and f.is_file() and _visible(f, root))

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [matching(root / name, True) for name in classes]
    top = matching(root, False)
    kinds = {frozenset(IMAGE_EXTENSIONS): "image", frozenset(VIDEO_SUFFIXES): "video"}.get(
        frozenset(suffixes), "matching"
    )
    if any(per_class):
        if top:
            raise DfmError(
                f"{what} {str(root)!r} holds {kinds} files both in class subfolders and at its top "
                f"level (e.g. {top[0].name}); move them into a class subfolder"
            )
        return Listing(tuple((f, c) for c, files in enumerate(per_class) for f in files), tuple(classes))
    if not top:
        raise DfmError(f"{what} {str(root)!r} holds no {kinds} files (expected {root}/<class>/<file> or {root}/<file>)")
    return Listing(tuple((f, 0) for f in top), ("all",))


def evenly_spaced(n: int, num: int) -> np.ndarray:
    """`min(num, n)` indices spread over `0..n-1`, first and last included: a class-sorted set
    keeps every class in any such pick.

    >>> evenly_spaced(10, 4).tolist()
    [0, 3, 6, 9]
    """
    return np.linspace(0, n - 1, min(num, n)).round().astype(np.int64)
