"""Autoencoders behind one small interface: encode, decode, channels, factors, scale/shift.

- `pixel`: the identity, for the CPU and small images.
- `kl`: a diffusers `AutoencoderKL` (SD-VAE, the FLUX AE, …).
- `cogvideox`: a diffusers `AutoencoderKLCogVideoX` (video, `B C T H W`).

Weights load from a local folder (`config.json` plus weights, as `save_pretrained` writes
it) or from a hub repo id already in the local hub cache; nothing is downloaded. diffusers
is an optional extra: `pip install 'dfm-cli[diffusers]'`.

Latents are stored normalised, `(z - shift) * scale`, with the autoencoder's own
`scaling_factor`/`shift_factor`, and `encode` takes the posterior mean so that a store is a
deterministic function of its source. `config()` is written into every store and checkpoint
so that sampling can decode with the same autoencoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfm_cli.errors import DfmError, import_diffusers

KINDS = ("pixel", "kl", "cogvideox")


class PixelAE:
    """The identity: pixels in [-1, 1] are the latents."""

    name = "pixel"

    def __init__(self, channels: int = 3):
        self.latent_channels = channels
        self.spatial_factor, self.temporal_factor = 1, 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.latent_channels, *shape[1:])

    def config(self) -> dict[str, Any]:
        return {"name": "pixel", "channels": self.latent_channels}


class DiffusersAE:
    """A diffusers autoencoder with its scaling and shift; `video` for `B C T H W` models."""

    def __init__(self, name: str, weights: str, device: torch.device = torch.device("cpu")):
        diffusers = import_diffusers(f"--ae {name}")
        diffusers.utils.logging.set_verbosity_error()  # loading advice (accelerate) is noise to our users
        cls = diffusers.AutoencoderKLCogVideoX if name == "cogvideox" else diffusers.AutoencoderKL
        try:
            # safetensors only: a pickled .bin in a folder a user gives could run code on load
            vae = cls.from_pretrained(weights, local_files_only=True, use_safetensors=True)
            self.vae = vae.eval().requires_grad_(False).to(device)
        except (OSError, ValueError) as e:
            raise DfmError(
                f"--ae-weights {weights}: cannot load a {cls.__name__} from it offline "
                f"({str(e).splitlines()[0][:150]}); pass a folder written by save_pretrained "
                "(config.json + .safetensors weights) or a repo id already in the hub cache"
            ) from None
        local = Path(weights).expanduser()
        # a local folder is recorded absolute, so a store or run decodes from any working directory
        self.name, self.weights, self.device = name, str(local.resolve() if local.is_dir() else weights), device
        cfg = self.vae.config
        self.latent_channels = cfg.latent_channels
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.video = name == "cogvideox"
        self.temporal_factor = min(cfg.temporal_compression_ratio, self.spatial_factor) if self.video else 1
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x.to(self.device)).latent_dist.mean
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.device) / self.scale + self.shift).sample.clamp(-1, 1)

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`C [T] H W` of the latents for an input of shape `C [T] H W`."""
        *frames, h, w = shape[1:]
        if h % self.spatial_factor or w % self.spatial_factor:
            raise DfmError(f"resolution {h}x{w} is not divisible by the autoencoder's factor {self.spatial_factor}")
        t = [1 + (frames[0] - 1) // self.temporal_factor] if frames else []
        return (self.latent_channels, *t, h // self.spatial_factor, w // self.spatial_factor)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights,
            "scale": self.scale,
            "shift": self.shift,
            "spatial_factor": self.spatial_factor,
            "temporal_factor": self.temporal_factor,
        }


def build_autoencoder(
    name: str, weights: str | Path | None = None, channels: int = 3, device: torch.device = torch.device("cpu")
):
    """`--ae NAME [--ae-weights PATH]` → an autoencoder."""
    if name not in KINDS:
        raise DfmError(f"--ae {name!r}: choose one of {', '.join(KINDS)}")
    if name == "pixel":
        return PixelAE(channels)
    if weights is None:
        raise DfmError(
            f"--ae {name} needs --ae-weights: a local folder written by save_pretrained, or a hub "
            "repo id in the local cache (e.g. the FLUX AE's 'vae' subfolder)"
        )
    return DiffusersAE(name, str(weights), device)


def from_config(config: dict[str, Any], device: torch.device = torch.device("cpu")):
    """The autoencoder a store or checkpoint was made with."""
    if config["name"] == "pixel":
        return PixelAE(config["channels"])
    return DiffusersAE(config["name"], config["weights"], device)
