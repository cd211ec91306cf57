import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dfm_cli.data.datasets import (
    ANIMAL_CLASSES,
    BUILTIN,
    DATA_NAMES,
    ImageFolder,
    UnreadableImage,
    _NumpyOnly,
    animal_mnist,
    build_dataset,
    photo_crops,
)
from dfm_cli.errors import DfmError
from dfm_cli.listing import list_files
from dfm_cli.training.batches import StreamBatches


def test_animal_mnist_is_real_balanced_and_padded():
    ds = animal_mnist(32)
    assert len(ds) == 10000 and ds.channels == 1 and ds.class_names == ANIMAL_CLASSES
    x, y = ds.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert (x[:, :, :2] == -1).all()  # the 28 -> 32 padding is background
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert animal_mnist(16).images.shape[-1] == 16


def test_only_numpy_arrays_can_be_unpickled(tmp_path):
    import io

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnly(io.BytesIO(pickle.dumps(print))).load()
    arr = np.arange(5)
    assert (_NumpyOnly(io.BytesIO(pickle.dumps(arr))).load() == arr).all()


def test_image_folder(tmp_path):
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * (c + i), np.uint8)).save(tmp_path / name / f"{i}.png")
    ds = build_dataset("folder", str(tmp_path), 16)
    assert len(ds) == 6 and ds.class_names == ("cats", "dogs") and ds.channels == 3
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert torch.allclose(x, torch.full_like(x, 40 * 2 / 127.5 - 1), atol=1e-2)
    flat = ImageFolder(tmp_path / "cats", 16)  # no subfolders: one class
    assert len(flat) == 3 and flat.class_names == ("all",)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfmError, match="holds no"):
        ImageFolder(tmp_path / "empty", 16)
    with pytest.raises(DfmError, match="not a folder"):
        ImageFolder(tmp_path / "missing", 16)


def test_class_subsets_keep_label_ids_and_refuse_what_they_cannot_do(tmp_path):
    from dfm_cli.ablate.execute import write_reference
    from dfm_cli.config.recipe import load_recipe

    ds = build_dataset("animal-mnist", "", 16, classes=[2, 7])
    assert len(ds) == 2000 and set(ds.labels.tolist()) == {2, 7} and ds.num_classes == 10
    assert len(animal_mnist(16, num=30)) == 30 and len(set(animal_mnist(16, num=30).labels.tolist())) == 10
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 8, 3), 40 * c, np.uint8)).save(tmp_path / name / "0.png")
    folder = build_dataset("folder", str(tmp_path), 8, classes=[1])
    assert len(folder) == 1 and int(folder[0][1]) == 1
    with pytest.raises(DfmError, match=r"data.classes = \[10\]: \[10\] out of range; the data has 10 classes"):
        build_dataset("animal-mnist", "", 16, classes=[10])
    with pytest.raises(DfmError, match="data.classes"):
        load_recipe(None, ["data.name=store", "data.path=s", "data.classes=[1]"])
    write_reference("animal-mnist", "", 16, 0, 50, tmp_path / "ref.npz", [2, 7])  # a sweep's reference
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["arr_0"].shape == (50, 16, 16, 3)
        picks = np.linspace(0, 1999, 50).round().astype(int)
        assert np.array_equal(ref["arr_0"][..., 0], ds.images[picks, 0].numpy())


def test_stream_order_is_a_permutation_per_epoch_and_resumes_exactly():
    full = StreamBatches(10, 4, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    stream = sum(batches, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    late = iter(StreamBatches(10, 4, seed=3, start_batch=4))
    assert [next(late), next(late)] == batches[4:6]
    assert next(iter(StreamBatches(10, 4, seed=4))) != batches[0]


def test_one_lister_one_rule_for_suffixes_and_hidden_files(tmp_path):
    for name in ("b/x.png", "b/deep/y.JPG", "a/z.png", "a/notes.txt", "a/.hidden.png", ".cache/w.png", "c/readme.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listing = list_files(tmp_path)
    assert listing.class_names == ("a", "b", "c")  # an empty class keeps the labels in name order
    assert [(f.relative_to(tmp_path).as_posix(), c) for f, c in listing.files] == [
        ("a/z.png", 0),
        ("b/deep/y.JPG", 1),
        ("b/x.png", 1),
    ]
    (tmp_path / "top.png").write_bytes(b"")
    with pytest.raises(DfmError, match="both in class subfolders and at its top level"):
        list_files(tmp_path)
    (tmp_path / "top.png").unlink()
    labels = tmp_path / "labels.csv"
    labels.write_text("b/x.png,dog\na/z.png,cat\n")
    listing = list_files(tmp_path, labels_file=labels)
    assert listing.class_names == ("cat", "dog") and [c for _, c in listing.files] == [1, 0]
    assert listing.digest(tmp_path) != list_files(tmp_path).digest(tmp_path)
    with pytest.raises(DfmError, match="holds no video files"):
        list_files(tmp_path / "c", {".mp4"} | {".gif", ".mov", ".avi", ".webm", ".mkv"})


def folder_with_a_corrupt_image(root):
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 50 * (2 * c + i), np.uint8)).save(root / name / f"{i}.png")
    (root / "cats" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    return root


def test_a_corrupt_training_image_is_reported_once_and_replaced_by_the_next(tmp_path, capfd):
    ds = build_dataset("folder", str(folder_with_a_corrupt_image(tmp_path)), 8)
    x1, y1 = ds[1]  # cats/1.png is corrupt: dogs/0.png stands in, with its own label
    x2, y2 = ds[2]
    assert torch.equal(x1, x2) and int(y1) == int(y2) == 1
    assert torch.allclose(x1, torch.full_like(x1, 100 / 127.5 - 1))
    ds[1]
    err = capfd.readouterr().err
    assert err.count("cannot read") == 1 and "cats/1.png" in err and "data.strict" in err
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=StreamBatches(len(ds), 4, seed=0))))
    assert batch[0].shape == (4, 3, 8, 8)


def test_a_corrupt_training_image_stops_a_strict_run_with_one_line(tmp_path):
    root = folder_with_a_corrupt_image(tmp_path)
    ds = build_dataset("folder", str(root), 8, strict=True)
    ds[0]
    with pytest.raises(UnreadableImage, match="cats/1.png") as e:
        ds[1]
    assert "\n" not in str(e.value) and "data.strict" in str(e.value)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)  # a worker re-raises it
    with pytest.raises(UnreadableImage) as e:
        next(iter(loader))
    assert (
        "\n" not in str(e.value) and str(e.value).startswith("data.path: cannot read") and "cats/1.png" in str(e.value)
    )


def test_photo_crops_are_deterministic_real_and_everywhere_a_builtin_is():
    a, b = photo_crops(16, num=64), photo_crops(16, num=64)
    assert a.images.shape == (64, 3, 16, 16) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, photo_crops(16, num=64, seed=1).images)
    assert set(a.labels.tolist()) == {0, 1} and a.images.float().std() > 20  # real texture, both photos
    assert "photo-crops" in BUILTIN and "photo-crops" in DATA_NAMES
    trained = build_dataset("photo-crops", "", 16)
    assert len(trained) == 10000 and trained.shape == (3, 16, 16) and trained.num_classes == 2
    with pytest.raises(DfmError, match="short side"):
        photo_crops(1024, num=1)


def test_every_builtin_is_a_train_dataset_an_encode_source_and_an_eval_reference():
    from dfm_cli.data.sources import build_source
    from dfm_cli.evaluation.evaluate import load_source

    for name, entry in BUILTIN.items():
        frames = 8 if entry.video else 0  # eval's reference clips have 8 frames
        trained = build_dataset(name, "", 8, frames)
        source = build_source(name, 8, frames, num=5)
        item = source[3]
        assert source.channels == trained.channels == entry.channels
        assert item.array.dtype == np.uint8 and item.array.shape[-1] == entry.channels
        assert item.array.shape == tuple(trained.shape[1:]) + (entry.channels,)
        reference = load_source(name, 8)
        assert reference.images.shape[1:] == item.array.shape
        x, y = trained[3]
        assert torch.equal(torch.from_numpy(reference.images[3]).movedim(-1, 0).float() / 127.5 - 1, x)
    with pytest.raises(DfmError, match="holds images, not video"):
        build_dataset("animal-mnist", "", 8, frames=4)


def test_eval_reads_a_folder_through_the_same_lister(tmp_path):
    from dfm_cli.evaluation.evaluate import load_source

    for i in range(3):
        Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(tmp_path / f"{i:06d}.png")
    (tmp_path / ".tmp-000003.png").write_bytes(b"half-written")  # an interrupted sample set's temporary file
    (tmp_path / "manifest.json").write_text("{}")
    source = load_source(str(tmp_path))
    assert source.images.shape == (3, 4, 4, 3) and source.images[2, 0, 0, 0] == 20
    (tmp_path / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    with pytest.raises(DfmError, match="000003.png: cannot read it as an image") as e:
        load_source(str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.e2e
@pytest.mark.slow  # two `dfm train` processes
def test_dfm_train_skips_a_corrupt_image_once_or_stops_in_one_line_under_strict(tmp_path):
    from conftest import TINY, run_dfm

    root = folder_with_a_corrupt_image(tmp_path / "imgs")
    common = [
        "--set",
        "data.name=folder",
        "--set",
        f"data.path={json.dumps(str(root))}",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "sample.n=2",
    ]
    strict = run_dfm("train", TINY, "--out", tmp_path / "strict", *common, "--set", "data.strict=true", check=False)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert strict.stderr.strip().splitlines()[-1].startswith("error: data.path: cannot read")
    assert "cats/1.png" in strict.stderr
    run = run_dfm("train", TINY, "--out", tmp_path / "run", *common)
    assert run.stderr.count("cannot read") == 1 and (tmp_path / "run" / "samples" / "grid.png").is_file()


def test_gray_photo_crops_are_the_same_crops_in_one_luminance_channel():
    rgb, gray = photo_crops(16, num=32), photo_crops(16, num=32, gray=True)
    assert gray.images.shape == (32, 1, 16, 16) and torch.equal(gray.labels, rgb.labels)
    # PIL's "L": ITU-R 601-2 luma, rounded; so within one grey level of the weighted sum
    luma = (rgb.images.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)[:, None, None]).sum(1)
    assert (gray.images[:, 0].double() - luma).abs().max() <= 1
    built = build_dataset("photo-crops-gray", "", 16)
    assert built.channels == 1 and BUILTIN["photo-crops-gray"].channels == 1
