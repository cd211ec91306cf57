"""Sample sets and latent stores under concurrent writers, damage and sizes that do not fit:
the set lock, part records (digest and source), shard verification, memory and disk bounds."""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_dfm

from dfm_cli import distributed
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.method.sampler import SamplerSettings
from dfm_cli.sampling import sample_set
from dfm_cli.sampling.sample_set import NpzSetWriter, write_sample_set

PYR = LaplacianPyramid(2, [2])
SETTINGS = SamplerSettings((2, 1), (0.7,), cfg=1.5)
SOURCE_A = {"checkpoint": "digest-a", "ema": True, "autoencoder": None}
SOURCE_B = {"checkpoint": "digest-b", "ema": True, "autoencoder": None}


def make(model, out, num, batch=4, source=SOURCE_A, **kw):
    return write_sample_set(
        model, PYR, SETTINGS, out, num=num, batch=batch, seed=0, classes=10, source=source,
        ctx=distributed.Context(), **kw,
    )  # fmt: skip


def arrays(path):
    with np.load(path) as d:
        return d["arr_0"], d["arr_1"], json.loads(str(d["manifest"]))


def writer_of(out, num, source):
    want = sample_set.set_manifest(SETTINGS, seed=0, num=num, shape=(16, 16, 3), source=source)
    return NpzSetWriter(out, (16, 16, 3), want, 10)


# ----------------------------------------------------------------- the set lock
HOLD = """
import sys, time
from pathlib import Path
from dfm_cli.sampling.sample_set import set_lock
with set_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_set_held_by_another_process_is_refused_naming_its_pid(model, tmp_path):
    out = tmp_path / "s.npz"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DfmError, match=f"PID {holder.pid}") as refused:
            make(model, out, 8, overwrite=True)
        assert "\n" not in str(refused.value) and "another dfm process" in str(refused.value)
        assert not out.exists() and not (tmp_path / "s.npz.parts").exists()  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    make(model, out, 8)  # the kernel released the lock with the process
    assert len(arrays(out)[0]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no lock file left behind


@pytest.mark.e2e
def test_two_dfm_sample_processes_on_one_set_the_second_is_refused_and_the_first_finishes(trained, tmp_path):
    out = tmp_path / "set.npz"
    first = subprocess.Popen(
        [sys.executable, "-m", "dfm_cli", "sample", str(trained), "--num", "1500", "--batch", "8",
         "--steps", "1,1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        parts = tmp_path / "set.npz.parts"
        deadline = time.monotonic() + 120
        while not (parts.is_dir() and any(parts.glob("part-*.npz"))):  # the first is writing parts
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = run_dfm(
            "sample", trained, "--num", "1500", "--batch", "8", "--steps", "1,1", "--seed", "1",
            "--out", out, "--overwrite", check=False,
        )  # fmt: skip
        assert first.poll() is None, "the first finished before the second started: raise --num"
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0], second.stderr
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    images, labels, manifest = arrays(out)
    assert images.shape == (1500, 16, 16, 3) and manifest["seed"] == 0 and manifest["num"] == 1500
    assert labels.tolist() == [i % 10 for i in range(1500)]
    assert not parts.exists()


# ----------------------------------------------------------------- part records
def test_parts_from_another_source_are_made_again_not_reused(model, tmp_path):
    reference = arrays(make(model, tmp_path / "ref.npz", 8))[0]
    out = tmp_path / "s.npz"
    other = writer_of(out, 8, SOURCE_B)  # an interrupted set of another run: its parts are there
    other.resume(start_over=False)
    for a in (0, 4):
        other.append(a, a + 4, lambda: np.zeros((4, 16, 16, 3), np.uint8))
    record = json.loads((other.work / "part-000000000-000000004.json").read_text())
    assert record["source"]["checkpoint"] == "digest-b" and len(record["sha256"]) == 64
    # ...and the folder's manifest now names run A (a second writer started over it)
    (other.work / "manifest.json").write_text(json.dumps(writer_of(out, 8, SOURCE_A).want))
    make(model, out, 8)
    assert np.array_equal(arrays(out)[0], reference)


def test_a_part_whose_bytes_changed_is_made_again(model, tmp_path):
    reference = arrays(make(model, tmp_path / "ref.npz", 8))[0]
    out = tmp_path / "s.npz"
    ours = writer_of(out, 8, SOURCE_A)
    ours.resume(start_over=False)
    for a in (0, 4):
        ours.append(a, a + 4, lambda a=a: reference[a : a + 4])
    # the same rows and labels, other pixels: only the digest tells
    np.savez(ours.part(4, 8), arr_0=np.zeros((4, 16, 16, 3), np.uint8), arr_1=np.arange(4, 8))
    make(model, out, 8)
    assert np.array_equal(arrays(out)[0], reference)


def test_the_final_npz_is_streamed_and_loads_like_np_savez(model, tmp_path):
    out = make(model, tmp_path / "s.npz", 10, batch=3)
    images, labels, manifest = arrays(out)
    assert images.dtype == np.uint8 and images.shape == (10, 16, 16, 3) and labels.dtype == np.int64
    make(model, out, 13, batch=3)  # extend: the kept rows are copied from the old file
    bigger = arrays(out)[0]
    assert np.array_equal(bigger[:10], images) and len(bigger) == 13
    make(model, out, 4)  # shrink
    assert np.array_equal(arrays(out)[0], images[:4])


# ----------------------------------------------------------------- memory and disk
def test_a_batch_over_the_memory_limit_is_refused_before_sampling(model, tmp_path):
    with pytest.raises(DfmError, match=r"--batch 100000000: .* GiB as float32 .* limit") as refused:
        make(model, tmp_path / "s.npz", 4, batch=10**8)
    assert "\n" not in str(refused.value)
    assert not any(tmp_path.iterdir())


def _limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,message",
    [
        (("--n", "100000000"), r"--n 100000000: .* GiB as float32 .* --num"),
        (("--num", "1000000000000", "--out", "set.npz"), r"--num 1000000000000: .* on disk"),
    ],
)
def test_sizes_that_do_not_fit_are_refused_before_anything_is_allocated(trained, tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_cli", "sample", str(trained), "--steps", "1,1", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_limited_memory,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .npz.parts, no lock, no grid


# ----------------------------------------------------------------- latent stores
def _store(tmp_path):
    from dfm_cli.data.encode import EncodeSettings, encode_store
    from dfm_cli.data.sources import open_encode

    settings = EncodeSettings(source="photo-crops", out=tmp_path / "store", resolution=8, num=6, shard_size=3)
    source, ae = open_encode(settings)
    encode_store(source, ae, settings, distributed.Context())
    return tmp_path / "store"


@pytest.mark.parametrize("damage", ["bit flip", "swapped"])
def test_a_damaged_shard_is_one_line_naming_it_and_the_repair(tmp_path, damage):
    from dfm_cli.data.store import LatentStore

    root = _store(tmp_path)
    shard = root / "shard-00000.safetensors"
    if damage == "bit flip":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x10  # in the last latent: the header still parses
        shard.write_bytes(bytes(data))
    else:
        shard.write_bytes((root / "shard-00001.safetensors").read_bytes())
    store = LatentStore(root)
    with pytest.raises(DfmError) as refused:
        store.__getitems__([0, 1])
    message = str(refused.value)
    assert "\n" not in message and "shard-00000.safetensors" in message
    assert f"dfm encode photo-crops --out {root}" in message and message.endswith("--overwrite`")
    assert store[4][0].shape == store.shape  # the intact shard still reads


def test_shards_are_verified_once_per_process_not_on_every_read(tmp_path, monkeypatch):
    from dfm_cli.data.store import LatentStore

    root = _store(tmp_path)
    store = LatentStore(root)
    hashed = []
    real = store._verify
    monkeypatch.setattr(store, "_verify", lambda shard: (hashed.append(shard), real(shard)))
    for _ in range(3):
        for i in range(len(store)):
            store[i]
    assert sorted(hashed) == ["shard-00000.safetensors", "shard-00001.safetensors"]


# ----------------------------------------------------------------- small ones
def test_ablate_help_keeps_its_brackets():
    from typer.testing import CliRunner

    from dfm_cli.cli import app

    got = CliRunner().invoke(app, ["ablate", "--help"], env={"COLUMNS": "200"})
    assert "[grid] and/or [[cell]]" in got.stdout


def test_every_from_pretrained_loading_weights_asks_for_safetensors():
    import re

    calls = []
    for path in (ROOT / "dfm_cli").rglob("*.py"):
        text = path.read_text()
        calls += [(path.name, m.group(0)) for m in re.finditer(r"(\w+)\.from_pretrained\([^)]*\)", text)]
    weights = [c for c in calls if not c[1].startswith("AutoTokenizer")]
    assert weights and all("use_safetensors=True" in c and "local_files_only=True" in c for _, c in weights), calls
