"""Text conditioning: caption encoders, captions in the store, the text-conditioned DiT,
caption dropout and CFG with the empty caption, and `dfm sample --prompt` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_TEXT_CAPTIONS, run_dfm, write_captioned_folder, write_tiny_clip, write_tiny_t5

from dfm_cli.data.text_encoders import Captioner, TextEncoder, TextSettings, read_captions
from dfm_cli.errors import DfmError
from dfm_cli.method.cond import TextCond, cat_cond, where_dropped
from dfm_cli.method.sampler import GuidedVelocity
from dfm_cli.models.dit import DFMDiT, model_size

CAPTIONS = TINY_TEXT_CAPTIONS


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """The tiny random CLIP's config and weights, and the model itself for reference outputs."""
    import open_clip

    config, weights = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    net = open_clip.create_model("dfm-tiny-clip", pretrained=None)
    net.load_state_dict(torch.load(weights))
    return config, weights, net.eval()


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


def clip_settings(tiny_clip, tokens: int = 8) -> TextSettings:
    config, weights, _ = tiny_clip
    return TextSettings("clip", str(config), str(weights), max_tokens=tokens)


def test_clip_encoder_matches_open_clip_and_masks_padding(tiny_clip):
    import open_clip

    enc = TextEncoder(clip_settings(tiny_clip), torch.device("cpu"))
    cond = enc(["a cat", "a photo of a dog on the grass"])
    assert enc.dims == (8, 32, 16) and cond.tokens.shape == (2, 8, 32) and cond.pooled.shape == (2, 16)
    # pooled is open_clip's own text embedding; the mask marks start, words and end (a cat: 4 tokens)
    with torch.no_grad():
        ref = tiny_clip[2].encode_text(open_clip.get_tokenizer("dfm-tiny-clip")(["a cat"]))
    torch.testing.assert_close(cond.pooled[:1], ref, atol=1e-5, rtol=1e-5)
    assert cond.mask[0].tolist() == [True] * 4 + [False] * 4 and bool(cond.mask[1].all())


def test_t5_encoder_pools_over_real_tokens_and_clip_t5_pairs_them(tiny_clip, tiny_t5):
    t5 = TextEncoder(TextSettings("t5", t5_weights=str(tiny_t5), max_tokens=6), torch.device("cpu"))
    cond = t5(["a red square", "big"])
    assert cond.mask.sum(1).tolist() == [3, 1]
    torch.testing.assert_close(cond.pooled[1], cond.tokens[1, 0])
    torch.testing.assert_close(cond.pooled[0], cond.tokens[0, :3].mean(0))
    both = TextEncoder(
        TextSettings("clip+t5", str(tiny_clip[0]), str(tiny_clip[1]), str(tiny_t5), 6), torch.device("cpu")
    )
    pair = both(["a red square"])
    clip = TextEncoder(clip_settings(tiny_clip), torch.device("cpu"))(["a red square"])
    torch.testing.assert_close(pair.tokens, cond.tokens[:1])
    torch.testing.assert_close(pair.pooled, clip.pooled)
    assert both.dims == (6, 24, 16)


def test_encoder_settings_and_caption_files_fail_clearly(tmp_path, tiny_clip):
    with pytest.raises(DfmError, match="--clip-weights"):
        TextSettings("clip")
    with pytest.raises(DfmError, match="--t5-weights"):
        TextSettings("t5")
    with pytest.raises(DfmError, match="choose one of"):
        TextSettings("bert")
    with pytest.raises(DfmError, match="no config.json"):
        TextEncoder(TextSettings("t5", t5_weights=str(tmp_path)), torch.device("cpu"))
    (tmp_path / "c.csv").write_text('path,caption\na.png,"a cat, sitting"\nb.png,a dog\n')
    assert read_captions(tmp_path / "c.csv") == {"a.png": "a cat, sitting", "b.png": "a dog"}
    (tmp_path / "c.jsonl").write_text('{"path": "a.png", "caption": "a cat"}\n\n{"path": "b.png"}\n')
    with pytest.raises(DfmError, match="line 3"):
        read_captions(tmp_path / "c.jsonl")
    enc = TextEncoder(clip_settings(tiny_clip), torch.device("cpu"))
    with pytest.raises(DfmError, match="1 of 2 files have no caption, e.g. c.png"):
        Captioner(tmp_path / "c.csv", tmp_path, enc).check([str(tmp_path / "a.png"), str(tmp_path / "c.png")])


def text_model(**kw) -> DFMDiT:
    return DFMDiT(model_size("DFM-N/4"), [(8, 8), (16, 16)], 3, 0, text_dims=(5, 12, 7), **kw)


def random_text(n: int, length: int = 5, seed: int = 0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (n, 1), generator=g)
    return TextCond(torch.randn(n, length, 12, generator=g), mask, torch.randn(n, 7, generator=g))


@torch.no_grad()
def test_text_model_listens_to_the_caption_and_ignores_padding():
    model = text_model()
    for p in model.parameters():  # zero-inits would hide the text path
        p.normal_(0, 0.2)
    xs = [torch.randn(3, 3, 8, 8), torch.zeros(3, 3, 16, 16)]
    t, stage = torch.full((3, 2), 0.4), torch.zeros(3, dtype=torch.long)
    y = random_text(3)
    base = model(xs, t, y, stage)
    padded = TextCond(torch.where(y.mask[..., None], y.tokens, torch.randn_like(y.tokens)), y.mask, y.pooled)
    for a, b in zip(base, model(xs, t, padded, stage)):
        torch.testing.assert_close(a, b)  # what sits under the mask is never read
    other = model(xs, t, random_text(3, seed=1), stage)
    assert (base[0] - other[0]).abs().max() > 1e-3  # another caption, another velocity


def test_caption_dropout_and_cfg_use_the_empty_caption():
    model = text_model()
    null = TextCond(torch.randn(1, 5, 12), torch.tensor([[True, False, False, False, False]]), torch.randn(1, 7))
    model.null_text.set(null)
    y = random_text(4)
    dropped = where_dropped(torch.tensor([True, False, True, False]), model.null_condition(4), y)
    torch.testing.assert_close(dropped.tokens[0], null.tokens[0])
    torch.testing.assert_close(dropped.pooled[1], y.pooled[1])
    assert dropped.mask[2].tolist() == null.mask[0].tolist()
    seen = []

    def spy(xs, t, cond, stage):
        seen.append(cond)
        return [torch.ones_like(x) * cond.pooled[:, :1, None, None] for x in xs]

    xs, t = [torch.zeros(4, 3, 8, 8)], torch.full((4, 1), 0.5)
    out = GuidedVelocity(spy, 2.0, model.null_condition)(xs, t, y, torch.zeros(4, dtype=torch.long))
    both = seen[0]
    torch.testing.assert_close(both.pooled, cat_cond([y, model.null_condition(4)]).pooled)
    want = null.pooled[0, 0] + 2.0 * (y.pooled[:, 0] - null.pooled[0, 0])
    torch.testing.assert_close(out[0][:, 0, 0, 0], want)


def test_null_text_is_kept_in_the_checkpoint_state():
    model = text_model()
    null = random_text(1, seed=3)
    model.null_text.set(null)
    again = text_model()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.null_condition(2).tokens[1], null.tokens[0])


@pytest.mark.e2e
def test_captions_to_store_to_train_to_prompted_samples(tmp_path, tiny_clip):
    """The CLI path: encode captions into a store, train 2 steps on it, sample from a prompt."""
    from dfm_cli.data.store import LatentStore

    config, weights, _ = tiny_clip
    write_captioned_folder(tmp_path)
    store = tmp_path / "S"

    def encode(captions: str, out, *extra, **kw):  # the folder with its captions, through the tiny CLIP
        flags = ("--text-encoder", "clip", "--clip-model", config, "--clip-weights", weights, *extra)
        return run_dfm("encode", tmp_path / "images", "--resolution", "16", "--captions", tmp_path / captions, *flags,
                       "--out", out, **kw)  # fmt: skip

    encode("captions.csv", store, "--text-tokens", "8")
    data = LatentStore(store)
    assert data.text["dims"] == [8, 32, 16] and data.text["encoder"] == "clip"
    enc = TextEncoder(clip_settings(tiny_clip), torch.device("cpu"))
    order = [c for k, c in sorted(CAPTIONS.items())]  # the store lists class folders in order: blue, red
    torch.testing.assert_close(data.text_rows(range(4)).pooled, enc(order).pooled, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(data.null_text().pooled, enc([""]).pooled)
    x, y = data.__getitems__([0, 3])
    assert isinstance(y, TextCond) and x.shape == (2, 3, 16, 16) and len(y) == 2

    run = tmp_path / "R"
    sets = ("data.name=store", f"data.path={store}", "train.steps=2", "sample.n=4")
    run_dfm("train", TINY, *[arg for s in sets for arg in ("--set", s)], "--out", run)
    assert (run / "samples" / "grid.png").is_file()
    run_dfm("sample", run, "--prompt", "a red square", "--n", "4", "--out", tmp_path / "g.png")
    assert (tmp_path / "g.png").is_file()
    (tmp_path / "p.txt").write_text("a red square\na blue square\n")
    run_dfm("sample", run, "--prompts", tmp_path / "p.txt", "--num", "4", "--out", tmp_path / "set.npz")
    arrays = np.load(tmp_path / "set.npz")
    assert arrays["arr_0"].shape == (4, 16, 16, 3) and arrays["arr_1"].tolist() == [0, 1, 0, 1]
    clip = ("--clip", "--clip-model", config, "--clip-weights", weights)
    run_dfm("eval", tmp_path / "set.npz", *clip, "--captions", tmp_path / "p.txt", "--json", tmp_path / "c.json")
    assert 0 <= json.loads((tmp_path / "c.json").read_text())["metrics"]["clip_score"] <= 100
    (tmp_path / "p3.txt").write_text("a\nb\nc\n")
    odd = run_dfm("eval", tmp_path / "set.npz", *clip, "--captions", tmp_path / "p3.txt", check=False)
    assert odd.returncode == 2 and "3 captions for 4 samples" in odd.stderr

    missing = run_dfm("sample", run, "--out", tmp_path / "h.png", check=False)
    assert missing.returncode == 2 and "is text-conditioned: pass --prompt" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "short.csv").write_text("red/0.png,a red square\n")
    short = encode("short.csv", tmp_path / "S2", check=False)
    assert short.returncode == 2 and "3 of 4 files have no caption" in short.stderr
    assert not (tmp_path / "S2" / "index.json").exists()


@pytest.mark.e2e
def test_prompts_on_a_class_conditional_run_are_refused(tmp_path):
    run_dfm("train", TINY, "--set", "train.steps=1", "--set", "sample.n=2", "--out", tmp_path / "R")
    proc = run_dfm("sample", tmp_path / "R", "--prompt", "a cat", "--out", tmp_path / "g.png", check=False)
    assert proc.returncode == 2 and "class-conditional" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_a_captioned_folder_trains_with_captions_encoded_once_into_the_run(tmp_path, tiny_clip):
    """`data.captions` + `[text]`: no store needed; a resumed run reuses the encoded captions."""
    config, weights, _ = tiny_clip
    write_captioned_folder(tmp_path)
    (tmp_path / "caps.jsonl").write_text(
        "".join(json.dumps({"path": k, "caption": v}) + "\n" for k, v in CAPTIONS.items())
    )
    sets = [
        "--set",
        "data.name=folder",
        "--set",
        f"data.path={tmp_path / 'images'}",
        "--set",
        f"data.captions={tmp_path / 'caps.jsonl'}",
        "--set",
        "text.encoder=clip",
        "--set",
        f"text.clip_model={config}",
        "--set",
        f"text.clip_weights={weights}",
        "--set",
        "text.max_tokens=8",
        "--set",
        "sample.n=4",
    ]
    run = tmp_path / "R"
    run_dfm("train", TINY, *sets, "--set", "train.steps=2", "--set", "train.checkpoint_every=2", "--out", run)
    encoded = run / "captions.safetensors"
    stamp = encoded.stat().st_mtime_ns
    run_dfm("train", TINY, *sets, "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--out", run)
    assert encoded.stat().st_mtime_ns == stamp  # read back, not encoded again
    newest = sorted(run.glob("**/state.json"))[-1]
    assert json.loads(newest.read_text())["text"]["dims"] == [8, 32, 16]
    run_dfm("sample", run, "--prompt", "a blue square", "--n", "2", "--out", tmp_path / "g.png")
    assert (tmp_path / "g.png").is_file()


def test_a_captioned_folder_keeps_each_caption_with_its_image(tmp_path, tiny_clip):
    from dfm_cli import distributed
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.data.captions import captioned_folder
    from dfm_cli.data.datasets import ImageFolder

    write_captioned_folder(tmp_path)
    (tmp_path / "images" / "blue" / "1.png").write_bytes(b"not a png")  # stands in: the next readable item
    (tmp_path / "captions.csv").write_text("".join(f"{k},{v}\n" for k, v in CAPTIONS.items()))
    config, weights, _ = tiny_clip
    recipe = load_recipe(
        TINY,
        [
            "data.name=folder",
            f"data.path={tmp_path / 'images'}",
            f"data.captions={tmp_path / 'captions.csv'}",
            "text.encoder=clip",
            f"text.clip_model={config}",
            f"text.clip_weights={weights}",
            "text.max_tokens=8",
        ],
    )
    ctx = distributed.Context(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    data = captioned_folder(ImageFolder(tmp_path / "images", 16), recipe, tmp_path / "R", ctx)
    enc = TextEncoder(clip_settings(tiny_clip), torch.device("cpu"))
    _, y = data.__getitems__([0, 1, 2])  # blue/0, blue/1 (unreadable -> red/0), red/0
    want = enc(["a blue square", "a red square", "a red square"])
    torch.testing.assert_close(y.pooled, want.pooled, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "sets, key",
    [
        (
            ["data.name=store", "data.path=S", "data.captions=c.csv", "text.encoder=clip", "text.clip_weights=w"],
            "data.captions",
        ),
        (["data.name=folder", "data.path=F", "text.encoder=clip", "text.clip_weights=w"], "data.captions"),
        (["data.name=folder", "data.path=F", "data.captions=c.csv"], "text.encoder"),
        (["data.name=folder", "data.path=F", "data.captions=c.csv", "text.encoder=t5"], "text.t5_weights"),
    ],
)
def test_caption_recipe_keys_are_checked_together(sets, key):
    from dfm_cli.config.recipe import load_recipe

    with pytest.raises(DfmError, match=key.replace(".", r"\.")):
        load_recipe(TINY, sets)
