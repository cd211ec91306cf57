"""`dfm eval`: load sample and reference sets, extract features, compute the metrics.

Sources (samples or reference):
- an `.npz` with `arr_0` (ADM layout: uint8 `N H W C`, or `N T H W C` for video), optionally
  with `mu`/`sigma` (Inception) and `mu_dinov2`/`sigma_dinov2` statistics, which are used
  when present; a statistics-only `.npz` (ADM's `VIRTUAL_imagenet*.npz`) serves FID/FDD;
- a folder of images (searched recursively, sorted);
- a built-in dataset name (`animal-mnist`), whose features are computed on first use and
  cached under `~/.cache/dfm/ref/`.

Without samples, `dfm eval` scores a run: `sampling.sample_set.run_sample_set` writes (or reuses) its evaluation
set in the run folder and `run_reference` loads the data it was trained on.

Thresholds on the results (`--max-fid`, …) are `gates.py`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfm_cli.data.datasets import BUILTIN, TensorImages, build_dataset, builtin
from dfm_cli.errors import DfmError, reading
from dfm_cli.evaluation import features as feats
from dfm_cli.evaluation import metrics
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
    cache_dir: Path | None = None  # where a dataset's features are cached


def cache_root() -> Path:
    return Path(os.environ.get("DFM_CACHE", Path.home() / ".cache" / "dfm"))


def content_cache(images: np.ndarray) -> Path:
    """Where the features of these exact images are cached: a sweep's reference `.npz` and a
    run's in-training reference with the same images share one set of features."""
    return cache_root() / "npz" / hashlib.sha1(images.tobytes()).hexdigest()[:16]


def load_source(spec: str, resolution: int | None = None) -> Source:
    """Read an `.npz`, an image folder or a dataset name (see the module docstring)."""
    if spec in BUILTIN:
        res = resolution or 32
        images = builtin(spec, res).raw_all()
        return Source(spec, images, cache_dir=cache_root() / "ref" / f"{spec}-{res}")
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            stats = {k: data[k] for k in data.files if k.startswith(("mu", "sigma"))}
            images = data["arr_0"] if "arr_0" in data.files else None
        if images is None and not stats:
            raise DfmError(f"{path}: has neither arr_0 (images) nor mu/sigma statistics")
        if images is not None and (images.dtype != np.uint8 or images.ndim not in (4, 5)):
            raise DfmError(f"{path}: arr_0 must be uint8 N H W C (or N T H W C), got {images.dtype} {images.shape}")
        # Features are cached by the images' content, so a reference .npz scored against many
        # sample sets (a sweep) runs its feature extractors once.
        return Source(spec, images, stats, cache_dir=content_cache(images) if images is not None else None)
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


def _frames(images: np.ndarray) -> np.ndarray:
    """Video clips `N T H W C` → frames `N·T H W C` (frame-FID); images pass through."""
    return images.reshape(-1, *images.shape[2:]) if images.ndim == 5 else images


class FeatureCache:
    """Features of one source per extractor, computed once (and cached on disk for datasets)."""

    def __init__(self, source: Source, batch: int, progress):
        self.source, self.batch, self.progress = source, batch, progress
        self.memory: dict[str, dict[str, np.ndarray]] = {}

    def get(self, extractor, key: str) -> dict[str, np.ndarray]:
        if key in self.memory:
            return self.memory[key]
        path = self.source.cache_dir / f"{key}.npz" if self.source.cache_dir else None
        if path is not None and path.is_file():
            with np.load(path) as data:
                self.memory[key] = {k: data[k] for k in data.files}
            return self.memory[key]
        images = self.source.images if extractor.name == "i3d" else _frames(self.source.images)
        task = self.progress.add_task(f"{extractor.name} {self.source.name}", total=len(images))
        out = feats.extract(extractor, images, self.batch, lambda n: self.progress.advance(task, n))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{path.name}")
            np.savez(tmp, **out)
            tmp.replace(path)
        self.memory[key] = out
        return out


def _weights_key(path: Path | None) -> str:
    if path is None:
        return "default"
    return hashlib.sha1(f"{Path(path).resolve()}:{Path(path).stat().st_size}".encode()).hexdigest()[:10]


def _stats(cache: FeatureCache, extractor, key: str, field_: str, suffix: str):
    """(mu, sigma) from precomputed `mu{suffix}`/`sigma{suffix}` when the source has them,
    else from its features."""
    mu_key, sigma_key = f"mu{suffix}", f"sigma{suffix}"
    if mu_key in cache.source.stats:
        return cache.source.stats[mu_key], cache.source.stats[sigma_key]
    if cache.source.images is None:
        raise DfmError(f"{cache.source.name} has no images and no {mu_key}/{sigma_key} statistics")
    return metrics.feature_statistics(cache.get(extractor, key)[field_])


def _frechet(samples: FeatureCache, ref: FeatureCache, extractor, key: str, field_: str, suffix: str) -> float:
    return metrics.frechet_distance(
        *_stats(samples, extractor, key, field_, suffix), *_stats(ref, extractor, key, field_, suffix)
    )


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


def evaluate(samples: Source, ref: Source | None, req: Request, progress) -> tuple[dict[str, float], list[str]]:
    """Compute the requested metrics; returns (results, warnings)."""
    if samples.images is None:
        raise DfmError(f"{samples.name}: the samples must hold images (arr_0), not only statistics")
    needs_ref = req.fid or req.kid or req.fdd or req.swd or req.fvd or req.pr
    if needs_ref and ref is None:
        raise DfmError(
            "--fid/--kid/--fdd/--swd/--fvd/--pr compare against a reference: pass --ref (a folder, an "
            f".npz or {', '.join(DATASETS)})"
        )
    for source in (samples, ref):
        for suffix in ("", "_dinov2", "_i3d"):
            if source is not None and (f"mu{suffix}" in source.stats) != (f"sigma{suffix}" in source.stats):
                have, lack = (f"mu{suffix}", f"sigma{suffix}")[:: 1 if f"mu{suffix}" in source.stats else -1]
                raise DfmError(f"{source.name}: has {have} but no {lack}; statistics need both (ADM layout)")
    warnings = sample_warnings(samples.images)
    if len(samples.images) < MIN_SAMPLES and (req.fid or req.fdd or req.fvd):
        warnings.append(
            f"only {len(samples.images)} samples: Fréchet distances are biased below {MIN_SAMPLES} "
            "(the paper uses 10k-50k); compare numbers only at equal counts"
        )
    if ref is not None and ref.images is not None and ref.images.shape[1:-1] != samples.images.shape[1:-1]:
        warnings.append(
            f"resolutions differ: samples {samples.images.shape[1:-1]} vs reference {ref.images.shape[1:-1]}"
        )
    video = samples.images.ndim == 5
    if (req.fvd) and not video:
        raise DfmError("--fvd needs video samples (arr_0 of shape N T H W C)")
    s_cache = FeatureCache(samples, req.batch, progress)
    r_cache = FeatureCache(ref, req.batch, progress) if ref is not None else None
    out: dict[str, float] = {"num_samples": float(len(samples.images))}

    if req.fid or req.kid or req.isc or req.pr:
        inception = feats.InceptionFeatures(req.inception_weights, req.device, req.fid_extractor)
        key = f"{req.fid_extractor}-{_weights_key(req.inception_weights)}"
        warnings += _nonfinite_warning("sample Inception", s_cache.get(inception, key)["pool"])
        if req.fid:
            out["frame_fid" if video else "fid"] = _frechet(s_cache, r_cache, inception, key, "pool", "")
        if req.kid:
            if r_cache.source.images is None:
                raise DfmError(f"--kid needs reference images; {ref.name} holds only statistics")
            out["kid"], out["kid_std"] = metrics.kid(
                s_cache.get(inception, key)["pool"], r_cache.get(inception, key)["pool"]
            )
        if req.isc:
            if not inception.has_logits:
                raise DfmError(
                    "IS needs Inception logits, which the fid-helper weights lack; pass torch-fidelity's "
                    f"{feats.TORCH_FIDELITY_FILE} with --inception-weights"
                )
            out["isc"], out["isc_std"] = metrics.inception_score(s_cache.get(inception, key)["logits"])
        if req.pr:
            if r_cache.source.images is None:
                raise DfmError(
                    f"--pr needs reference images (k-NN balls around each one); {ref.name} holds only statistics"
                )
            out["precision"], out["recall"] = metrics.precision_recall(
                r_cache.get(inception, key)["pool"], s_cache.get(inception, key)["pool"]
            )
    if req.fdd:
        dino = feats.DinoV2Features(req.dinov2_weights, req.device)
        out["fdd"] = _frechet(s_cache, r_cache, dino, f"dinov2-{_weights_key(req.dinov2_weights)}", "cls", "_dinov2")
    if req.swd:
        if ref.images is None:
            raise DfmError(f"--swd needs reference images; {ref.name} holds only statistics")
        out.update(metrics.swd(_frames(samples.images), _frames(ref.images), req.swd_levels))
    if req.clip:
        if req.captions is None:
            raise DfmError("--clip needs --captions FILE: one caption per line, in sample order")
        from dfm_cli.data.text_encoders import read_prompts

        captions, n = read_prompts(Path(req.captions)), len(samples.images)
        if n % len(captions):
            raise DfmError(
                f"{req.captions}: {len(captions)} captions for {n} samples; give one per sample, or the "
                "P prompts of `dfm sample --prompts` (sample i has prompt i mod P) when P divides the count"
            )
        captions = [captions[i % len(captions)] for i in range(n)]
        clip = feats.ClipFeatures(req.clip_model, req.clip_weights, req.device)
        image_f = s_cache.get(clip, f"clip-{_weights_key(req.clip_weights)}")["image"]
        text_f = np.concatenate([clip.text(captions[i : i + req.batch]) for i in range(0, len(captions), req.batch)])
        out["clip_score"] = metrics.clip_score(image_f, text_f)
    if req.fvd:
        i3d = feats.I3DFeatures(req.i3d_weights, req.device)
        out["fvd"] = _frechet(s_cache, r_cache, i3d, f"i3d-{_weights_key(req.i3d_weights)}", "i3d", "_i3d")
    return out, warnings


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


def _folder_key(dataset) -> str:
    """Changes whenever a file of the folder is added, removed, replaced or touched."""
    h = hashlib.sha1()
    for path, label in dataset.items:
        st = path.stat()
        h.update(f"{path}:{label}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


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
    with `limit`, that many evenly spaced over the whole set (a class-sorted set keeps every class)."""
    from dfm_cli.data.datasets import ImageFolder

    d = recipe.data
    if d.classes and d.name != "store":  # a class subset: its own images, cached by content
        images = reference_images(build_dataset(d.name, d.path, d.resolution, d.frames, classes=d.classes))
        source = Source(f"{d.name or d.path} (classes {d.classes})", images, cache_dir=content_cache(images))
    elif d.name == "sprites":  # clips at the run's own frame count, not dfm eval's default
        clips = build_dataset("sprites", "", d.resolution, d.frames).images
        source = Source(
            "sprites",
            clips.permute(0, 2, 3, 4, 1).numpy(),
            cache_dir=cache_root() / "ref" / f"sprites-{d.resolution}-{d.frames or 8}",
        )
    elif d.name in DATASETS:
        source = load_source(d.name, d.resolution)
    elif d.name == "folder":
        folder = ImageFolder(d.path, d.resolution)
        source = Source(
            d.path, folder.raw_all(), cache_dir=cache_root() / "ref" / f"folder-{d.resolution}-{_folder_key(folder)}"
        )
    else:
        from dfm_cli.data.store import INDEX

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
        source = Source(
            f"{source.name} ({limit} evenly spaced)",
            source.images[picks],
            cache_dir=source.cache_dir.with_name(f"{source.cache_dir.name}-n{limit}") if source.cache_dir else None,
        )
    return source


def reference_statistics(source: Source, req: Request, progress) -> dict[str, np.ndarray]:
    """ADM-layout statistics of a source: `mu`/`sigma` (Inception pool), plus DINOv2 with FDD."""
    cache = FeatureCache(source, req.batch, progress)
    inception = feats.InceptionFeatures(req.inception_weights, req.device, req.fid_extractor)
    key = f"{req.fid_extractor}-{_weights_key(req.inception_weights)}"
    mu, sigma = metrics.feature_statistics(cache.get(inception, key)["pool"])
    out = {"mu": mu, "sigma": sigma}
    if req.fdd:
        dino = feats.DinoV2Features(req.dinov2_weights, req.device)
        out["mu_dinov2"], out["sigma_dinov2"] = metrics.feature_statistics(
            cache.get(dino, f"dinov2-{_weights_key(req.dinov2_weights)}")["cls"]
        )
    return out
