"""Where a run's statistics go (`train.log_to`): `stats.jsonl`, and its mirrors in TensorBoard
and Weights & Biases.

`stats.jsonl` is the run's record: resuming cuts it back to the checkpoint, and `dfm ablate`
reads its curves. So `train.log_to` always names it ("jsonl", the default and the checks'
rule), and "tensorboard" and "wandb" mirror it: each line written to `stats.jsonl` goes to
them at the line's step, with its lists flattened (`loss_level` → `loss/level_0`,
`loss/level_1`, …; `loss_t_bin` → `loss/t_bin_0`, …) and what is not a number left out (a
level never active in the interval, `mfu` without a known peak). The images the run writes
(each preview grid, the final grid, and with them the clean estimate at the end of each
stage) go to the mirrors too, at their step, as `preview/…` and `final/…` (a video's
first frame).

- TensorBoard: event files in `RUN/tensorboard/`, through `torch.utils.tensorboard`. A
  resumed run's writer starts with `purge_step` = the resumed step + 1, so TensorBoard hides
  what an earlier process logged after that checkpoint, as `stats.jsonl` drops those lines.
- W&B: `RUN/wandb/`, offline unless `WANDB_MODE` says otherwise (`wandb sync
  RUN/wandb/offline-run-*` uploads an offline run). The project is `WANDB_PROJECT` or
  "dfm", the name `DFM_WANDB_NAME` or the run folder's, the group `DFM_WANDB_GROUP`, and the
  config the resolved recipe plus the JSON object in `DFM_WANDB_CONFIG` (`dfm ablate` sets
  these three). The run's id is kept in `RUN/wandb/run-id`, so a resumed training continues
  the same W&B run; W&B's history only moves forward, so steps it already holds keep their
  first values (the same numbers: a resumed run repeats its steps exactly, timings aside).

Only rank 0 logs. The mirrors open at their first line or image, so a finished run run again
opens none.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TextIO

import numpy as np
from PIL import Image

from dfm_cli.config.checks import LOG_TO
from dfm_cli.errors import DfmError

INSTALL = {"tensorboard": "pip install 'dfm-cli[tensorboard]'", "wandb": "pip install 'dfm-cli[wandb]'"}
MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}
LIST_TAGS = {"loss_level": "loss/level_{}", "loss_t_bin": "loss/t_bin_{}"}  # others: "<key>/<i>"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID = Path("wandb") / "run-id"
WANDB_ENV = ("DFM_WANDB_GROUP", "DFM_WANDB_NAME", "DFM_WANDB_CONFIG")  # what `dfm ablate` sets


class Logger(Protocol):
    """One destination of the run's statistics."""

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        """One `stats.jsonl` line (it holds `step` too)."""

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 image, `H W` or `H W C`."""

    def close(self, failed: bool = False) -> None: ...


def require(log_to: Sequence[str]) -> None:
    """Import what each mirror in `log_to` needs, or stop with one line giving the pip command
    (before any work: every rank checks, so none waits for one that stopped)."""
    for name in log_to:
        for module in MODULES.get(name, ()):
            try:
                importlib.import_module(module)
            except ImportError as e:
                if e.name == name:
                    raise DfmError(
                        f"train.log_to includes {name!r} but the {name} package is not installed: {INSTALL[name]}"
                    ) from None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DfmError(
                    f"train.log_to includes {name!r} but {module} cannot be imported ({first}); "
                    f"reinstall it: {INSTALL[name]}"
                ) from None


def scalars_of(row: dict[str, Any]) -> dict[str, int | float]:
    """A stats line as the mirrors' scalars: lists flattened, non-numbers and `step` (the x
    axis) left out.

    >>> scalars_of({"step": 4, "loss": 0.5, "loss_level": [0.25, None], "mfu": None, "who": "x"})
    {'loss': 0.5, 'loss/level_0': 0.25}
    >>> scalars_of({"step": 4, "loss_t_bin": [0.1, 0.2], "betas": [0.9]})
    {'loss/t_bin_0': 0.1, 'loss/t_bin_1': 0.2, 'betas/0': 0.9}
    """
    out: dict[str, int | float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, list):
            tag = LIST_TAGS.get(key, key + "/{}")
            out.update({tag.format(i): v for i, v in enumerate(value) if _number(v)})
        elif _number(value):
            out[key] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_image(image: np.ndarray | str | Path) -> np.ndarray:
    """A uint8 `H W` or `H W C` array, from an array or an image file (a video's first frame)."""
    if isinstance(image, str | Path):
        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    return np.ascontiguousarray(image, dtype=np.uint8)


class JsonlLogger:
    """`stats.jsonl`: one JSON line per call, appended and flushed (the run's record)."""

    def __init__(self, path: Path) -> None:
        self.file: TextIO = path.open("a")

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """The run folder already holds the image files."""

    def close(self, failed: bool = False) -> None:
        self.file.close()


class TensorBoardLogger:
    """Event files in `RUN/tensorboard/`; a resumed run purges what followed its checkpoint."""

    def __init__(self, run_dir: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start + 1 if start else None)

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        for tag, value in scalars_of(row).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC" if image.ndim == 3 else "HW")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def wandb_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """The W&B run's config: the recipe, and the JSON object in `DFM_WANDB_CONFIG`."""
    extra = os.environ.get("DFM_WANDB_CONFIG", "")
    if not extra:
        return recipe
    try:
        more = json.loads(extra)
    except ValueError as e:
        raise DfmError(f"DFM_WANDB_CONFIG is not valid JSON ({e}); give a JSON object or unset it") from None
    if not isinstance(more, dict):
        raise DfmError(f"DFM_WANDB_CONFIG = {extra[:80]!r}: give a JSON object (key: value pairs), or unset it")
    return {**recipe, **more}


class WandbLogger:
    """A W&B run in `RUN/wandb/`, offline by default, continued by the resumed training."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        id_file = run_dir / WANDB_ID
        saved = id_file.read_text().strip() if id_file.is_file() else ""
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "dfm",
                dir=str(run_dir),
                id=saved or None,
                resume="allow" if saved else None,
                name=os.environ.get("DFM_WANDB_NAME") or run_dir.resolve().name,
                group=os.environ.get("DFM_WANDB_GROUP") or None,
                config=wandb_config(recipe),
                mode=os.environ.get("WANDB_MODE") or "offline",  # type: ignore[arg-type]
            )
        except wandb.errors.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DfmError(f"train.log_to includes 'wandb', but W&B could not start a run: {first}") from None
        if not saved:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(f"{self.run.id}\n")

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(scalars_of(row), step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


MIRRORS: dict[str, Callable[[Path, int, dict[str, Any]], Logger]] = {
    "tensorboard": lambda run_dir, start, recipe: TensorBoardLogger(run_dir, start),
    "wandb": lambda run_dir, start, recipe: WandbLogger(run_dir, recipe),
}
assert set(MIRRORS) | {"jsonl"} == set(LOG_TO)


class RunLogs:
    """`stats.jsonl` and the mirrors `log_to` names, for one training process: rank 0 logs,
    the others (`main = False`) do nothing. `recipe` is the resolved recipe as a dict (W&B's
    config), `start` the step the run resumes from."""

    def __init__(
        self, run_dir: Path, log_to: Sequence[str], start: int, recipe: dict[str, Any], main: bool = True
    ) -> None:
        self.run_dir, self.start, self.recipe = run_dir, start, recipe
        self.jsonl = JsonlLogger(run_dir / "stats.jsonl") if main and "jsonl" in log_to else None
        self.wanted = [name for name in log_to if name in MIRRORS] if main else []
        self.opened: list[Logger] | None = None

    def _mirrors(self) -> list[Logger]:
        if self.opened is None:
            self.opened = []
            for name in self.wanted:  # one failing to open closes those opened before it
                try:
                    self.opened.append(MIRRORS[name](self.run_dir, self.start, self.recipe))
                except BaseException:
                    self.close(failed=True)
                    raise
        return self.opened

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        if self.jsonl:
            self.jsonl.scalars(step, row)
        for logger in self._mirrors():
            logger.scalars(step, row)

    def image(self, step: int, tag: str, image: np.ndarray | str | Path) -> None:
        if self.wanted:
            array = as_image(image)
            for logger in self._mirrors():
                logger.image(step, tag, array)

    def close(self, failed: bool = False) -> None:
        loggers, self.opened = [*(self.opened or []), *([self.jsonl] if self.jsonl else [])], []
        self.jsonl = None
        for logger in loggers:
            logger.close(failed)

    def __enter__(self) -> RunLogs:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)
