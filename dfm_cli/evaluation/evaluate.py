"""`dfm eval`: load sample and reference sets, extract features, compute the metrics.

Sources (samples or reference):
- an `.npz` with `arr_0` (ADM layout: uint8 `N H W C`, or `N T H W C` for video), optionally
  with `mu`/`sigma` (Inception) and `mu_dinov2`/`sigma_dinov2` statistics, which are used
  when present; a statistics-only `.npz` (ADM's `VIRTUAL_imagenet*.npz`) serves FID/FDD;
- a folder of images (searched recursively, sorted);
- a built-in dataset name (`animal-mnist`).

A reference's features are saved on first use in `Request.feature_cache`, keyed by its
images' content and the network (`reference_cache.py`): later evaluations against the same
images, from any command, read them instead of running the network.

Without samples, `dfm eval` scores a run: `sampling.sample_set.run_sample_set` writes (or reuses) its evaluation
set in the run folder and `run_reference` loads the data it was trained on.

Each metric is one entry of `METRICS`: the network whose features it reads, how it is
computed, the result keys it writes and its gates. Thresholds on the results (`--max-fid`,
…) are checked by `gates.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from dfm_cli.data.datasets import BUILTIN, ImageFolder, TensorImages, build_dataset, builtin
from dfm_cli.data.store import INDEX
from dfm_cli.data.text_encoders import read_prompts
from dfm_cli.errors import DfmError, reading
from dfm_cli.evaluation import features as feats
from dfm_cli.evaluation import metrics
from dfm_cli.evaluation.reference_cache import Entry, default_folder, describe
from dfm_cli.listing import IMAGE_EXTENSIONS, evenly_spaced, list_files
from dfm_cli.media import as_rgb, to_uint8

DATASETS = tuple(BUILTIN)
MIN_SAMPLES = 2048  # below this, FID-style covariances are rank-deficient and biased


@dataclass
class Source:
    """Images (or clips) and any precomputed statistics of one side of the comparison."""

    name: str
    images: np.ndarray | None
    stats: dict[str, np.ndarray] = field(default_factory=dict)


def load_source(spec: str, resolution: int | None = None) -> Source:
    """Read an `.npz`, an image folder or a dataset name (see the module docstring)."""
    images: np.ndarray | None
    if spec in BUILTIN:
        return Source(spec, builtin(spec, resolution or 32).raw_all())
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            stats = {k: data[k] for k in data.files if k.startswith(("mu", "sigma"))}
            images = data["arr_0"] if "arr_0" in data.files else None
        if images is None and not stats:
            raise DfmError(f"{path}: has neither arr_0 (images) nor mu/sigma statistics")
        if images is not None and (images.dtype != np.uint8 or images.ndim not in (4, 5)):
            raise DfmError(f"{path}: arr_0 must be uint8 N H W C (or N T H W C), got {images.dtype} {images.shape}")
        return Source(spec, images, stats)
    if path.is_dir():
        arrays = []
        for f, _ in list_files(path, IMAGE_EXTENSIONS, what="image folder").files:
            try:
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            except Exception as e:  # PIL raises many types for broken files
                raise DfmError(f"{f}: cannot read it as an image ({type(e).__name__}); remove or replace it") from None
        if len({a.shape for a in arrays}) > 1:
            raise DfmError(f"{path}: images differ in size; resize them to one resolution first")
        return Source(spec, np.stack(arrays))
    raise DfmError(f"{spec}: not an .npz file, an image folder or a dataset ({', '.join(DATASETS)})")


@dataclass
class Request:
    """What to compute, and where the weights are."""

    fid: bool = False
    kid: bool = False
    isc: bool = False
    fdd: bool = False
    swd: bool = False
    clip: bool = False
    fvd: bool = False
    pr: bool = False  # improved precision and recall, k = 3, Inception pool features
    inception_weights: Path | None = None
    dinov2_weights: Path | None = None
    clip_model: str = "ViT-L-14"
    clip_weights: Path | None = None
    captions: Path | None = None
    i3d_weights: Path | None = None
    swd_levels: int = 3
    batch: int = 50
    fid_extractor: str = "inception-v3-compat"  # any torch-fidelity registered extractor
    device: torch.device = torch.device("cpu")
    feature_cache: Path | None = field(default_factory=default_folder)  # None: the reference's are not saved


class Tasks(Protocol):
    """Where feature extraction reports its progress: rich's task API. `dfm eval` adapts the
    reporter of `dfm_cli.progress` to it; training passes a disabled rich `Progress`."""

    def add_task(self, description: str, *, total: float | None = ...) -> Any: ...

    def advance(self, task_id: Any, advance: float = ..., /) -> None: ...


class Extractor(Protocol):
    """A feature network of `features.py`: images (or clips) in, named feature arrays out;
    `identity()` is what its saved features are keyed by."""

    name: str

    def __call__(self, images: np.ndarray, /) -> dict[str, np.ndarray]: ...

    def identity(self) -> dict[str, Any]: ...


def _frames(images: np.ndarray) -> np.ndarray:
    """Video clips `N T H W C` → frames `N·T H W C` (frame-FID); images pass through."""
    return images.reshape(-1, *images.shape[2:]) if images.ndim == 5 else images


class FeatureCache:
    """Features of one source per extractor, computed once per evaluation. With a `folder` (a
    reference's), they are also saved there and read back by later evaluations of the same
    images with the same network (`reference_cache.py`); `warnings` says when that failed."""

    def __init__(self, source: Source, batch: int, progress: Tasks, folder: Path | None = None):
        self.source, self.batch, self.progress, self.folder = source, batch, progress, folder
        self.memory: dict[str, dict[str, np.ndarray]] = {}
        self.described: dict[tuple[int, ...], dict[str, Any]] = {}  # images (or frames) hashed once
        self.warnings: list[str] = []

    def get(self, extractor: Extractor, key: str) -> dict[str, np.ndarray]:
        if key in self.memory:
            return self.memory[key]
        if self.source.images is None:  # the metrics check this first, with a message naming their flag
            raise DfmError(f"{self.source.name} holds only statistics, no images to extract features from")
        images = self.source.images if extractor.name == "i3d" else _frames(self.source.images)
        entry = None
        if self.folder is not None:
            if images.shape not in self.described:
                self.described[images.shape] = describe(images)
            entry = Entry.of(self.folder, self.described[images.shape], extractor.identity())
            found, problem = entry.read()
            if problem:
                self.warnings.append(problem)
            if found is not None:
                self.memory[key] = found
                return found
        task = self.progress.add_task(f"{extractor.name} {self.source.name}", total=len(images))
        out = feats.extract(extractor, images, self.batch, lambda n: self.progress.advance(task, n))
        if entry is not None and (problem := entry.write(out)):
            self.warnings.append(problem)
        self.memory[key] = out
        return out


def sample_warnings(images: np.ndarray) -> list[str]:
    """What is visibly wrong with a sample set before any metric: constant images (a model
    with non-finite weights samples all black) or one image repeated."""
    flat = images.reshape(len(images), -1)
    constant = int((flat == flat[:, :1]).all(1).sum())
    out = []
    if constant:
        out.append(
            f"{constant} of {len(images)} samples are constant images (every pixel {int(flat[0, 0])} in the "
            "first): a model with non-finite weights samples these; the scores below mean little"
        )
    elif len(images) > 1 and (flat == flat[:1]).all():
        out.append(f"all {len(images)} samples are the same image")
    return out


def _nonfinite_warning(name: str, features: np.ndarray) -> list[str]:
    bad = int((~np.isfinite(features)).any(1).sum())
    return [f"{bad} of {len(features)} {name} feature vectors are not finite; the metrics are NaN"] if bad else []


# --------------------------------------------------------------------------- the metric registry


@dataclass(frozen=True)
class Network:
    """A feature network that metrics share: built once per `evaluate()`, its features kept
    under its name in `NETWORKS`. Its metrics are computed together, in `NETWORKS` order, right after the
    samples' features are extracted and checked (`check`: the field whose non-finite rows are
    warned about, named `label`)."""

    build: Callable[[Request], Extractor] | None  # None: the metrics read the pixels
    check: str = ""
    label: str = ""


NETWORKS: dict[str, Network] = {
    "inception": Network(
        lambda req: feats.InceptionFeatures(req.inception_weights, req.device, req.fid_extractor),
        check="pool",
        label="Inception",
    ),
    "dinov2": Network(lambda req: feats.DinoV2Features(req.dinov2_weights, req.device)),
    "pixels": Network(None),
    "clip": Network(lambda req: feats.ClipFeatures(req.clip_model, req.clip_weights, req.device)),
    "i3d": Network(lambda req: feats.I3DFeatures(req.i3d_weights, req.device)),
}


@dataclass
class Scoring:
    """What a metric is computed from: both sides' feature caches, the request, and the
    network of the metric being computed (built by `evaluate`)."""

    samples: FeatureCache
    ref: FeatureCache | None
    req: Request
    video: bool
    extractor: Extractor | None = None
    key: str = ""

    def features(self, side: FeatureCache, field_: str) -> np.ndarray:
        if self.extractor is None:
            raise TypeError("this metric has no feature network")  # a registry mistake, not the user's
        return side.get(self.extractor, self.key)[field_]

    def reference(self) -> FeatureCache:
        if self.ref is None:  # `evaluate` refused a metric that needs a reference before this
            raise DfmError("this metric compares against a reference: pass --ref")
        return self.ref

    def reference_with_images(self, missing: str) -> FeatureCache:
        """The reference, which must hold images; `missing` is the message otherwise ({} its name)."""
        ref = self.reference()
        if ref.source.images is None:
            raise DfmError(missing.format(ref.source.name))
        return ref

    def stats(self, side: FeatureCache, field_: str, suffix: str) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) from precomputed `mu{suffix}`/`sigma{suffix}` when the source has them,
        else from its features."""
        mu_key, sigma_key = f"mu{suffix}", f"sigma{suffix}"
        if mu_key in side.source.stats:
            return side.source.stats[mu_key], side.source.stats[sigma_key]
        if side.source.images is None:
            raise DfmError(f"{side.source.name} has no images and no {mu_key}/{sigma_key} statistics")
        return metrics.feature_statistics(self.features(side, field_))

    def frechet(self, field_: str, suffix: str) -> float:
        return metrics.frechet_distance(
            *self.stats(self.samples, field_, suffix), *self.stats(self.reference(), field_, suffix)
        )


def _fid(s: Scoring) -> dict[str, float]:
    return {"frame_fid" if s.video else "fid": s.frechet("pool", "")}


def _kid(s: Scoring) -> dict[str, float]:
    ref = s.reference_with_images("--kid needs reference images; {} holds only statistics")
    kid, kid_std = metrics.kid(s.features(s.samples, "pool"), s.features(ref, "pool"))
    return {"kid": kid, "kid_std": kid_std}


def _isc(s: Scoring) -> dict[str, float]:
    if not getattr(s.extractor, "has_logits", False):
        raise DfmError(
            "IS needs Inception logits, which the fid-helper weights lack; pass torch-fidelity's "
            f"{feats.TORCH_FIDELITY_FILE} with --inception-weights"
        )
    isc, isc_std = metrics.inception_score(s.features(s.samples, "logits"))
    return {"isc": isc, "isc_std": isc_std}


def _pr(s: Scoring) -> dict[str, float]:
    ref = s.reference_with_images("--pr needs reference images (k-NN balls around each one); {} holds only statistics")
    precision, recall = metrics.precision_recall(s.features(ref, "pool"), s.features(s.samples, "pool"))
    return {"precision": precision, "recall": recall}


def _fdd(s: Scoring) -> dict[str, float]:
    return {"fdd": s.frechet("cls", "_dinov2")}


def _swd(s: Scoring) -> dict[str, float]:
    ref = s.reference_with_images("--swd needs reference images; {} holds only statistics").source.images
    samples = s.samples.source.images
    assert samples is not None and ref is not None  # checked by `evaluate` and `reference_images`
    return metrics.swd(_frames(samples), _frames(ref), s.req.swd_levels)


def _captions(s: Scoring) -> list[str]:
    """One caption per sample from `--captions` (P prompts repeat when P divides the count)."""
    req, n = s.req, len(s.samples.source.images if s.samples.source.images is not None else ())
    if req.captions is None:
        raise DfmError("--clip needs --captions FILE: one caption per line, in sample order")
    captions = read_prompts(Path(req.captions))
    if n % len(captions):
        raise DfmError(
            f"{req.captions}: {len(captions)} captions for {n} samples; give one per sample, or the "
            "P prompts of `dfm sample --prompts` (sample i has prompt i mod P) when P divides the count"
        )
    return [captions[i % len(captions)] for i in range(n)]


def _clip(s: Scoring) -> dict[str, float]:
    captions = _captions(s)
    image_f = s.features(s.samples, "image")
    assert isinstance(s.extractor, feats.ClipFeatures)  # the "clip" network
    batch = s.req.batch
    text_f = np.concatenate([s.extractor.text(captions[i : i + batch]) for i in range(0, len(captions), batch)])
    return {"clip_score": metrics.clip_score(image_f, text_f)}


def _fvd(s: Scoring) -> dict[str, float]:
    return {"fvd": s.frechet("i3d", "_i3d")}


@dataclass(frozen=True)
class Gate:
    """A threshold flag on a metric's results: `--{direction}-{name}` reads `keys`."""

    direction: str  # "max" or "min"
    name: str
    keys: tuple[str, ...]

    @property
    def flag(self) -> str:
        return f"--{self.direction}-{self.name}"


@dataclass(frozen=True)
class Metric:
    """One metric of `dfm eval`: the `Request` field and flag `--{name}` that ask for it, the
    network whose features it reads, how it is computed, the result keys it writes and the
    gates on them. Adding a metric is one entry in `METRICS` (plus its typer flags)."""

    name: str
    network: str  # a key of NETWORKS
    compute: Callable[[Scoring], dict[str, float]]
    keys: tuple[str, ...]
    gates: tuple[Gate, ...] = ()
    needs_ref: bool = False
    frechet: bool = False  # a Fréchet distance: biased on few samples
    video_only: bool = False
    check: Callable[[Scoring], object] | None = None  # the user's inputs, before its network is built

    @property
    def flag(self) -> str:
        return f"--{self.name}"


# In the order of the gates and the "compare against a reference" message; computed grouped by network.
METRICS: tuple[Metric, ...] = (
    Metric("fid", "inception", _fid, ("fid", "frame_fid"), (Gate("max", "fid", ("fid", "frame_fid")),), True, True),
    Metric("kid", "inception", _kid, ("kid", "kid_std"), (Gate("max", "kid", ("kid",)),), True),
    Metric("fdd", "dinov2", _fdd, ("fdd",), (Gate("max", "fdd", ("fdd",)),), True, True),
    Metric("swd", "pixels", _swd, ("swd",), (Gate("max", "swd", ("swd",)),), True),
    Metric("fvd", "i3d", _fvd, ("fvd",), (Gate("max", "fvd", ("fvd",)),), True, True, video_only=True),
    Metric("isc", "inception", _isc, ("isc", "isc_std"), (Gate("min", "isc", ("isc",)),)),
    Metric("clip", "clip", _clip, ("clip_score",), (Gate("min", "clip", ("clip_score",)),), check=_captions),
    Metric(
        "pr",
        "inception",
        _pr,
        ("precision", "recall"),
        (Gate("min", "precision", ("precision",)), Gate("min", "recall", ("recall",))),
        True,
    ),
)


def computation_order(chosen: Sequence[Metric]) -> list[Metric]:
    """`chosen` grouped by network in `NETWORKS` order, so each network is built once and its
    metrics' results sit together.

    >>> [m.name for m in computation_order(METRICS)]
    ['fid', 'kid', 'isc', 'pr', 'fdd', 'swd', 'clip', 'fvd']
    """
    order = list(NETWORKS)
    return sorted(chosen, key=lambda m: order.index(m.network))


def requested(req: Request) -> list[Metric]:
    """The metrics `req` asks for, in computation order."""
    return computation_order([m for m in METRICS if getattr(req, m.name)])


def evaluate(samples: Source, ref: Source | None, req: Request, progress: Tasks) -> tuple[dict[str, float], list[str]]:
    """Compute the requested metrics; returns (results, warnings)."""
    if samples.images is None:
        raise DfmError(f"{samples.name}: the samples must hold images (arr_0), not only statistics")
    chosen = requested(req)
    if any(m.needs_ref for m in chosen) and ref is None:
        raise DfmError(
            f"{'/'.join(m.flag for m in METRICS if m.needs_ref)} compare against a reference: pass --ref (a folder, an "
            f".npz or {', '.join(DATASETS)})"
        )
    for source in (samples, ref):
        for suffix in ("", "_dinov2", "_i3d"):
            if source is not None and (f"mu{suffix}" in source.stats) != (f"sigma{suffix}" in source.stats):
                have, lack = (f"mu{suffix}", f"sigma{suffix}")[:: 1 if f"mu{suffix}" in source.stats else -1]
                raise DfmError(f"{source.name}: has {have} but no {lack}; statistics need both (ADM layout)")
    warnings = sample_warnings(samples.images)
    if len(samples.images) < MIN_SAMPLES and any(m.frechet for m in chosen):
        warnings.append(
            f"only {len(samples.images)} samples: Fréchet distances are biased below {MIN_SAMPLES} "
            "(the paper uses 10k-50k); compare numbers only at equal counts"
        )
    if ref is not None and ref.images is not None and ref.images.shape[1:-1] != samples.images.shape[1:-1]:
        warnings.append(
            f"resolutions differ: samples {samples.images.shape[1:-1]} vs reference {ref.images.shape[1:-1]}"
        )
    video = samples.images.ndim == 5
    for metric in chosen:
        if metric.video_only and not video:
            raise DfmError(f"{metric.flag} needs video samples (arr_0 of shape N T H W C)")
    scoring = Scoring(
        FeatureCache(samples, req.batch, progress),  # samples are new every time: never saved
        FeatureCache(ref, req.batch, progress, req.feature_cache) if ref is not None else None,
        req,
        video,
    )
    out: dict[str, float] = {"num_samples": float(len(samples.images))}
    built = None
    for metric in chosen:
        if metric.check is not None:
            metric.check(scoring)
        if metric.network != built:  # `chosen` is grouped by network: each is built once
            built, network = metric.network, NETWORKS[metric.network]
            scoring.extractor = network.build(req) if network.build is not None else None
            scoring.key = metric.network
            if network.check:
                warnings += _nonfinite_warning(
                    f"sample {network.label}", scoring.features(scoring.samples, network.check)
                )
        out.update(metric.compute(scoring))
    return out, warnings + (scoring.ref.warnings if scoring.ref is not None else [])


# --------------------------------------------------------------------------- scoring a run

CPU_EVAL_NUM = 500  # with a 500-image reference, about 5 minutes on 2 CPU cores (below)
CUDA_EVAL_NUM = 10_000  # the paper reports FID on 50k; 10k keeps a CI gate to minutes on one GPU


def default_eval_num(device: torch.device) -> int:
    """Samples `dfm eval` generates for a run when `--num` is not given, and (on the CPU) the
    size of the evenly spaced subset of the training data it compares them with.

    On 2 CPU cores Inception costs about half a CPU-second per image, so the 10,000-image
    animal-mnist reference alone would take over an hour the first time; 500 samples (about
    a minute to generate for the quickstart model) against 500 training images take about
    5 minutes in all. FID from so few images is biased upwards: compare it only with FIDs
    measured at the same counts, or ask for more with --num.
    """
    return CUDA_EVAL_NUM if device.type == "cuda" else CPU_EVAL_NUM


REFERENCE_MAX = 10_000  # reference images for FID; a folder dataset is read with this stride


def reference_images(dataset, num: int = 0) -> np.ndarray:
    """Training images as uint8 RGB `N H W 3`: `num` evenly spaced ones (a class-sorted set keeps
    every class), or up to `REFERENCE_MAX` when `num` is 0."""
    n = len(dataset)
    pick = evenly_spaced(n, num or REFERENCE_MAX)
    if isinstance(dataset, TensorImages):
        images = dataset.images[torch.from_numpy(pick)].movedim(1, -1).numpy()
    else:
        images = to_uint8(torch.stack([dataset[int(i)][0] for i in pick]))
    return as_rgb(images)


def run_reference(recipe, run: Path, limit: int = 0) -> Source:
    """The images `run` was trained on, at its resolution (grey repeated to RGB, as samples are);
    with `limit`, that many evenly spaced over the whole set (a class-sorted set keeps every class).
    Its features are saved by content, so in-training evaluation and `dfm eval` share them."""
    d = recipe.data
    if d.classes and d.name != "store":  # a class subset: its own images
        images = reference_images(build_dataset(d.name, d.path, d.resolution, d.frames, classes=d.classes))
        source = Source(f"{d.name or d.path} (classes {d.classes})", images)
    elif d.name == "sprites":  # clips at the run's own frame count, not dfm eval's default
        sprites = build_dataset("sprites", "", d.resolution, d.frames)
        assert isinstance(sprites, TensorImages)  # built-in clips are held in memory
        clips = sprites.images
        source = Source("sprites", clips.permute(0, 2, 3, 4, 1).numpy())
    elif d.name in DATASETS:
        source = load_source(d.name, d.resolution)
    elif d.name == "folder":
        source = Source(d.path, ImageFolder(d.path, d.resolution).raw_all())
    else:
        index = Path(d.path) / INDEX
        with reading(index, "store index"):
            meta = json.loads(index.read_text())
        raise DfmError(
            f"{run} was trained on the latent store {d.path}, and FID compares pixels: pass the images "
            f"it was encoded from ({meta.get('source', 'its source folder')} at {meta.get('resolution')} "
            "px) with --ref, or their statistics (`dfm eval FOLDER --stats-out ref.npz`, then --ref ref.npz)"
        )
    if source.images is not None:
        source.images = as_rgb(source.images)
    if limit and source.images is not None and len(source.images) > limit:
        picks = evenly_spaced(len(source.images), limit)
        source = Source(f"{source.name} ({limit} evenly spaced)", source.images[picks])
    return source


def reference_statistics(source: Source, req: Request, progress: Tasks) -> tuple[dict[str, np.ndarray], list[str]]:
    """ADM-layout statistics of a source, to be a reference: `mu`/`sigma` (Inception pool),
    plus DINOv2 with FDD; its features are saved in `req.feature_cache`. Returns (statistics, warnings)."""
    cache = FeatureCache(source, req.batch, progress, req.feature_cache)
    wanted = [("inception", "pool", "")] + ([("dinov2", "cls", "_dinov2")] if req.fdd else [])
    out: dict[str, np.ndarray] = {}
    for name, field_, suffix in wanted:
        network = NETWORKS[name]
        assert network.build is not None  # a feature network, not the pixels
        features = cache.get(network.build(req), name)[field_]
        out[f"mu{suffix}"], out[f"sigma{suffix}"] = metrics.feature_statistics(features)
    return out, cache.warnings
