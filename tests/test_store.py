"""`dfm encode`, latent stores, autoencoders and video DFM, end to end on the CPU."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import ROOT, run_dfm, run_torchrun, write_tiny_kl
from PIL import Image

from dfm_cli.data.autoencoders import PixelAE, build_autoencoder
from dfm_cli.data.datasets import sprite_clip
from dfm_cli.data.store import LatentStore
from dfm_cli.method.decompose import LaplacianPyramid


@pytest.fixture(scope="module")
def tiny_kl(tmp_path_factory):
    """A random-config diffusers AutoencoderKL saved as a local folder (f = 2, 4 channels)."""
    return write_tiny_kl(tmp_path_factory.mktemp("ae") / "tiny-kl")


def image_folder(root, n=6, size=20):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_pixel_round_trip_is_exact():
    ae = PixelAE(3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.decode(ae.encode(x)), x)
    assert ae.latent_shape((3, 5, 8, 8)) == (3, 5, 8, 8)


@pytest.mark.e2e
def test_encode_with_a_tiny_autoencoder_writes_shapes_scale_and_index(tmp_path, tiny_kl):
    src = image_folder(tmp_path / "imgs")
    run_dfm(
        "encode",
        src,
        "--ae",
        "kl",
        "--ae-weights",
        tiny_kl,
        "--resolution",
        "16",
        "--flip",
        "--shard-size",
        "4",
        "--out",
        tmp_path / "store",
    )
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["shape"] == [4, 8, 8] and index["num"] == 6 and index["flip"]
    assert [s["count"] for s in index["shards"]] == [4, 2]
    assert index["autoencoder"]["scale"] == pytest.approx(0.18215) and index["autoencoder"]["spatial_factor"] == 2
    assert index["class_names"] == ["cats", "dogs"] and index["level_stats"]["levels"] == 2
    store = LatentStore(tmp_path / "store")
    assert len(store) == 12  # flips stored as a second copy
    latent, label = store[5]
    ae = build_autoencoder("kl", tiny_kl)
    assert latent.shape == (4, 8, 8) and int(label) == 1
    assert ae.decode(latent[None]).shape == (1, 3, 16, 16)
    flipped, _ = store[6 + 5]
    assert not torch.allclose(flipped, latent)


@pytest.mark.e2e
def test_interrupted_encode_resumes_byte_identically(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--frames", "4", "--num-clips", "10", "--resolution", "16", "--shard-size", "3"]
    run_dfm("encode", "sprites", *args, "--out", full)
    run_dfm("encode", "sprites", *args, "--out", part)
    (part / "shard-00002.safetensors").unlink()  # as if killed before these were written
    (part / "index.json").unlink()
    (part / ".tmp-shard-00003.safetensors").write_bytes(b"half-written")
    (part / "shard-00003.safetensors").unlink()
    run_dfm("encode", "sprites", *args, "--out", part)
    for f in sorted(full.glob("shard-*.safetensors")):
        assert f.read_bytes() == (part / f.name).read_bytes(), f.name
    assert json.loads((part / "index.json").read_text())["num"] == 10


@pytest.mark.e2e
def test_unreadable_files_are_reported_or_fail_strictly(tmp_path):
    src = image_folder(tmp_path / "imgs")
    (src / "cats" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (src / "cats" / "empty.jpg").write_bytes(b"")
    (src / "dogs" / "notes.txt").write_text("not an image")
    proc = run_dfm("encode", src, "--resolution", "16", "--out", tmp_path / "store")
    report = json.loads((tmp_path / "store" / "report.json").read_text())
    # notes.txt is not an image by its suffix, so it is not listed (the one rule of `list_files`)
    assert sorted(r["file"].rsplit("/", 1)[1] for r in report) == ["corrupt.png", "empty.jpg"]
    assert json.loads((tmp_path / "store" / "index.json").read_text())["num"] == 6
    assert "skipped 2 unreadable" in proc.stdout
    strict = run_dfm("encode", src, "--resolution", "16", "--strict", "--out", tmp_path / "strict", check=False)
    assert strict.returncode == 1 and "--strict" in strict.stderr and "Traceback" not in strict.stderr
    assert not list((tmp_path / "strict").glob("*shard*"))


@pytest.mark.e2e
def test_mp4_clips_to_latents_and_an_exact_temporal_decomposition(tmp_path):
    videos = tmp_path / "videos" / "sprites"
    videos.mkdir(parents=True)
    for i in range(3):
        iio.imwrite(videos / f"{i}.mp4", sprite_clip(i, 10, 32)[0], fps=8)
    run_dfm(
        "encode",
        tmp_path / "videos",
        "--frames",
        "8",
        "--stride",
        "1",
        "--resolution",
        "16",
        "--levels",
        "2",
        "--temporal-factors",
        "2",
        "--out",
        tmp_path / "store",
    )
    store = LatentStore(tmp_path / "store")
    clips = torch.stack([store[i][0] for i in range(len(store))])
    assert clips.shape == (3, 3, 8, 16, 16)  # B C T H W
    pyramid = LaplacianPyramid(2, [2], [2])
    levels = pyramid.decompose(clips)
    assert levels[0].shape == (3, 3, 4, 8, 8)
    assert (pyramid.recompose(levels) - clips).abs().max() < 1e-5


@pytest.mark.e2e
def test_dfm_trains_from_image_and_video_stores_and_samples_video(tmp_path, tiny_kl):
    src = image_folder(tmp_path / "imgs", n=8)
    run_dfm("encode", src, "--ae", "kl", "--ae-weights", tiny_kl, "--resolution", "16", "--out", tmp_path / "img")
    common = [
        "--set",
        "train.steps=3",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.log_every=1",
        "--set",
        "sample.n=2",
        "--set",
        "sample.steps=[2,2]",
    ]
    run_dfm(
        "train",
        ROOT / "recipes/tiny.toml",
        "--out",
        tmp_path / "run_img",
        "--set",
        "data.name=store",
        "--set",
        f"data.path={json.dumps(str(tmp_path / 'img'))}",
        "--set",
        "model.name=DFM-N/2",
        *common,
    )
    assert Image.open(tmp_path / "run_img" / "samples" / "grid.png").size[0] > 16  # decoded to pixels

    run_dfm("encode", "sprites", "--num-clips", "8", "--frames", "4", "--resolution", "16", "--out", tmp_path / "vid")
    video = ["--set", "data.name=store", "--set", f"data.path={json.dumps(str(tmp_path / 'vid'))}"]
    run_dfm("train", ROOT / "recipes/tiny/video.toml", "--out", tmp_path / "run_vid", *video, *common)
    assert iio.imread(tmp_path / "run_vid" / "samples" / "grid.gif", index=None).shape[0] == 4
    for out in ("clip.mp4", "clip.gif"):
        run_dfm("sample", tmp_path / "run_vid", "--n", "2", "--steps", "2,2", "--out", tmp_path / out)
        frames = iio.imread(tmp_path / out, index=None)
        assert frames.shape[0] == 4 and frames.ndim == 4


@pytest.mark.e2e
def test_decompose_compares_the_latent_pyramid_with_the_image(tmp_path, tiny_kl):
    proc = run_dfm("decompose", "--levels", "2", "--ae", "kl", "--ae-weights", tiny_kl, "--out", tmp_path)
    score = float(proc.stdout.split("scale equivariance of --ae kl:")[1].split()[0])
    assert 0 <= score <= 1
    assert (tmp_path / "latent_level_1.png").is_file() and (tmp_path / "latent_level_2.png").is_file()
    assert "latent energy share" in proc.stdout


@pytest.mark.e2e
def test_torchrun_encode_writes_the_same_shards(tmp_path):

    args = ["sprites", "--frames", "4", "--num-clips", "10", "--resolution", "16", "--shard-size", "3"]
    run_dfm("encode", *args, "--out", tmp_path / "one")
    run_torchrun("encode", *args, "--out", str(tmp_path / "two"), port=31500)
    for f in sorted((tmp_path / "one").glob("shard-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "two" / f.name).read_bytes(), f.name
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert one == two


def shard_shapes(store):
    from safetensors.numpy import load_file

    return {f.name: tuple(load_file(f)["latents"].shape) for f in sorted(store.glob("shard-*.safetensors"))}


@pytest.mark.e2e
def test_a_failed_encode_rerun_at_another_resolution_is_refused_or_restarts_cleanly(tmp_path):
    src = image_folder(tmp_path / "imgs", n=8)
    (src / "cats" / "3-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    store = tmp_path / "store"
    failed = run_dfm("encode", src, "--resolution", "16", "--shard-size", "2", "--strict", "--out", store, check=False)
    assert failed.returncode == 1 and list(shard_shapes(store).values()) == [(2, 3, 16, 16)]  # shard 0 was done
    refused = run_dfm("encode", src, "--resolution", "8", "--shard-size", "2", "--out", store, check=False)
    message = refused.stderr.strip()
    assert refused.returncode == 2 and "\n" not in message and "Traceback" not in message
    assert "resolution 16 -> 8" in message and "--overwrite" in message
    assert list(shard_shapes(store).values()) == [(2, 3, 16, 16)]  # the refusal touched nothing
    run_dfm("encode", src, "--resolution", "8", "--shard-size", "2", "--overwrite", "--out", store)
    shapes = shard_shapes(store)
    assert len(shapes) == 5 and all(s[1:] == (3, 8, 8) for s in shapes.values())
    index = json.loads((store / "index.json").read_text())
    assert index["shape"] == [3, 8, 8] and index["num"] == 8 and index["manifest"]["resolution"] == 8
    assert [r["file"].rsplit("/", 1)[1] for r in json.loads((store / "report.json").read_text())] == ["3-corrupt.png"]


@pytest.mark.e2e
def test_bad_encode_flags_fail_before_any_work(tmp_path):
    from dfm_cli.data.encode import EncodeSettings
    from dfm_cli.errors import DfmError

    proc = run_dfm("encode", "sprites", "--shard-size", "0", "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --shard-size 0: must be at least 1"
    assert not (tmp_path / "s").exists()
    for bad, match in (
        ({"batch": 0}, "--batch 0"),
        ({"fps": -1.0}, "--fps"),
        ({"stride": 0}, "--stride 0"),
        ({"levels": 2, "factors": (2, 2)}, "--levels 2"),
        ({"num": -1}, "--num-clips -1"),
        ({"out": tmp_path / "file.txt"}, "is a file"),
    ):
        (tmp_path / "file.txt").write_text("")
        with pytest.raises(DfmError, match=match):
            EncodeSettings(**{"source": "sprites", "out": tmp_path / "s", **bad})


def encode_api(tmp_path, **changes):
    from dfm_cli.data.encode import EncodeSettings, encode_store
    from dfm_cli.data.sources import open_encode
    from dfm_cli.distributed import Context

    settings = EncodeSettings(
        **{"source": "photo-crops", "out": tmp_path / "store", "resolution": 8, "num": 7, "shard_size": 3, **changes}
    )
    source, ae = open_encode(settings)
    return encode_store(source, ae, settings, Context())


def test_only_finished_verified_shards_are_reused(tmp_path):
    index = encode_api(tmp_path)
    store = tmp_path / "store"
    assert index["shape"] == [3, 8, 8] and [s["count"] for s in index["shards"]] == [3, 3, 1]
    original = {f.name: f.read_bytes() for f in store.glob("shard-*")}
    shard = store / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # corrupt a latent: the hash no longer matches
    shard.write_bytes(bytes(data))
    (store / "shard-00000.json").unlink()  # a shard without its record (killed after the rename)
    record = json.loads((store / "shard-00002.json").read_text())
    (store / "shard-00002.json").write_text(json.dumps({**record, "count": 2}))  # a bad count
    before = (store / "shard-00001.safetensors").stat().st_mtime_ns
    assert encode_api(tmp_path) == index
    assert {f.name: f.read_bytes() for f in store.glob("shard-*")} == original
    assert (store / "shard-00001.safetensors").stat().st_mtime_ns != before
    untouched = (store / "shard-00002.safetensors").stat().st_mtime_ns
    encode_api(tmp_path)  # everything verifies now: nothing is rewritten
    assert (store / "shard-00002.safetensors").stat().st_mtime_ns == untouched


def test_a_shard_of_the_wrong_shape_is_redone_even_with_a_matching_record(tmp_path):
    from safetensors.torch import save_file

    from dfm_cli.data.encode import _sha256

    encode_api(tmp_path)
    store = tmp_path / "store"
    good = (store / "shard-00000.safetensors").read_bytes()
    save_file(
        {"labels": torch.zeros(3, dtype=torch.long), "latents": torch.zeros(3, 3, 4, 4)},
        store / "shard-00000.safetensors",
    )
    record = json.loads((store / "shard-00000.json").read_text())
    record["sha256"] = _sha256(store / "shard-00000.safetensors")
    (store / "shard-00000.json").write_text(json.dumps(record))
    encode_api(tmp_path)
    assert (store / "shard-00000.safetensors").read_bytes() == good


def test_a_store_made_with_other_settings_is_refused_in_one_line(tmp_path):
    from dfm_cli.errors import DfmError

    encode_api(tmp_path)
    with pytest.raises(DfmError) as e:
        encode_api(tmp_path, flip=True, antialias=True)
    assert (
        "\n" not in str(e.value) and "flip false -> true" in str(e.value) and "antialias false -> true" in str(e.value)
    )
    index = encode_api(tmp_path, flip=True, antialias=True, overwrite=True)
    assert index["flip"] and index["level_stats"]["antialias"] and len(LatentStore(tmp_path / "store")) == 14


def test_a_shard_with_no_readable_item_never_counts_as_done(tmp_path):
    from dfm_cli.data.encode import EncodeSettings, encode_store
    from dfm_cli.data.sources import open_encode
    from dfm_cli.distributed import Context

    src = image_folder(tmp_path / "imgs", n=4)  # cats/0, cats/1, dogs/0, dogs/1
    for name in ("0.png", "1.png"):
        (src / "dogs" / name).write_bytes(b"")  # shard 1 holds only broken files
    settings = EncodeSettings(source=str(src), out=tmp_path / "store", resolution=8, shard_size=2)
    index = encode_store(*open_encode(settings), settings, Context())
    assert index["num"] == 2 and [s["file"] for s in index["shards"]] == ["shard-00000.safetensors"]
    assert not (tmp_path / "store" / "shard-00001.safetensors").exists()
    image_folder(tmp_path / "fixed", n=4)
    for name in ("0.png", "1.png"):  # the files are repaired: the re-run reads them now
        (src / "dogs" / name).write_bytes((tmp_path / "fixed" / "dogs" / name).read_bytes())
    index = encode_store(*open_encode(settings), settings, Context())
    assert index["num"] == 4 and [s["count"] for s in index["shards"]] == [2, 2]
    assert json.loads((tmp_path / "store" / "report.json").read_text()) == []


def test_level_statistics_cover_the_whole_class_sorted_store():
    from dfm_cli.data.datasets import TensorImages
    from dfm_cli.method.level_stats import level_statistics

    images = torch.cat([torch.zeros(6, 1, 4, 4), torch.full((6, 1, 4, 4), 254.0)]).byte()
    sorted_by_class = TensorImages(images, torch.tensor([0] * 6 + [1] * 6), ("dark", "light"))
    stats = level_statistics(sorted_by_class, LaplacianPyramid(2, [2]), limit=4)
    assert stats["items"] == 4 and stats["antialias"] is False
    assert stats["mean"][0][0] == pytest.approx(-1 / 255, abs=1e-6)  # half dark, half light; the first 4 are dark
    assert stats["std"][0][0] == pytest.approx(1.0, abs=1e-2)


def test_statistics_with_another_antialias_are_refused():
    from dfm_cli.errors import DfmError
    from dfm_cli.method.level_stats import stored_level_statistics

    stats = {
        "levels": 2,
        "factors": [2],
        "temporal_factors": [1],
        "antialias": False,
        "picked": "strided",
        "mean": [[0.0]],
        "std": [[1.0]],
    }
    assert stored_level_statistics({"level_stats": stats}, LaplacianPyramid(2, [2])) == stats
    with pytest.raises(DfmError) as e:
        stored_level_statistics({"level_stats": stats}, LaplacianPyramid(2, [2], antialias=True))
    assert "flow.antialias = true" in str(e.value) and "antialias = false" in str(e.value) and "\n" not in str(e.value)
    assert stored_level_statistics({"level_stats": stats}, LaplacianPyramid(3, [2, 2], antialias=True)) is None
    old = {k: v for k, v in stats.items() if k not in ("antialias", "picked")}  # first-4096 statistics: measured anew
    assert stored_level_statistics({"level_stats": old}, LaplacianPyramid(2, [2])) is None


def test_training_refuses_a_store_whose_statistics_used_another_antialias(tmp_path):
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.errors import DfmError
    from dfm_cli.training.loop import data_level_statistics

    encode_api(tmp_path, resolution=16, levels=2)
    store = LatentStore(tmp_path / "store")
    recipe = load_recipe(
        ROOT / "recipes/tiny.toml",
        ["flow.standardize=true", "data.name=store", f"data.path={json.dumps(str(tmp_path / 'store'))}"],
    )
    assert data_level_statistics(recipe, store) == store.index["level_stats"]
    recipe.flow.antialias = True
    with pytest.raises(
        DfmError, match="flow.antialias = true, but the store's level statistics were computed with antialias = false"
    ):
        data_level_statistics(recipe, store)
