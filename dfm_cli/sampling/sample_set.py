"""Large sample sets for evaluation: sharded over processes, resumable, class-balanced, fingerprinted.

Sample i has label `i % num_classes` (cycling through `data.classes` when a run trained on a
subset) and noise seeded by `(seed, i)` (see `sampler.generate`), so a set is a function of the
model, the sampler settings and the seed, sample by sample: any prefix of a larger set is the
smaller set, whatever the batch size or number of processes.
That is what makes resuming, shrinking and extending exact.

Every set carries a manifest (the weights' digest, EMA or not, seed, sampler settings, image
shape, autoencoder, num). A re-run whose manifest differs from the one on disk is refused
with one line naming the difference, or, with `overwrite`, starts over. Only verified parts
are reused: a batch file or PNG with the wrong shape, labels or count, or one that does not
load, is generated again. Files are written under process-unique temporary names and renamed
into place, so an interrupted run leaves finished parts and nothing half-written.

One process writes a set at a time: `set_lock` holds `.NAME.lock` beside `out` (rank 0 holds
it for all torchrun ranks), and a second writer, `--overwrite` or not, is refused with the
holder's PID. Each finished part has a record beside it (`part-….json`: its SHA-256 and the
manifest it was made from, less `num`), and a part is reused only when both match.

Memory is bounded by `--batch`, never by `--num`: parts are streamed to disk and the final
`.npz` is written member by member from them (`np.lib.format` headers, rows appended), so a
set is limited by the disk, which is checked before anything is written.

Outputs:
- `NAME.npz`: ADM layout, `arr_0` uint8 `N H W 3` (video: `N T H W 3`), `arr_1` the labels,
  and `manifest` (JSON text). While it is being made, parts live in `NAME.npz.parts/`.
- a folder: `000000.png`, `000001.png`, … and `manifest.json` (images only; grey stays grey).

The two are `NpzSetWriter` and `FolderSetWriter`, chosen once from the name of `out`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from dfm_cli import distributed
from dfm_cli.config.checks import BATCH_MEMORY_LIMIT
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.checkpoints import claim_lock, file_sha256, try_lock
from dfm_cli.data.text_encoders import Prompts
from dfm_cli.errors import DfmError
from dfm_cli.media import as_rgb, to_uint8
from dfm_cli.method.cond import Cond
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.sampler import COND_NOISE, LevelModel, SampleResult, SamplerSettings, generate, sampled_classes
from dfm_cli.sampling.npz_stream import CHUNK, npz_member, npz_rows, write_member
from dfm_cli.sampling.runs import TrainedRun, load_for_sampling

MANIFEST = "manifest.json"
_PNG = re.compile(r"^(\d{6})\.png$")
_PART = re.compile(r"^part-(\d{9})-(\d{9})\.npz$")
SAMPLE_MEMORY_LIMIT = BATCH_MEMORY_LIMIT  # bytes: the decoded float32 samples held at once (a batch, a grid)


def set_manifest(
    settings: SamplerSettings, *, seed: int, num: int, shape: Sequence[int], source: dict[str, Any]
) -> dict[str, Any]:
    """What produced a set: `source` (checkpoint digest, ema, autoencoder), seed, sampler
    settings, the per-sample uint8 `shape` as written, and `num`; JSON-normalised.

    >>> m = set_manifest(SamplerSettings(steps=(3, 2), tau=(0.7,)), seed=0, num=8, shape=(16, 16, 3),
    ...                  source={"checkpoint": "ab12", "ema": True, "autoencoder": None})
    >>> m["steps"], m["tau"], m["num"], m["shape"]
    ([3, 2], [0.7], 8, [16, 16, 3])
    """
    return json.loads(
        json.dumps({**source, "seed": seed, **dataclasses.asdict(settings), "shape": list(shape), "num": num})
    )


# Sampler settings added after sets were first written, with the value an older set was made with.
ADDED_SETTINGS = {"shift": 1.0, "cond_noise": COND_NOISE}


def manifest_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The keys (besides `num`, which may grow or shrink) whose values differ, as one phrase.
    A key an older manifest lacks counts as the value it was made with (`ADDED_SETTINGS`).

    >>> manifest_difference({"seed": 0, "cfg": 1.5, "num": 8}, {"seed": 1, "cfg": 1.5, "num": 9})
    'seed 0 → 1'
    """

    def show(v: Any) -> str:
        text = json.dumps(v)
        return text[:14] + "…" if len(text) > 16 else text

    old, new = {**ADDED_SETTINGS, **old}, {**ADDED_SETTINGS, **new}
    keys = sorted((old.keys() | new.keys()) - {"num"})
    return ", ".join(f"{k} {show(old.get(k))} → {show(new.get(k))}" for k in keys if old.get(k) != new.get(k))


def _labels(first: int, last: int, classes: int | Sequence[int]) -> np.ndarray:
    """Labels of samples first..last-1 (`class_balanced_labels(last, classes)[first:]`, without
    making the first `first` of them).

    >>> _labels(3, 6, 2).tolist(), _labels(1, 4, [8, 9]).tolist()
    ([1, 0, 1], [9, 8, 9])
    """
    ids = torch.arange(classes) if isinstance(classes, int) else torch.tensor(list(classes))
    return ids[torch.arange(first, last) % len(ids)].numpy()


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


def check_samples_memory(flag: str, count: int, shape: Sequence[int], copies: int = 1, hint: str = "") -> None:
    """Refuse, before they are made, `count` decoded samples of `shape` (`C [T] H W`) held at once
    as float32 (`copies` of them: previews too) when they pass `SAMPLE_MEMORY_LIMIT`.

    >>> try:
    ...     check_samples_memory("--batch", 2**20, (3, 256, 256))
    ... except DfmError as e:
    ...     print(str(e)[:70])
    --batch 1048576: 1048576 samples of 3x256x256 are 768.0 GiB as float32
    """
    per = math.prod(shape)
    need = count * per * 4 * copies
    if need > SAMPLE_MEMORY_LIMIT:
        times = f" x {copies} (the previews)" if copies > 1 else ""
        raise DfmError(
            f"{flag} {count}: {count} samples of {'x'.join(map(str, shape))} are {_gib(need)} as float32 "
            f"({count} x {per} x 4 B{times}), over the {SAMPLE_MEMORY_LIMIT // 2**30} GiB limit on what is held "
            f"in memory at once; lower {flag}{hint}"
        )


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path if path.is_dir() else path.parent).free


@contextmanager
def set_lock(out: Path) -> Iterator[None]:
    """Hold the sample set `out` for this process: another writer of it is refused, naming us.

    The lock is `flock` on `.NAME.lock` beside `out`, which the kernel releases however the
    process ends. The holder removes the file when done; a waiter that locked a file removed
    under it tries again, so two processes never both hold `out`.
    """
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DfmError(f"--out {out}: cannot write there ({e.strerror}); choose another --out") from None
    while True:
        try:
            fd, holder = try_lock(path)
        except OSError as e:
            raise DfmError(f"--out {out}: cannot write there ({e.strerror}); choose another --out") from None
        if holder:
            raise DfmError(
                f"--out {out} is being written by another dfm process (PID {holder}); wait for it to "
                "finish or stop it, or choose another --out"
            )
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed it as we opened it: lock the new one
    try:
        claim_lock(fd)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _on_rank0(ctx: distributed.Context, act: Callable[[], object], what: str) -> None:
    """Run `act` on rank 0 only; a `DfmError` there stops every rank (no rank waits at a barrier)."""
    refused: DfmError | None = None
    if ctx.main:
        try:
            act()
        except DfmError as e:
            refused = e
    if float(distributed.all_sum(ctx, torch.tensor([float(refused is not None)]))) > 0:
        raise refused or DfmError(f"rank 0 refused {what} (see its message)")


def _write_npz_streamed(
    out: Path,
    shape: tuple[int, ...],
    num: int,
    images: Iterable[np.ndarray],
    classes: int | Sequence[int],
    manifest: dict[str, Any],
) -> None:
    """The ADM `.npz` of samples 0..num-1 (`arr_0` from the chunks `images`, `arr_1` their
    balanced labels, `manifest`), as `np.savez` lays it out, without holding it in memory."""
    step = max(1, CHUNK // 8)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            write_member(zf, "arr_0", np.uint8, (num, *shape), images)
            labels = (_labels(a, min(a + step, num), classes) for a in range(0, num, step))
            write_member(zf, "arr_1", np.int64, (num,), labels)
            with zf.open("manifest.npy", "w") as f:
                np.lib.format.write_array(f, np.array(json.dumps(manifest)), allow_pickle=False)

    _atomic_save(out, write)


def _atomic_save(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """An `.npz`'s arrays, or None when it does not load (truncated, not a zip, pickled)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None


def _good_rows(
    arrays: dict[str, np.ndarray] | None, first: int, last: int, shape: Sequence[int], classes: int | Sequence[int]
) -> bool:
    """Whether `arrays` hold exactly samples first..last-1: uint8 images of `shape`, balanced labels."""
    if arrays is None or "arr_0" not in arrays or "arr_1" not in arrays:
        return False
    images, labels = arrays["arr_0"], arrays["arr_1"]
    return (
        images.dtype == np.uint8
        and images.shape == (last - first, *shape)
        and np.array_equal(labels, _labels(first, last, classes))
    )


def _good_png(path: Path, shape: Sequence[int]) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (shape[1], shape[0]) and im.mode == ("L" if shape[2] == 1 else "RGB")
    except (OSError, ValueError, SyntaxError):
        return False


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class SetWriter(ABC):
    """Where a set's files go, `NpzSetWriter` or `FolderSetWriter` (see the module docstring).
    `write_sample_set` samples, shards and synchronises the ranks; a writer only reads and
    writes files: `open` (every rank, read-only), `resume` (rank 0), `append` (each rank its
    batches), `finish` (rank 0)."""

    def __init__(self, out: Path, shape: tuple[int, ...], want: dict[str, Any], classes: int | Sequence[int]):
        self.out, self.shape, self.want, self.classes = out, shape, want, classes
        self.num = int(want["num"])
        self.work = out  # where the samples are written while the set is made
        self.kept = 0  # samples 0..kept-1 are already in their final place

    @staticmethod
    def for_path(out: Path) -> type[SetWriter]:
        """The writer of `out`, from its name: `.npz` or a folder."""
        return NpzSetWriter if out.suffix == ".npz" else FolderSetWriter

    @staticmethod
    @abstractmethod
    def sample_shape(out: Path, raw: tuple[int, ...]) -> tuple[int, ...]:
        """The uint8 shape of a sample as written, from the decoder's `raw` (`[T] H W C`)."""

    @abstractmethod
    def open(self) -> str:
        """Look at what `out` holds (sets `kept`); why it cannot be continued, "" when all agrees."""

    @abstractmethod
    def resume(self, start_over: bool) -> None:
        """Rank 0, before sampling: clear the set's own files (`start_over`), or keep what is
        there and prepare the rest."""

    @abstractmethod
    def append(self, first: int, last: int, sample: Callable[[], np.ndarray]) -> None:
        """Samples first..last-1, unless they are there and verify; `sample()` makes them (uint8 `N [T] H W C`)."""

    @abstractmethod
    def finish(self, plan: Iterable[tuple[int, int]]) -> None:
        """Rank 0, after every batch of `plan` was appended."""

    def disk_needed(self) -> int:
        """Bytes the set still needs on disk, at most (uncompressed samples)."""
        there = sum(p.stat().st_size for p in self.work.glob("[0-9]*.png")) if self.work.is_dir() else 0
        return max(0, self.num * math.prod(self.shape) - there)

    def check_disk(self) -> None:
        """Refuse a set the disk cannot hold, before anything is written."""
        need, free = self.disk_needed(), _free_bytes(self.out)
        if need > free:
            npz = " (parts, then the .npz made from them)" if isinstance(self, NpzSetWriter) else ""
            raise DfmError(
                f"--num {self.num}: the set needs about {_gib(need)} more on disk{npz} for "
                f"{self.num} samples of {'x'.join(map(str, self.shape))} uint8, but only {_gib(free)} is free "
                f"under {self.out.parent}; lower --num or free some space"
            )

    def work_problem(self, made: str) -> str:
        """Why the samples in `work` cannot be continued ("" when they can); `made` names them."""
        if not self.work.is_dir():
            return ""
        old = _read_manifest(self.work / MANIFEST)
        ours = [p for p in self.work.iterdir() if _PNG.match(p.name) or _PART.match(p.name)]
        if old is None and ours:
            return f"{self.work} holds samples without a manifest (from an older dfm)"
        if old is not None and (diff := manifest_difference(old, self.want)):
            return f"{made} made with other settings ({diff})"
        return ""

    def refuse_other_kind(self, folder: bool) -> None:
        """A file where a folder is wanted, or the other way round, is the user's to move."""
        if self.out.exists() and self.out.is_dir() != folder:
            raise DfmError(
                f"--out {self.out}: is a {'folder' if self.out.is_dir() else 'file'}; "
                f"give {'a folder' if folder else 'an .npz file name'} that is not taken"
            )

    def write_manifest(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.work / MANIFEST, lambda p: p.write_text(json.dumps(self.want, indent=1)))


class NpzSetWriter(SetWriter):
    """An ADM `.npz`, made from verified part files in `NAME.npz.parts/` and streamed into place at the end."""

    def __init__(self, out: Path, shape: tuple[int, ...], want: dict[str, Any], classes: int | Sequence[int]):
        super().__init__(out, shape, want, classes)
        self.work = out.with_name(out.name + ".parts")
        self.held = 0  # rows of a finished, verified set already at `out`
        self.source = {k: v for k, v in want.items() if k != "num"}  # what each part records

    @staticmethod
    def sample_shape(out: Path, raw: tuple[int, ...]) -> tuple[int, ...]:
        return (*raw[:-1], 3)  # ADM layout: grey becomes RGB

    def _held_rows(self) -> int | None:
        """Rows of the set at `out` when its manifest is ours and its arrays verify (read a
        chunk at a time), None when it has no sample-set manifest; raises ValueError when its
        manifest differs."""
        try:
            with np.load(self.out, allow_pickle=False) as d:
                old = json.loads(str(d["manifest"]))
            if diff := manifest_difference(old, self.want):
                raise ValueError(f"holds samples made with other settings ({diff})")
            with npz_member(self.out, "arr_0") as (shape, dtype, _):
                good = dtype == np.uint8 and shape[1:] == self.shape
            with npz_member(self.out, "arr_1") as (lshape, ldtype, f):
                good = good and lshape == shape[:1]
                done = 0
                for chunk in npz_rows(f, lshape, ldtype, lshape[0]) if good else ():
                    good = good and np.array_equal(chunk, _labels(done, done + len(chunk), self.classes))
                    done += len(chunk)
            return shape[0] if good else 0
        except (OSError, EOFError, zipfile.BadZipFile, KeyError, IndexError, AttributeError, TypeError):
            return None
        except json.JSONDecodeError:
            return None
        except ValueError as e:
            if str(e).startswith("holds samples"):
                raise
            return None

    def open(self) -> str:
        self.refuse_other_kind(folder=False)
        problems = []
        held = 0
        if self.out.exists():
            try:
                rows = self._held_rows()
            except ValueError as e:
                problems.append(str(e))
            else:
                if rows is None:
                    problems.append("the file there has no sample-set manifest (another tool or an older dfm wrote it)")
                held = rows or 0
        if problem := self.work_problem("its unfinished parts were"):
            problems.append(problem)
        self.held = 0 if problems else held  # the set starts over (or is refused): nothing held counts
        self.kept = min(self.held, self.num)
        return "; ".join(problems)

    def disk_needed(self) -> int:
        """Bytes still to write: the missing parts, then the whole `.npz` beside them."""
        per = math.prod(self.shape)
        there = sum(p.stat().st_size for p in self.work.glob("part-*.npz")) if self.work.is_dir() else 0
        if self.held >= self.num:
            return self.num * per if self.held > self.num else 0
        return max(0, (self.num - self.kept) * per - there) + self.num * per

    def resume(self, start_over: bool) -> None:
        if start_over:
            self.out.unlink(missing_ok=True)
            shutil.rmtree(self.work, ignore_errors=True)
        if self.held and self.held >= self.num:  # shrink, or nothing to do
            if self.held > self.num:
                self._write(())
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            self.write_manifest()

    def part(self, first: int, last: int) -> Path:
        return self.work / f"part-{first:09d}-{last:09d}.npz"

    def _verified_part(self, first: int, last: int) -> np.ndarray | None:
        """Part first..last-1's images when its record names our source and its digest, and its
        rows verify; else None."""
        target = self.part(first, last)
        try:
            record = json.loads(target.with_suffix(".json").read_text())
            data = target.read_bytes()
        except (OSError, ValueError):
            return None
        if record.get("source") != self.source or record.get("sha256") != hashlib.sha256(data).hexdigest():
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as d:
                arrays = {k: d[k] for k in d.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
            return None
        return arrays["arr_0"] if _good_rows(arrays, first, last, self.shape, self.classes) else None

    def append(self, first: int, last: int, sample: Callable[[], np.ndarray]) -> None:
        if self._verified_part(first, last) is not None:
            return
        target, record = self.part(first, last), self.part(first, last).with_suffix(".json")
        record.unlink(missing_ok=True)
        images = as_rgb(sample())
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=images, arr_1=_labels(first, last, self.classes))
        data = buffer.getvalue()
        _atomic_save(target, lambda p: p.write_bytes(data))
        facts = {"rows": [first, last], "sha256": hashlib.sha256(data).hexdigest(), "source": self.source}
        _atomic_save(record, lambda p: p.write_text(json.dumps(facts, indent=1)))  # the part counts from here

    def _write(self, plan: Iterable[tuple[int, int]]) -> None:
        """Stream the kept rows of the set at `out`, then the parts of `plan`, into a new `out`."""

        def images() -> Iterator[np.ndarray]:
            if self.kept:
                try:
                    with npz_member(self.out, "arr_0") as (shape, dtype, f):
                        yield from npz_rows(f, shape, dtype, self.kept)
                except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                    raise DfmError(f"{self.out}: changed while sampling; run the command again") from None
            for first, last in plan:
                part = self._verified_part(first, last)
                if part is None:
                    raise DfmError(
                        f"{self.work}: part {first}..{last - 1} changed while sampling; run the command again"
                    )
                yield part

        _write_npz_streamed(self.out, self.shape, self.num, images(), self.classes, self.want)

    def finish(self, plan: Iterable[tuple[int, int]]) -> None:
        self._write(plan)
        shutil.rmtree(self.work)


class FolderSetWriter(SetWriter):
    """A folder of `000000.png`, … with `manifest.json`, verified PNG by PNG; the folder may
    hold the user's other files, which are never touched."""

    @staticmethod
    def sample_shape(out: Path, raw: tuple[int, ...]) -> tuple[int, ...]:
        if len(raw) != 3:
            raise DfmError(f"--out {out}: video samples are written to an .npz file, not a PNG folder")
        return raw  # grey stays one channel

    def open(self) -> str:
        self.refuse_other_kind(folder=True)
        return self.work_problem("holds samples")

    def resume(self, start_over: bool) -> None:
        if start_over and self.work.is_dir():
            for p in self.work.iterdir():
                if _PNG.match(p.name) or p.name == MANIFEST or p.name.startswith(".tmp-"):
                    p.unlink()
        self.write_manifest()
        for p in self.work.iterdir():  # a smaller set: the PNGs beyond it go
            m = _PNG.match(p.name)
            if (m and int(m.group(1)) >= self.num) or p.name.startswith(".tmp-"):
                p.unlink()

    def append(self, first: int, last: int, sample: Callable[[], np.ndarray]) -> None:
        targets = [self.work / f"{i:06d}.png" for i in range(first, last)]
        bad = [t for t in targets if not _good_png(t, self.shape)]
        if not bad:
            return
        for target, image in zip(targets, sample()):
            if target in bad:
                _atomic_save(target, _png_writer(image))

    def finish(self, plan: Iterable[tuple[int, int]]) -> None:
        """Nothing to gather: each PNG is in place once written."""


def write_sample_set(
    model: torch.nn.Module,
    decomposition: Decomposition,
    settings: SamplerSettings,
    out: Path,
    *,
    num: int,
    batch: int,
    seed: int,
    classes: int | Sequence[int],
    source: dict[str, Any],
    ctx: distributed.Context,
    decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    overwrite: bool = False,
    on_batch: Callable[[int], None] = lambda n: None,
    condition: Callable[[torch.Tensor], Cond] = lambda labels: labels,
    generate: Callable[..., SampleResult] = generate,
) -> Path:
    """Make (or resume, shrink, extend) the set of samples 0..num-1 in `out` (`.npz` or folder).

    Samples are decoded to pixels by `decode`; `source` identifies the model in the manifest
    (see `set_manifest`). Batch k of the missing samples goes to rank `k % world`. Sample i's
    label is the i-th balanced one of `classes`; `condition` turns labels into what the model
    takes (for a text run: prompt indices into the encoded prompts, with `classes` = the prompt
    count, so sample i has prompt `i % P` and `arr_1` holds prompt indices). `generate` samples
    a batch (`sampler.generate`'s signature; a run passes its method's).

    Memory is bounded by `batch` (checked against `SAMPLE_MEMORY_LIMIT`), and `num` by the free
    disk, both before anything is written. Rank 0 holds `set_lock(out)` for every rank while
    the set is made.
    """
    if num < 1 or batch < 1:
        raise DfmError(f"--num {num} --batch {batch}: both must be at least 1")
    raw = decoded_shape(model, decode)
    check_samples_memory("--batch", batch, raw)
    kind = SetWriter.for_path(out)
    shape = kind.sample_shape(out, (*raw[1:], raw[0]))
    want = set_manifest(settings, seed=seed, num=num, shape=shape, source=source)
    _on_rank0(ctx, lambda: _check_disk(kind(out, shape, want, classes)), "the set's size")
    with ExitStack() as held:
        _on_rank0(ctx, lambda: held.enter_context(set_lock(out)), f"--out {out}")
        return _write_locked(
            model, decomposition, settings, kind(out, shape, want, classes), batch, seed, ctx, decode,
            overwrite, on_batch, condition, generate,
        )  # fmt: skip


def _check_disk(writer: SetWriter) -> None:
    writer.open()  # read-only: what is kept counts as written
    writer.check_disk()


def decoded_shape(model: torch.nn.Module, decode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, ...]:
    """The shape of one decoded sample, `C [T] H W`, from decoding one zero latent."""
    sized = cast(LevelModel, model)  # what every method's network keeps
    probe = decode(torch.zeros(1, sized.channels, *sized.level_sizes[-1], device=next(model.parameters()).device))
    return tuple(probe.shape[1:])


def _write_locked(
    model: torch.nn.Module,
    decomposition: Decomposition,
    settings: SamplerSettings,
    writer: SetWriter,
    batch: int,
    seed: int,
    ctx: distributed.Context,
    decode: Callable[[torch.Tensor], torch.Tensor],
    overwrite: bool,
    on_batch: Callable[[int], None],
    condition: Callable[[torch.Tensor], Cond],
    generate: Callable[..., SampleResult],
) -> Path:
    """`write_sample_set` once `writer.out` is held: open, resume, sample this rank's batches, finish."""
    out, num, classes = writer.out, writer.num, writer.classes
    problem = writer.open()
    if problem and not overwrite:
        raise DfmError(f"--out {out}: {problem}; pass --overwrite to start over, or choose another --out")
    distributed.barrier(ctx)
    if ctx.main:
        writer.resume(start_over=bool(problem))
    distributed.barrier(ctx)
    if writer.kept == num:
        on_batch(num)
        return out
    if writer.kept:
        on_batch(writer.kept)
    starts = range(writer.kept, num, batch)  # lazy: a plan never holds one entry per batch
    for first in starts[ctx.rank :: ctx.world]:
        last = min(first + batch, num)
        labels = torch.from_numpy(_labels(first, last, classes))

        def sample(labels: torch.Tensor = labels, first: int = first) -> np.ndarray:
            result = generate(model, condition(labels), decomposition, settings, seed=seed, first_index=first)
            return to_uint8(decode(result.x))

        writer.append(first, last, sample)
        on_batch(last - first)
    distributed.barrier(ctx)
    if ctx.main:
        writer.finish((a, min(a + batch, num)) for a in starts)
    distributed.barrier(ctx)
    return out


def write_run_sample_set(
    trained: TrainedRun,
    settings: SamplerSettings,
    out: Path,
    *,
    num: int,
    batch: int,
    seed: int,
    ctx: distributed.Context,
    overwrite: bool = False,
    on_batch: Callable[[int], None] = lambda n: None,
    prompts: Prompts | None = None,
) -> Path:
    """`write_sample_set` for a loaded run: its decomposition, its autoencoder as the decoder,
    and its weights' digest in the manifest. What `dfm sample --num` and evaluation call.
    A text run samples `prompts` in turn (their digest joins the manifest)."""
    info = trained.info
    source = {"checkpoint": file_sha256(trained.weights), "ema": trained.ema, "autoencoder": info.autoencoder}
    condition: Callable[[torch.Tensor], Cond] = lambda labels: labels
    if prompts is not None:
        source["prompts"] = prompts.digest
        condition = prompts.condition
    return write_sample_set(
        trained.model,
        trained.decomposition,
        settings,
        out,
        num=num,
        batch=batch,
        seed=seed,
        classes=sampled_classes(trained.recipe, info) if prompts is None else len(prompts.texts),
        source=source,
        ctx=ctx,
        decode=from_config(info.autoencoder, ctx.device).decode,
        overwrite=overwrite,
        on_batch=on_batch,
        condition=condition,
        generate=trained.method.generate,
    )


def _png_writer(image: np.ndarray) -> Callable[[Path], None]:
    """What writes `image` as a PNG: grey (`L`) for one channel, else RGB."""
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return lambda path: picture.save(path, format="PNG")


def run_set_path(checkpoint: Path, num: int) -> Path:
    """`RUN/eval/samples-<num>-step-<9 digits>.npz`: one set per checkpoint, so more training
    never reuses a stale set.

    >>> run_set_path(Path("runs/q/checkpoints/step-000001500"), 1000).as_posix()
    'runs/q/eval/samples-1000-step-000001500.npz'
    """
    return checkpoint.parent.parent / "eval" / f"samples-{num}-{checkpoint.name}.npz"


def run_sample_set(checkpoint: Path, num: int, batch: int, on_batch=lambda n: None, verify: bool = True) -> Path:
    """Write the evaluation set of `checkpoint` with its recipe's sampling settings (seed 0,
    class-balanced, EMA weights; with `verify`, checked against their recorded SHA-256), or
    reuse it when it is already there."""
    out = run_set_path(checkpoint, num)
    if out.is_file():
        on_batch(num)
        return out
    trained = load_for_sampling(checkpoint, verify=verify)
    settings = trained.recipe.sampler_settings()
    with torch.no_grad():
        write_run_sample_set(
            trained,
            settings,
            out,
            num=num,
            batch=batch,
            seed=0,
            ctx=distributed.Context(device=next(trained.model.parameters()).device),
            on_batch=on_batch,
        )
    return out
