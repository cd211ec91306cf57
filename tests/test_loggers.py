"""`train.log_to`: TensorBoard and W&B mirror `stats.jsonl` and the run's images, read back with
the real libraries (TensorBoard's event reader; the records of W&B's offline run file), on a
tiny CPU training in this process. W&B never leaves this machine: offline, its folders here."""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, cli, run_dfm
from PIL import Image
from rich.console import Console

from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.training.loggers import WANDB_ID, RunLogs, require, scalars_of
from dfm_cli.training.loop import train

ALL = 'train.log_to=["jsonl", "tensorboard", "wandb"]'
# 4 steps, a stats line every 2, previews at 2 and 4, and an evaluation hook at step 3 (its own line)
SMALL = ["train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "train.preview_every=2", "sample.n=4"]


def swd_hook(step: int, ema: torch.nn.Module) -> dict:
    return {"eval_swd": 0.5 + step / 8}  # stands in for in-training evaluation: a metric of its own


def offline(mp: pytest.MonkeyPatch, home: Path) -> None:
    """W&B offline and silent, its settings, caches and stray files in `home`; no name, group
    or config from the environment."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(home / "dir"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
    }.items():
        mp.setenv(key, value)
    for key in ("WANDB_PROJECT", "WANDB_API_KEY", "DFM_WANDB_GROUP", "DFM_WANDB_NAME", "DFM_WANDB_CONFIG"):
        mp.delenv(key, raising=False)


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path_factory, monkeypatch):
    offline(monkeypatch, tmp_path_factory.mktemp("wandb-home"))


def settle_wandb() -> None:
    """Wait until W&B has written its files: `run.finish()` returns before W&B's service
    process has closed the run's file, which ending the service (as a process's exit does)
    waits for."""
    if sys.modules.get("wandb") is not None:
        sys.modules["wandb"].teardown()


def train_tiny(run: Path, *overrides: str, hooks=()) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny runs; leave the machine's other cores alone
    try:
        train(load_recipe(TINY, [*SMALL, *overrides]), run, console=Console(quiet=True), hooks=hooks)
    finally:
        torch.set_num_threads(threads)
        settle_wandb()


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """A tiny run logged to all three, with W&B's name, group and extra config from the environment."""
    run = tmp_path_factory.mktemp("mirrored") / "run"
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, tmp_path_factory.mktemp("wandb-home"))
        for key, value in {
            "DFM_WANDB_GROUP": "tiny sweep",
            "DFM_WANDB_NAME": "steps=4-abc",
            "DFM_WANDB_CONFIG": json.dumps({"ablate": {"settings": {"train.steps": 4}}}),
        }.items():
            mp.setenv(key, value)
        train_tiny(run, ALL, hooks=[(3, swd_hook)])
    return run


def stats_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- TensorBoard


def tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def tb_scalars(run: Path) -> dict[tuple[str, int], list[float]]:
    """(tag, step) → the values TensorBoard shows, in the order written."""
    events, found = tensorboard(run), {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            found.setdefault((tag, e.step), []).append(e.value)
    return found


def expected_scalars(run: Path) -> dict[tuple[str, int], float]:
    expected: dict[tuple[str, int], float] = {}
    for row in stats_rows(run):
        expected.update({(tag, row["step"]): value for tag, value in scalars_of(row).items()})
    return expected


def png(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im)


def test_tensorboard_event_files_hold_the_stats_jsonl_values(mirrored):
    expected = expected_scalars(mirrored)
    found = tb_scalars(mirrored)
    assert {"loss", "loss/level_0", "loss/level_1", "loss/t_bin_1", "lr", "grad_norm", "eval_swd"} <= {
        tag for tag, _ in found
    }
    assert {"images_per_s", "tflops_per_device", "step_time_s"} <= {tag for tag, _ in found}  # throughput
    assert set(found) == set(expected)  # the same tags at the same steps, nothing more
    for key, value in expected.items():
        assert found[key] == [np.float32(value)], key  # TensorBoard keeps float32
    assert found[("eval_swd", 3)] == [np.float32(0.5 + 3 / 8)]  # the hook's own line, at its step
    assert ("mfu", 2) not in found  # null in stats.jsonl (no known peak on a CPU): left out


def test_tensorboard_holds_the_preview_and_final_grids_with_their_stage_previews(mirrored):
    events = tensorboard(mirrored)
    steps = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert steps == {
        "preview/grid": [2, 4],
        "preview/stage_1": [2, 4],
        "preview/stage_2": [2, 4],
        "final/grid": [4],
        "final/stage_1": [4],
        "final/stage_2": [4],
    }
    shown = png(events.Images("final/grid")[0].encoded_image_string)
    written = png(mirrored / "samples" / "grid.png")  # grey, shown at twice the size
    assert shown.shape[:2] == written[::2, ::2].shape and np.array_equal(shown[..., 0], written[::2, ::2])
    preview = png(events.Images("preview/grid")[0].encoded_image_string)[..., 0]
    assert np.array_equal(preview, png(mirrored / "samples" / "preview-000000002.png")[::2, ::2])
    stage_1 = png(events.Images("final/stage_1")[0].encoded_image_string)
    assert stage_1.shape == shown.shape and not np.array_equal(stage_1, shown)  # the coarse stage's estimate


# --------------------------------------------------------------------------- W&B

BLOCK, CHUNK_HEADER = 32768, 7  # W&B's transaction log: LevelDB's log format


def wandb_records(path: Path) -> list:
    """The protobuf records of one offline W&B run file (`run-ID.wandb`): a 7-byte header
    (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks of chunks, each a 4-byte
    checksum, a 2-byte length and a type (1 whole record; 2, 3, 4 its first, middle and last
    pieces); a block's tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, pieces = [], CHUNK_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zero padding: the rest of the block
            pos += left
            continue
        pieces += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_runs(run: Path) -> list[Path]:
    """The offline W&B run folders in `run`, oldest first."""
    return sorted(run.glob("wandb/offline-run-*"))


def wandb_history(folder: Path) -> dict[int, dict]:
    """step → what the W&B run recorded at it (a logged image's fields under its tag)."""
    (log,) = folder.glob("run-*.wandb")
    history: dict[int, dict] = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            items = {}
            for item in record.history.item:
                key, value = [item.key] if item.key else list(item.nested_key), json.loads(item.value_json)
                if len(key) == 1:
                    items[key[0]] = value
                else:  # an image: its tag, then the field
                    items.setdefault(key[0], {})["/".join(key[1:])] = value
            history.setdefault(int(items["_step"]), {}).update(items)
    return history


def wandb_run_record(folder: Path):
    (log,) = folder.glob("run-*.wandb")
    return next(r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run")


def test_the_offline_wandb_run_records_the_stats_jsonl_values_and_the_images(mirrored):
    (folder,) = wandb_runs(mirrored)
    history = wandb_history(folder)
    rows = stats_rows(mirrored)
    assert sorted(history) == [row["step"] for row in rows] == [2, 3, 4]
    for row in rows:
        logged = history[row["step"]]
        for tag, value in scalars_of(row).items():
            assert logged[tag] == value, (row["step"], tag)  # JSON both ways: the same numbers exactly
        assert "mfu" not in logged and "step" not in logged
    assert history[2]["loss/level_1"] == rows[0]["loss_level"][1]
    assert history[3]["eval_swd"] == 0.5 + 3 / 8
    for step, tags in ((2, ["preview/grid", "preview/stage_1", "preview/stage_2"]), (4, ["final/grid"])):
        for tag in tags:
            assert history[step][tag]["_type"] == "image-file", (step, tag)
    grid = png(folder / "files" / history[4]["final/grid"]["path"])
    assert np.array_equal(
        grid.reshape(grid.shape[0], grid.shape[1], -1)[..., 0], png(mirrored / "samples" / "grid.png")[::2, ::2]
    )


def test_the_wandb_run_has_its_name_group_and_the_recipe_as_config(mirrored):
    (folder,) = wandb_runs(mirrored)
    record = wandb_run_record(folder)
    assert record.run_id == (mirrored / WANDB_ID).read_text().strip() and folder.name.endswith(record.run_id)
    assert (record.display_name, record.run_group) == ("steps=4-abc", "tiny sweep")
    config = {item.key: json.loads(item.value_json) for item in record.config.update}
    assert config["train"]["steps"] == 4 and config["train"]["log_to"] == ["jsonl", "tensorboard", "wandb"]
    assert config["model"]["name"] == "DFM-N/4"
    assert config["ablate"] == {"settings": {"train.steps": 4}}


# --------------------------------------------------------------------------- resume


def test_a_resumed_run_continues_its_wandb_run_and_tensorboard_shows_each_step_once(tmp_path):
    run = tmp_path / "run"
    mirrors = ['train.log_to=["jsonl", "tensorboard", "wandb"]', "train.log_every=1", "train.preview_every=0"]
    train_tiny(run, *mirrors)
    # as if killed after logging step 4 but before its checkpoint was on disk: resumes from step 2
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    first_id = (run / WANDB_ID).read_text()
    train_tiny(run, *mirrors)
    rows = stats_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    found = tb_scalars(run)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for key, value in expected_scalars(run).items():
        # the first process's steps 3 and 4 are purged: one value per step, the resumed one
        assert found[key] == [np.float32(value)], key
    assert found[("images_per_s", 3)] == [np.float32(rows[2]["images_per_s"])]  # a timing: differs per process
    # one W&B run (the same id) in two offline pieces, the second from the resumed step on
    assert (run / WANDB_ID).read_text() == first_id
    first, second = wandb_runs(run)
    assert wandb_run_record(first).run_id == wandb_run_record(second).run_id == first_id.strip()
    assert sorted(wandb_history(first)) == [1, 2, 3, 4] and sorted(wandb_history(second)) == [3, 4]
    assert wandb_history(second)[4]["loss"] == rows[3]["loss"]
    # run again once finished, nothing to do: no new W&B piece, no new event file
    train_tiny(run, *mirrors)
    assert len(wandb_runs(run)) == 2 and len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_only_stats_jsonl_by_default_and_log_to_may_change_on_resume(tmp_path):
    run = tmp_path / "run"
    train_tiny(run, "train.steps=2", "train.preview_every=0")
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()
    train_tiny(run, "train.preview_every=0", 'train.log_to=["jsonl", "tensorboard"]')  # continues to step 4
    found = tb_scalars(run)
    assert {step for tag, step in found if tag == "loss"} == {4}  # the mirror starts where it was turned on
    assert found[("loss", 4)] == [np.float32(stats_rows(run)[-1]["loss"])]


@pytest.mark.e2e  # a whole autoencoder training and export in-process (as tests/test_autoencoder.py's)
def test_the_autoencoder_run_mirrors_its_stats_and_reconstructions(tmp_path):
    run = tmp_path / "ae"
    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / "ae.toml",
        ["ae.stats_num=16", "train.steps=2", "train.log_every=1", "train.checkpoint_every=2", ALL],
    )
    from dfm_cli.training import autoencoder

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(autoencoder, "REPORT_NUM", 8)
    try:
        autoencoder.train_autoencoder(recipe, run, Console(quiet=True))
    finally:
        monkeypatch.undo()
        settle_wandb()
    found = tb_scalars(run)
    for row in stats_rows(run):
        for tag, value in scalars_of(row).items():
            assert found[(tag, row["step"])] == [np.float32(value)]
    assert {"loss", "psnr"} <= {tag for tag, _ in found}
    assert [e.step for e in tensorboard(run).Images("final/reconstruction")] == [2]
    (folder,) = wandb_runs(run)
    history = wandb_history(folder)
    assert [history[r["step"]]["psnr"] for r in stats_rows(run)] == [r["psnr"] for r in stats_rows(run)]
    assert history[2]["final/reconstruction"]["_type"] == "image-file"


# --------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    "value, message",
    [
        ('["jsonl", "tensorbord"]', "unknown 'tensorbord': choose from jsonl, tensorboard, wandb; did you mean"),
        ('["jsonl", "mlflow"]', "unknown 'mlflow': choose from jsonl, tensorboard, wandb"),
        ('["tensorboard"]', 'must include "jsonl": stats.jsonl is the run\'s record'),
        ('["jsonl", "wandb", "wandb"]', "names an entry twice"),
    ],
)
def test_a_bad_log_to_is_a_one_line_error_listing_the_choices(value, message):
    with pytest.raises(DfmError) as e:
        load_recipe(TINY, [f"train.log_to={value}"])
    assert "train.log_to" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_with_the_pip_command(package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # `import PACKAGE` now fails as if not installed
    want = f"train.log_to includes '{package}' but the {package} package is not installed: "
    want += f"pip install 'dfm-cli[{package}]'"
    with pytest.raises(DfmError, match=r"^" + want.replace("[", r"\[").replace("]", r"\]") + "$"):
        require(["jsonl", package])
    require(["jsonl"])  # stats.jsonl needs nothing
    # `dfm train`: exit code 2, the one line, before any step (the new folder is not left behind)
    result = cli("train", TINY, "--set", f'train.log_to=["jsonl", "{package}"]', "--out", tmp_path / "run")
    assert result.exit_code == 2 and want in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_bad_wandb_config_from_the_environment_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("DFM_WANDB_CONFIG", "[1, 2]")
    logs = RunLogs(tmp_path, ["jsonl", "wandb"], 0, {"train": {}})
    with pytest.raises(DfmError, match="DFM_WANDB_CONFIG = '\\[1, 2\\]': give a JSON object"), logs:
        logs.scalars(1, {"step": 1, "loss": 1.0})
    assert (tmp_path / "stats.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # the record is kept


# --------------------------------------------------------------------------- the acceptance run


@pytest.mark.e2e
def test_dfm_train_with_tensorboard_leaves_event_files_with_the_stats_values(tmp_path):
    run = tmp_path / "run"
    run_dfm("train", TINY, "--out", run, "--set", "train.steps=4", "--set", 'train.log_to=["jsonl", "tensorboard"]')
    expected = expected_scalars(run)
    found = tb_scalars(run)
    assert set(found) == set(expected) and len(expected) > 20
    assert all(found[key] == [np.float32(value)] for key, value in expected.items())
    assert not (run / "wandb").exists()
