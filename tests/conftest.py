"""Shared helpers: run the real `dfm` command in a subprocess, and a tiny recipe."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"


def run_dfm(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m dfm_cli ARGS` as a user would run it; returns the finished process.

    Only for tests marked `e2e` (see `require_e2e`)."""
    require_e2e(f"run_dfm{tuple(map(str, args))}")
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dfm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_torchrun(*args: object, port: int) -> None:
    """`dfm ARGS` under torchrun with two processes, its rendezvous at `port` plus a random
    offset (so that concurrent test runs do not collide); fails with the processes' stderr."""
    command = [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port + random.randint(0, 999)),
    ]
    proc = subprocess.run(
        [sys.executable, *command, "-m", "dfm_cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def tiny_flux(joint_attention_dim: int, guidance: bool = False, layers: int = 1) -> dict:
    """A FLUX transformer config small enough for a test (head 8 = RoPE axes 2 + 2 + 4)."""
    return dict(
        num_layers=layers, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def cli(*args: object, cwd: Path | None = None):
    """`dfm ARGS` in this process (typer's runner), from `cwd` when given: the quick way to
    check a command's exit code and one-line message."""
    from typer.testing import CliRunner

    from dfm_cli.cli import app

    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the tiny recipe, trained by the real command (so its users are e2e tests)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_dfm("train", TINY, "--out", run)
    return run


@pytest.fixture(scope="module")
def model():
    """A random `DFM-N/4` over a 2-level Laplacian pyramid of 16 px grey images, for sample sets."""
    from dfm_cli.models.dit import DFMDiT, model_size

    torch.manual_seed(0)
    sizes = [(8, 8), (16, 16)]
    m = DFMDiT(model_size("DFM-N/4"), sizes, channels=1, num_classes=10).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


# ----------------------------------------------------------------- the e2e marker, enforced
# Every test that runs the real `dfm` in a subprocess is marked `e2e`, so that
# `pytest -m "not e2e"` is the quick in-process loop. The item being set up, run or torn down
# is recorded here (module- and session-scoped fixtures run inside the setup of the first
# test that needs them, so they are checked against that test), and `run_dfm` plus an audit
# hook on every `subprocess.Popen` that would start `dfm`/`python -m dfm_cli`/torchrun refuse
# to run for a test without the marker.
_current_item: pytest.Item | None = None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    global _current_item
    _current_item = item
    try:
        return (yield)
    finally:
        _current_item = None


def require_e2e(what: str) -> None:
    """Fail clearly unless the test running now (or whose fixtures are being set up) is `e2e`."""
    item = _current_item
    if item is not None and item.get_closest_marker("e2e") is not None:
        return
    where = item.nodeid if item is not None else "outside any test (collection?)"
    raise AssertionError(
        f"{what} starts the real `dfm` in a subprocess, but {where} is not marked e2e: "
        "add @pytest.mark.e2e to the test (or to every test using the fixture that runs it), "
        "so that `pytest -m 'not e2e'` stays the quick in-process loop"
    )


def _starts_dfm(argv) -> bool:
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = [argv]
    words = [os.fsdecode(a) for a in argv]
    modules = {b for a, b in zip(words, words[1:]) if a == "-m"}  # python -m dfm_cli / torch.distributed.run
    return bool(
        (words and Path(words[0]).name in {"dfm", "torchrun"})
        or modules & {"dfm_cli", "torch.distributed.run", "torch.distributed.launch"}
    )


def _audit_dfm_subprocesses(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and _current_item is not None and _starts_dfm(args[1]):
        require_e2e(f"subprocess {args[1]!r}")


sys.addaudithook(_audit_dfm_subprocesses)


def pytest_collection_modifyitems(config, items):
    """Keep `slow` deselected under any -m that does not name it: a command-line -m replaces
    pyproject's `-m 'not slow'`, so `pytest -m "not e2e"` would otherwise run the slow tests.
    `-m slow` (or any expression naming slow) and an explicit `-m ""` still select them."""
    expr = config.option.markexpr
    if not expr or "slow" in expr:
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_dfm_cache(tmp_path_factory):
    """dfm's cache (saved reference features) in a folder of this test session, for the
    commands the tests run in-process and in subprocesses, never the user's ~/.cache/dfm.
    A test that looks at the cache sets DFM_CACHE (or --feature-cache) itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DFM_CACHE", str(tmp_path_factory.mktemp("dfm-cache")))
        yield


TINY_TEXT_CAPTIONS = {
    "red/0.png": "a red square",
    "red/1.png": "a small red square",
    "blue/0.png": "a blue square",
    "blue/1.png": "a big blue square",
}


def write_captioned_folder(root: Path) -> None:
    """Four 16 px images in class folders (red, blue) and `captions.csv` for them."""
    import numpy as np
    from PIL import Image

    for name, caption in TINY_TEXT_CAPTIONS.items():
        color = (200, 30, 30) if name.startswith("red") else (30, 30, 200)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(len(caption)).normal(0, 20, (16, 16, 3))
        Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(root / "images" / name)
    (root / "captions.csv").write_text("".join(f"{k},{v}\n" for k, v in TINY_TEXT_CAPTIONS.items()))


def write_tiny_clip(root: Path) -> tuple[Path, Path]:
    """A random open_clip model with a 32-wide text tower (pooled width 16): config JSON, weights."""
    import json

    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dfm-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "dfm-tiny-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("dfm-tiny-clip", pretrained=None).state_dict(), root / "clip.pt")
    return root / "dfm-tiny-clip.json", root / "clip.pt"


def write_tiny_t5(root: Path) -> Path:
    """A random T5 encoder (width 24) with a word-level tokenizer, as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "square", "small", "big"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root)
    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """A folder holding `tiny-text/`, what the text recipes (`recipes/tiny/flux.toml`,
    `recipes/tiny/flux_finetune.toml`) read relative to where `dfm` runs: a captioned image
    folder, a tiny CLIP and T5, a pixel store of the images with CLIP+T5 captions (8 tokens),
    and a random FLUX transformer folder sized for that store (12 = 3 channels x 2 x 2 in,
    T5's 24-wide tokens, CLIP's 16-wide pooled vector, guidance embedding on)."""
    from diffusers import FluxTransformer2DModel

    base = tmp_path_factory.mktemp("text")
    root = base / "tiny-text"
    write_captioned_folder(root)
    config, weights = write_tiny_clip(root)
    t5 = write_tiny_t5(root / "t5")
    run_dfm(
        "encode",
        root / "images",
        "--resolution",
        "16",
        "--captions",
        root / "captions.csv",
        "--text-encoder",
        "clip+t5",
        "--clip-model",
        config,
        "--clip-weights",
        weights,
        "--t5-weights",
        t5,
        "--text-tokens",
        "8",
        "--out",
        root / "store",
    )
    torch.manual_seed(0)
    FluxTransformer2DModel(patch_size=1, in_channels=12, **tiny_flux(24, guidance=True)).save_pretrained(root / "flux")
    return base


def write_tiny_kl(folder: Path) -> Path:
    """A random-config diffusers AutoencoderKL saved as a local folder (f = 2, 4 latent channels,
    SD-VAE's scaling factor 0.18215): 16 px images become SD-VAE-shaped 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder)
    return folder


def write_thousand_class_store(out: Path, kl: Path, num: int = 8) -> Path:
    """A latent store shaped like the authors' ImageNet latents at a tiny size: `num` random
    16 px images, ImageNet's 1,000 classes (labels spread over them), encoded by the tiny KL."""
    import numpy as np

    from dfm_cli import distributed
    from dfm_cli.data.autoencoders import build_autoencoder
    from dfm_cli.data.encode import EncodeSettings, EncodeSource, encode_store
    from dfm_cli.data.sources import Item

    class Thousand(EncodeSource):
        channels, class_names, digest = 3, tuple(f"class {i}" for i in range(1000)), ""

        def __len__(self) -> int:
            return num

        def __getitem__(self, i: int) -> Item:
            image = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            return Item(image, (i * 137) % 1000, f"thousand/{i}")

    ctx = distributed.init()
    try:
        encode_store(Thousand(), build_autoencoder("kl", kl), EncodeSettings("thousand", out, resolution=16), ctx)
    finally:
        distributed.shutdown(ctx)
    return out


ELIT_FIXTURES = ROOT / "tests" / "fixtures" / "elit"


@pytest.fixture(scope="session")
def tiny_elit(tmp_path_factory) -> Path:
    """A folder holding `tiny-elit/`, what `recipes/tiny/finetune_sit_xl2_512.toml` reads relative
    to where `dfm` runs: `kl/` (a tiny SD-VAE stand-in), `store/` (4x8x8 latents of 1,000
    classes), and the authors' tiny SiT and DFM-SiT fixtures imported by `dfm import elit`
    (`sit/`, `dfm/`) with that autoencoder as their decoder."""
    base = tmp_path_factory.mktemp("elit")
    root = base / "tiny-elit"
    kl = write_tiny_kl(root / "kl")
    write_thousand_class_store(root / "store", kl)
    for name, fixture in (("sit", "sit_tiny.pt"), ("dfm", "dfm_tiny.pt")):
        run_dfm("import", "elit", ELIT_FIXTURES / fixture, "--out", root / name, "--ae-weights", kl)
    return base
