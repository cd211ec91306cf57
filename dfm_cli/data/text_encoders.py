"""Caption encoders for text conditioning, from local weights only.

- `clip`: an open_clip text tower (its tokenizer ships with open_clip, so nothing is fetched).
  Tokens are the final-layer hidden states, pooled is the projected end-of-text token.
- `t5`: a transformers T5 encoder folder (`config.json`, weights, tokenizer files). Tokens are
  the last hidden states, pooled is their mean over real tokens. Needs `pip install "dfm-cli[t5]"`.
- `clip+t5`: FLUX's pairing, tokens from T5 and pooled from CLIP.

`dfm encode --captions` runs the encoder once per caption and stores the result beside the
latents; `dfm sample --prompt` runs the same encoder (recorded in the run) on the prompts.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, cast

import torch

from dfm_cli.errors import DfmError, reading
from dfm_cli.method.cond import TextCond

ENCODERS = ("clip", "t5", "clip+t5")


@dataclass(frozen=True)
class TextSettings:
    """Which caption encoder, from which local files; recorded in the store and the run."""

    encoder: str
    clip_model: str = "ViT-L-14"
    clip_weights: str = ""
    t5_weights: str = ""
    max_tokens: int = 77

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise DfmError(f"--text-encoder {self.encoder!r}: choose one of {', '.join(ENCODERS)}")
        if "clip" in self.encoder and not self.clip_weights:
            raise DfmError(
                f"--text-encoder {self.encoder} needs --clip-weights PATH: an open_clip checkpoint "
                "(e.g. ViT-L-14's open_clip_pytorch_model.bin) with --clip-model NAME or config JSON"
            )
        if "t5" in self.encoder and not self.t5_weights:
            raise DfmError(
                f"--text-encoder {self.encoder} needs --t5-weights DIR: a local transformers folder with "
                "a T5 encoder and its tokenizer (e.g. FLUX.1-dev's text_encoder_2 and tokenizer_2 merged)"
            )
        if self.max_tokens < 1:
            raise DfmError(f"--text-tokens {self.max_tokens}: must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


class _ClipText(Protocol):
    """What `TextEncoder` reads of an open_clip `CLIP` model (open_clip ships no type information)."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    attn_mask: torch.Tensor
    text_projection: torch.Tensor | torch.nn.Linear


class TextEncoder:
    """Captions → `TextCond` (float32, on the CPU), with `dims = (max_tokens, token_dim, pooled_dim)`."""

    def __init__(self, settings: TextSettings, device: torch.device) -> None:
        self.settings, self.device = settings, device
        self.clip: torch.nn.Module | None = None
        self.t5: torch.nn.Module | None = None
        if "clip" in settings.encoder:
            from dfm_cli.data.weights import load_open_clip

            clip, self.clip_tokenizer = load_open_clip(settings.clip_model, Path(settings.clip_weights), "--clip-model")
            self.clip = clip.to(device)
            if settings.encoder == "clip":
                positions = cast(_ClipText, self.clip).positional_embedding.shape[0]
                if settings.max_tokens > positions:
                    raise DfmError(f"--text-tokens {settings.max_tokens}: CLIP reads at most {positions} tokens")
        if "t5" in settings.encoder:
            self.t5, self.t5_tokenizer = _load_t5(Path(settings.t5_weights))
            self.t5 = self.t5.to(device)
        probe = self([""])
        self.dims = (settings.max_tokens, probe.tokens.shape[-1], probe.pooled.shape[-1])

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> TextCond:
        clip = self._clip(captions) if self.clip is not None else None
        t5 = self._t5(captions) if self.t5 is not None else None
        if clip is not None and t5 is not None:
            return TextCond(t5.tokens, t5.mask, clip.pooled)
        return cast(TextCond, clip or t5)  # `TextSettings` asks for CLIP or T5 or both, so one ran

    def _clip(self, captions: list[str]) -> TextCond:
        assert self.clip is not None  # called only with a CLIP encoder
        net = cast(_ClipText, self.clip)
        text = self.clip_tokenizer(captions).to(self.device)
        x = net.token_embedding(text) + net.positional_embedding
        x = net.ln_final(net.transformer(x, attn_mask=net.attn_mask))
        # the end token has the largest id (open_clip's own pooling); causal attention makes
        # keeping only the first max_tokens hidden states exact
        pooled = x[torch.arange(len(text)), text.argmax(dim=-1)]
        pooled = (
            net.text_projection(pooled)
            if isinstance(net.text_projection, torch.nn.Linear)
            else pooled @ net.text_projection
        )
        n = self.settings.max_tokens
        return TextCond(x[:, :n].float().cpu(), (text[:, :n] != 0).cpu(), pooled.float().cpu())

    def _t5(self, captions: list[str]) -> TextCond:
        assert self.t5 is not None  # called only with a T5 encoder
        batch = self.t5_tokenizer(
            captions, padding="max_length", max_length=self.settings.max_tokens, truncation=True, return_tensors="pt"
        ).to(self.device)
        tokens = self.t5(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.float()
        mask = batch.attention_mask.bool()
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextCond(tokens.cpu(), mask.cpu(), pooled.cpu())


def _load_t5(folder: Path):
    try:
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError:
        raise DfmError('the T5 text encoder needs transformers: pip install "dfm-cli[t5]"') from None
    if not (folder / "config.json").is_file():
        raise DfmError(
            f"--t5-weights {folder}: no config.json there; pass a local transformers folder holding a "
            "T5 encoder (config.json, model.safetensors) and its tokenizer files"
        )
    try:
        # safetensors only (no pickle), and never the network: the folder is the user's
        model = T5EncoderModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DfmError(
            f"--t5-weights {folder}: not a readable T5 encoder with tokenizer ({str(e).splitlines()[0][:160]})"
        ) from None


def read_captions(path: Path) -> dict[str, str]:
    """Captions by file path (relative to the source folder): a CSV with `path,caption`
    columns (a header row naming them is optional) or JSONL with `path` and `caption` keys."""
    if not path.is_file():
        raise DfmError(
            f'--captions {path}: not found; pass a CSV (path,caption) or JSONL ({{"path": ..., "caption": ...}}) file'
        )
    out: dict[str, str] = {}
    with reading(path, "captions file (UTF-8)"):
        text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["path"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DfmError(f"{path} line {n}: expected a JSON object with 'path' and 'caption'") from None
        return out
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "caption"]):
            continue
        if len(row) < 2:
            raise DfmError(f"{path} line {n}: expected 'path,caption' (quote captions that contain commas)")
        out[row[0].strip()] = ",".join(row[1:]).strip()
    return out


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    if not path.is_file():
        raise DfmError(f"--prompts {path}: not found; pass a text file with one prompt per line")
    with reading(path, "prompts file (UTF-8)"):
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DfmError(f"--prompts {path}: holds no prompt (one per line)")
    return prompts


class Captioner:
    """Each source item's caption, encoded: `dfm encode --captions` calls it on a batch of
    item names (file paths), which it looks up relative to the source folder."""

    def __init__(self, captions: Path, root: Path, encoder: TextEncoder) -> None:
        self.table, self.root, self.encoder = read_captions(Path(captions)), Path(root).resolve(), encoder
        self.file = captions

    @property
    def settings(self) -> TextSettings:
        return self.encoder.settings

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.encoder.dims

    def key(self, name: str) -> str:
        try:
            return Path(name).resolve().relative_to(self.root).as_posix()
        except ValueError:  # not under the source folder: look it up as written
            return name

    def check(self, names: list[str]) -> None:
        """Every item needs a caption: refuse before any work starts, naming a few that lack one."""
        missing = [self.key(n) for n in names if self.key(n) not in self.table]
        if missing:
            raise DfmError(
                f"--captions {self.file}: {len(missing)} of {len(names)} files have no caption, e.g. "
                f"{', '.join(missing[:3])}; add a 'path,caption' line for each (paths relative to "
                f"{self.root})"
            )

    def __call__(self, names: list[str]) -> TextCond:
        return self.encoder([self.table[self.key(n)] for n in names])

    def null(self) -> TextCond:
        return self.encoder([""])


@dataclass
class Prompts:
    """Prompts for `dfm sample`, encoded once with the run's own caption encoder."""

    texts: list[str]
    encoded: TextCond
    digest: str

    @classmethod
    def encode(cls, texts: list[str], text_record: dict, device: torch.device) -> Prompts:
        import hashlib

        settings = TextSettings(**{k: v for k, v in text_record.items() if k != "dims"})
        encoded = TextEncoder(settings, device)(texts)
        return cls(texts, encoded, hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16])

    def condition(self, indices: torch.Tensor) -> TextCond:
        """The encoded prompts at `indices` (sample i of a set has prompt `i % len(texts)`)."""
        return self.encoded[indices.cpu()]
