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

Outputs:
- `NAME.npz`: ADM layout, `arr_0` uint8 `N H W 3` (video: `N T H W 3`), `arr_1` the labels,
  and `manifest` (JSON text). While it is being made, parts live in `NAME.npz.parts/`.
- a folder: `000000.png`, `000001.png`, … and `manifest.json` (images only; grey stays grey).

The two are `NpzSetWriter` and `FolderSetWriter`, chosen once from the name of `out`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from dfm_cli import distributed
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.text_encoders import Prompts
from dfm_cli.errors import DfmError
from dfm_cli.media import as_rgb, to_uint8
from dfm_cli.method.cond import Cond
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.sampler import (
    LevelModel,
    SampleResult,
    SamplerSettings,
    class_balanced_labels,
    generate,
    sampled_classes,
)
from dfm_cli.sampling.runs import TrainedRun, load_for_sampling

MANIFEST = "manifest.json"
_PNG = re.compile(r"^(\d{6})\.png$")
_PART = re.compile(r"^part-(\d{9})-(\d{9})\.npz$")


def weights_digest(path: Path) -> str:
    """SHA-256 of a weights file: what identifies the model in a sample set's manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def manifest_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The keys (besides `num`, which may grow or shrink) whose values differ, as one phrase.

    >>> manifest_difference({"seed": 0, "cfg": 1.5, "num": 8}, {"seed": 1, "cfg": 1.5, "num": 9})
    'seed 0 → 1'
    """

    def show(v: Any) -> str:
        text = json.dumps(v)
        return text[:14] + "…" if len(text) > 16 else text

    keys = sorted((old.keys() | new.keys()) - {"num"})
    return ", ".join(f"{k} {show(old.get(k))} → {show(new.get(k))}" for k in keys if old.get(k) != new.get(k))


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
        and np.array_equal(labels, class_balanced_labels(last, classes)[first:].numpy())
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
    def finish(self, plan: Sequence[tuple[int, int]]) -> None:
        """Rank 0, after every batch of `plan` was appended."""

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
    """An ADM `.npz`, made from verified part files in `NAME.npz.parts/` and written at the end."""

    def __init__(self, out: Path, shape: tuple[int, ...], want: dict[str, Any], classes: int | Sequence[int]):
        super().__init__(out, shape, want, classes)
        self.work = out.with_name(out.name + ".parts")
        self.held: dict[str, np.ndarray] | None = None  # a finished, verified set already at `out`

    @staticmethod
    def sample_shape(out: Path, raw: tuple[int, ...]) -> tuple[int, ...]:
        return (*raw[:-1], 3)  # ADM layout: grey becomes RGB

    def open(self) -> str:
        self.refuse_other_kind(folder=False)
        problems = []
        if self.out.exists():
            arrays = _load_npz(self.out)
            old = json.loads(str(arrays["manifest"])) if arrays and "manifest" in arrays else None
            if arrays is None or old is None:
                problems.append("the file there has no sample-set manifest (another tool or an older dfm wrote it)")
            elif diff := manifest_difference(old, self.want):
                problems.append(f"holds samples made with other settings ({diff})")
            elif _good_rows(arrays, 0, len(arrays["arr_0"]), self.shape, self.classes):
                self.held = arrays
        if problem := self.work_problem("its unfinished parts were"):
            problems.append(problem)
        if problems:  # the set starts over (or is refused): nothing held counts
            self.held = None
        self.kept = 0 if self.held is None else min(len(self.held["arr_0"]), self.num)
        return "; ".join(problems)

    def resume(self, start_over: bool) -> None:
        if start_over:
            self.out.unlink(missing_ok=True)
            shutil.rmtree(self.work, ignore_errors=True)
        if self.held is not None and len(self.held["arr_0"]) >= self.num:  # shrink, or nothing to do
            if len(self.held["arr_0"]) > self.num:
                _write_npz(self.out, self.held["arr_0"][: self.num], self.held["arr_1"][: self.num], self.want)
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            self.write_manifest()

    def part(self, first: int, last: int) -> Path:
        return self.work / f"part-{first:09d}-{last:09d}.npz"

    def append(self, first: int, last: int, sample: Callable[[], np.ndarray]) -> None:
        target = self.part(first, last)
        if _good_rows(_load_npz(target) if target.exists() else None, first, last, self.shape, self.classes):
            return
        images = as_rgb(sample())
        labels = class_balanced_labels(last, self.classes)[first:].numpy()
        _atomic_save(target, lambda p: np.savez(p, arr_0=images, arr_1=labels))

    def finish(self, plan: Sequence[tuple[int, int]]) -> None:
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        if self.held is not None and self.kept:
            images.append(self.held["arr_0"][: self.kept])
            labels.append(self.held["arr_1"][: self.kept])
        for first, last in plan:
            part = _load_npz(self.part(first, last))
            if part is None or not _good_rows(part, first, last, self.shape, self.classes):
                raise DfmError(f"{self.work}: part {first}..{last - 1} changed while sampling; run the command again")
            images.append(part["arr_0"])
            labels.append(part["arr_1"])
        _write_npz(self.out, np.concatenate(images), np.concatenate(labels), self.want)
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

    def finish(self, plan: Sequence[tuple[int, int]]) -> None:
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
    """
    if num < 1 or batch < 1:
        raise DfmError(f"--num {num} --batch {batch}: both must be at least 1")
    device = next(model.parameters()).device
    sized = cast(LevelModel, model)  # what every method's network keeps
    probe = decode(torch.zeros(1, sized.channels, *sized.level_sizes[-1], device=device))
    kind = SetWriter.for_path(out)
    shape = kind.sample_shape(out, tuple(to_uint8(probe).shape[1:]))
    writer = kind(out, shape, set_manifest(settings, seed=seed, num=num, shape=shape, source=source), classes)
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
    plan = [(a, min(a + batch, num)) for a in range(writer.kept, num, batch)]
    for first, last in plan[ctx.rank :: ctx.world]:
        labels = class_balanced_labels(last, classes)[first:]

        def sample(labels: torch.Tensor = labels, first: int = first) -> np.ndarray:
            result = generate(model, condition(labels), decomposition, settings, seed=seed, first_index=first)
            return to_uint8(decode(result.x))

        writer.append(first, last, sample)
        on_batch(last - first)
    distributed.barrier(ctx)
    if ctx.main:
        writer.finish(plan)
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
    source = {"checkpoint": weights_digest(trained.weights), "ema": trained.ema, "autoencoder": info.autoencoder}
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


def _write_npz(out: Path, images: np.ndarray, labels: np.ndarray, manifest: dict[str, Any]) -> None:
    _atomic_save(out, lambda p: np.savez(p, arr_0=images, arr_1=labels, manifest=np.array(json.dumps(manifest))))


def run_set_path(checkpoint: Path, num: int) -> Path:
    """`RUN/eval/samples-<num>-step-<9 digits>.npz`: one set per checkpoint, so more training
    never reuses a stale set.

    >>> run_set_path(Path("runs/q/checkpoints/step-000001500"), 1000).as_posix()
    'runs/q/eval/samples-1000-step-000001500.npz'
    """
    return checkpoint.parent.parent / "eval" / f"samples-{num}-{checkpoint.name}.npz"


def run_sample_set(checkpoint: Path, num: int, batch: int, on_batch=lambda n: None) -> Path:
    """Write the evaluation set of `checkpoint` with its recipe's sampling settings (seed 0,
    class-balanced, EMA weights), or reuse it when it is already there."""
    out = run_set_path(checkpoint, num)
    if out.is_file():
        on_batch(num)
        return out
    trained = load_for_sampling(checkpoint)
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
