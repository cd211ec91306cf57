"""`dfm ablate` with seeds: `seeds = N`, rows of seed replicates, mean ± std, the ratio
intervals, resuming, the curves against training FLOPs and the compute to reach the baseline."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, run_dfm
from rich.console import Console
from test_ablate import FakeDfm, write_sweep

from dfm_cli.ablate import compute
from dfm_cli.ablate.compute import train_compute
from dfm_cli.ablate.execute import run_sweep
from dfm_cli.ablate.layout import run_dir
from dfm_cli.ablate.sweep import load_sweep
from dfm_cli.errors import DfmError

GRID = '[grid]\n"train.steps" = [4, 8]\n"sample.cfg" = [1.0, 3.0]\n'
T_975_2 = 4.302652729749462  # Student's t, 0.975 quantile, 2 degrees of freedom


def test_seeds_train_every_cell_from_its_own_seed_and_group_the_replicates_into_rows(tmp_path):
    one = load_sweep(write_sweep(tmp_path, GRID, "one.toml"))
    three = load_sweep(write_sweep(tmp_path, "seeds = 3\n" + GRID, "three.toml"))
    names = ["steps=4 cfg=1", "steps=4 cfg=3", "steps=8 cfg=1", "steps=8 cfg=3"]
    assert [r.name for r in three.rows] == names and all(r.seeds == [0, 1, 2] for r in three.rows)
    assert len(three.cells) == 12 and len(three.runs) == 6  # cfg is still shared within each seed
    assert [c.seed for c in three.cells] == [0] * 4 + [1] * 4 + [2] * 4  # every row's first seed first
    # the first seed keeps a single-seed sweep's names and folders; the others are named by their seed
    assert [(c.name, c.run_id, c.cell_id) for c in three.cells[:4]] == [
        (c.name, c.run_id, c.cell_id) for c in one.cells
    ]
    assert three.cells[5].name == "steps=4 cfg=3 seed=1" and three.cells[5].run_id.startswith("steps=4-seed=1-")
    assert "train.seed=1" in three.cells[5].overrides and three.cells[5].recipe.train.seed == 1
    assert three.seeded and not one.seeded and [len(r.cells) for r in one.rows] == [1] * 4
    # a seed set by the base or the cell is the first one
    five = load_sweep(write_sweep(tmp_path, 'seeds = 2\n[set]\n"train.seed" = 5\n' + GRID, "five.toml"))
    assert all(r.seeds == [5, 6] for r in five.rows)


def test_cells_that_vary_train_seed_are_one_row(tmp_path):
    from dfm_cli.ablate.sweep import baseline_rows

    path = write_sweep(
        tmp_path, 'baseline = {"sample.cfg" = 1.0}\n[grid]\n"train.seed" = [0, 1]\n"sample.cfg" = [1.0, 3.0]\n'
    )
    sweep = load_sweep(path)
    assert [c.name for c in sweep.cells] == ["seed=0 cfg=1", "seed=0 cfg=3", "seed=1 cfg=1", "seed=1 cfg=3"]
    assert [(r.name, r.seeds) for r in sweep.rows] == [("cfg=1", [0, 1]), ("cfg=3", [0, 1])]
    assert sweep.swept == ["sample.cfg"] and sweep.seeded
    assert {k: v.name for k, v in baseline_rows(sweep).items() if v} == {"cfg=1": "cfg=1", "cfg=3": "cfg=1"}
    with pytest.raises(DfmError, match="both train row 'cfg=1' with train.seed = 1") as e:
        load_sweep(write_sweep(tmp_path, 'seeds = 2\n[grid]\n"train.seed" = [0, 1]\n"sample.cfg" = [1.0]\n', "d.toml"))
    assert str(tmp_path / "d.toml") in str(e.value)


def test_a_cell_may_train_fewer_seeds_than_the_sweep(tmp_path):
    cells = '[[cell]]\nname = "short"\n\n[[cell]]\nname = "long"\nseeds = 1\n"train.steps" = 8\n'
    sweep = load_sweep(write_sweep(tmp_path, "seeds = 3\n" + cells))
    assert [(r.name, r.seeds) for r in sweep.rows] == [("short", [0, 1, 2]), ("long", [0])]
    assert [c.name for c in sweep.cells] == ["short", "long", "short seed=1", "short seed=2"]
    assert "seeds" not in sweep.swept and sweep.cells[1].recipe.train.steps == 8
    with pytest.raises(DfmError, match=r"\[\[cell\]\] 'long' seeds = 0: give the number of training seeds"):
        load_sweep(write_sweep(tmp_path, "seeds = 3\n" + cells.replace("seeds = 1", "seeds = 0"), "bad.toml"))


@pytest.mark.parametrize("value", ["0", "-2", "1.5", '"3"', "true", "[2]"])
def test_a_bad_seeds_value_is_one_line_naming_the_sweep_and_key(tmp_path, value):
    path = write_sweep(tmp_path, f"seeds = {value}\n" + GRID)
    with pytest.raises(DfmError) as e:
        load_sweep(path)
    assert f"{path}: seeds = " in str(e.value) and "at least 1" in str(e.value) and "\n" not in str(e.value)
    result = cli("ablate", path, "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: {e.value}"]


def test_t_quantile_matches_scipy():
    from scipy.stats import t

    from dfm_cli.ablate.statistics import t_quantile

    for df in [*range(1, 41), 60, 100, 250]:
        for p in (0.5, 0.6, 0.9, 0.975, 0.995, 0.999, 0.025):
            assert t_quantile(p, df) == pytest.approx(t.ppf(p, df), rel=1e-10, abs=1e-12), (p, df)
    assert t_quantile(0.975, 2) == pytest.approx(T_975_2, rel=1e-12)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_mean_std_and_the_ratio_interval_by_hand():
    from dfm_cli.ablate.statistics import Ratio, mean_std, ratio_interval

    assert mean_std([2.0, 3.0, 7.0]) == (4.0, pytest.approx(math.sqrt(7.0)))  # ((-2)² + (-1)² + 3²) / 2
    assert mean_std([5.0]) == (5.0, None)
    # paired by seed: ratios 2, 1.5, 3.5; a t-interval on their logs
    r = ratio_interval({0: 2.0, 1: 3.0, 2: 7.0}, {2: 2.0, 0: 1.0, 1: 2.0})
    logs = [math.log(2.0), math.log(1.5), math.log(3.5)]
    m = sum(logs) / 3
    half = T_975_2 * math.sqrt(sum((v - m) ** 2 for v in logs) / 2) / math.sqrt(3)
    assert r.value == pytest.approx(10.5 ** (1 / 3)) and r.pairs == 3
    assert (r.low, r.high) == (pytest.approx(math.exp(m - half)), pytest.approx(math.exp(m + half)))
    # one seed: the plain ratio, no interval; seeds that do not pair: the ratio of the means
    assert ratio_interval({0: 2.0}, {0: 4.0}) == Ratio(0.5, None, None, 1)
    assert ratio_interval({0: 2.0, 1: 4.0}, {5: 1.0, 6: 2.0}) == Ratio(2.0, None, None, 0)
    assert ratio_interval({0: -1.0, 1: 1.0}, {0: 1.0, 1: 1.0}).low is None  # a log needs positive ratios


class SeededFake(FakeDfm):
    """`FakeDfm` whose runs depend on train.seed: a sample set's pixels are FakeDfm's value + seed²."""

    def __init__(self, fail_after: int | None = None):
        super().__init__(fail_after)
        self.commands: list[list[str]] = []

    def __call__(self, cmd: list[str], log: Path, what: str) -> None:
        super().__call__(cmd, log, what)
        self.commands.append(cmd)
        arg = dict(zip(cmd, cmd[1:]))
        if cmd[3] == "train":
            seeds = [o.split("=")[1] for o in cmd if o.startswith("train.seed=")]
            (Path(arg["--out"]) / "seed").write_text(seeds[-1] if seeds else "0")
        elif cmd[3] == "sample":
            seed = int((Path(cmd[4]) / "seed").read_text())
            with np.load(arg["--out"]) as data:
                images = data["arr_0"]
            np.savez(arg["--out"], arr_0=images + seed**2)


def test_seeded_results_give_mean_std_and_paired_intervals_and_resume(tmp_path):
    body = 'baseline = {"train.steps" = 4}\n[grid]\n"train.steps" = [4, 8]\n[eval]\nmetrics = ["swd"]\nnum = 8\n'
    body += "reference_num = 64\nswd_levels = 2\n"
    out = tmp_path / "out"
    # one seed first: today's layout, no seed column
    fake = SeededFake()
    run_sweep(load_sweep(write_sweep(tmp_path, body, "one.toml")), out, Console(file=io.StringIO()), runner=fake)
    assert fake.calls == ["train", "sample", "eval"] * 2
    assert "seed" not in (out / "results.csv").read_text().splitlines()[0].split(",")
    # three seeds: only the new seeds run, stopped once and resumed; then nothing is left to do
    sweep = load_sweep(write_sweep(tmp_path, "seeds = 3\n" + body, "three.toml"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, Console(file=io.StringIO()), runner=SeededFake(fail_after=4))
    fake = SeededFake()
    lines = run_sweep(sweep, out, Console(file=io.StringIO()), runner=fake)
    assert fake.calls == ["sample", "eval"] + ["train", "sample", "eval"] * 2  # the interrupted cell, then the rest
    assert len(list(out.glob("runs/*/seed"))) == 6
    again = SeededFake()
    assert run_sweep(sweep, out, Console(file=io.StringIO()), runner=again) == lines and again.calls == []
    samples = [c for c in fake.commands if c[3] == "sample"]
    assert samples and all(dict(zip(c, c[1:]))["--seed"] == "0" for c in samples)  # the same sampling noise

    # results.csv: one line per run, per-seed ratios to the baseline's run of the same seed
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["cell"], r["seed"], float(r["swd"])) for r in table] == [
        ("steps=4", "0", 11.0),
        ("steps=4", "1", 12.0),
        ("steps=4", "2", 15.0),
        ("steps=8", "0", 31.0),
        ("steps=8", "1", 32.0),
        ("steps=8", "2", 35.0),
    ]
    assert float(table[4]["swd_vs_baseline"]) == pytest.approx(32 / 12)

    # results.md: mean ± std (ddof = 1), n, and the ratio with its 95% interval
    std = math.sqrt(sum((v - 98 / 3) ** 2 for v in (31, 32, 35)) / 2)  # the same spread in both rows
    logs = [math.log(31 / 11), math.log(32 / 12), math.log(35 / 15)]
    m = sum(logs) / 3
    half = T_975_2 * math.sqrt(sum((v - m) ** 2 for v in logs) / 2) / math.sqrt(3)
    flops = train_compute(sweep.rows[1].cells[0].recipe)[1]
    md = (out / "results.md").read_text()
    assert "| cell | train.steps | train images | train FLOPs | n | swd | swd / baseline [95% CI] |" in md
    assert f"| steps=4 (baseline) | 4 | 32 | {flops / 2:.3g} | 3 | 12.67 ± {std:.2g} | 1.000 |" in md
    ratio = f"{math.exp(m):.3f} [{math.exp(m - half):.3f}, {math.exp(m + half):.3f}]"
    assert f"| steps=8 | 8 | 64 | {flops:.3g} | 3 | 32.67 ± {std:.2g} | {ratio} |" in md
    assert "ddof = 1" in md and "Student-t" in md and "log-ratios" in md and "no interval" in md


def write_curves(run: Path, points: list[tuple[int, float]]) -> None:
    """A run's stats.jsonl with `eval_swd` at (training images, value) points, batch 8."""
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"step": images // 8, "images": images, "eval_swd": value} for images, value in points]
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compute_to_reach_the_baseline_interpolates_the_mean_curve_in_log_flops(tmp_path):
    from dfm_cli.ablate.carry import read_scored
    from dfm_cli.ablate.curves import compute_to_baseline, reach_fraction, row_curves
    from dfm_cli.ablate.results import collect, write_results

    # by hand: halfway between 1e9 and 1e10 in log FLOPs is 10^9.5
    assert reach_fraction([(1e9, 10.0), (1e10, 5.0)], 7.5, 2e10) == (pytest.approx(10**9.5 / 2e10), False)
    assert reach_fraction([(1e9, 10.0), (1e10, 5.0)], 12.0, 1e10) == (0.1, True)  # at the first evaluation
    assert reach_fraction([(1e9, 10.0), (1e10, 9.0)], 5.0, 1e10) == (None, False)  # never
    assert reach_fraction([(1e9, 0.2), (1e10, 0.6)], 0.4, 1e10, higher=True)[0] == pytest.approx(10**9.5 / 1e10)

    sweep = load_sweep(
        write_sweep(tmp_path, 'seeds = 2\nbaseline = {"train.steps" = 4}\n[grid]\n"train.steps" = [4, 8, 2]\n')
    )
    out = tmp_path / "out"
    curves = {  # (steps, seed) -> (images, eval_swd): the means are 21, 11 and 17, 9, 5 and 30
        (4, 0): [(16, 20.0), (32, 10.0)],
        (4, 1): [(16, 22.0), (32, 12.0)],
        (8, 0): [(16, 16.0), (32, 8.0), (64, 4.0)],
        (8, 1): [(16, 18.0), (32, 10.0), (64, 6.0)],
        (2, 0): [(16, 30.0)],
        (2, 1): [(16, 30.0)],
    }
    for cell in sweep.cells:
        write_curves(run_dir(out, cell.run_id), curves[cell.recipe.train.steps, cell.seed])
    per_image = train_compute(sweep.cells[0].recipe)[1] / 32
    lines = collect(sweep, out)
    mean = row_curves(sweep, lines)["steps=8"]["eval_swd"]
    assert mean == [
        (16 * per_image, 17.0, 16.0, 18.0),
        (32 * per_image, 9.0, 8.0, 10.0),
        (64 * per_image, 5.0, 4.0, 6.0),
    ]
    # steps=8 reaches the baseline's final 11 three quarters of the way from 16 to 32 images, in log:
    # 16 · 2^0.75 images, a fraction 2^-0.25 of the baseline's 32
    found = compute_to_baseline(sweep, lines)
    assert found["steps=8"]["eval_swd"] == (pytest.approx(2**-0.25), False)
    assert found["steps=4"]["eval_swd"] == (pytest.approx(1.0), False)
    assert found["steps=2"]["eval_swd"] == (None, False)

    write_results(sweep, lines, out)
    assert (out / "curves.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "## Compute to reach the baseline" in md and "log FLOPs" in md
    assert "| steps=8 | steps=4 | 0.841 |" in md and "| steps=2 | steps=4 | not reached |" in md

    # on a fresh machine, without the runs: results.csv carries the curves too
    for line in lines:  # as if each cell had been scored there
        line["swd"] = 1.0
    write_results(sweep, lines, out)
    carried, stale = read_scored(sweep, out / "results.csv")
    assert stale == 0 and carried["steps=8 seed=1"].curves == "eval_swd@16=18 eval_swd@32=10 eval_swd@64=6"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    again = collect(sweep, fresh, carried)
    assert [line["curves"] for line in again] == [line["curves"] for line in lines]
    write_results(sweep, again, fresh)
    assert (fresh / "curves.png").is_file() and "| steps=8 | steps=4 | 0.841 |" in (fresh / "results.md").read_text()


def test_dry_run_counts_every_seed_and_its_time(tmp_path, monkeypatch):
    monkeypatch.setattr(compute, "TIMING_BUDGET", 0.0)  # per-FLOP constants: no timing
    one = compute.plan(load_sweep(write_sweep(tmp_path, GRID, "one.toml")))
    three = load_sweep(write_sweep(tmp_path, "seeds = 3\n" + GRID, "three.toml"))
    rows = compute.plan(three)
    assert len(rows) == 12 and len({r["run"] for r in rows}) == 6
    assert sum(r["seconds"] for r in rows) == pytest.approx(3 * sum(r["seconds"] for r in one))
    assert all(r["note"] == "" for r in one) and "= 12 cells on 6 trained runs" in rows[0]["note"]
    result = cli("ablate", write_sweep(tmp_path, "seeds = 3\n" + GRID, "three.toml"), "--dry-run")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())  # rich wraps long lines
    assert "12 cells, 6 trained runs" in said and "note: 4 results rows × 3 seeds each = 12 cells" in said


def test_only_runs_the_named_rows_and_the_results_grow_over_the_parts(tmp_path):
    """A long sweep split over sessions: `--only` runs the rows it names, every seed of each;
    the results cover every cell scored so far and are rewritten after each cell, so a stop
    between parts loses nothing; the whole sweep afterwards only runs what is left."""
    body = 'seeds = 2\nbaseline = {"train.steps" = 4}\n' + GRID.replace('"sample.cfg" = [1.0, 3.0]\n', "")
    body += '[eval]\nmetrics = ["swd"]\nnum = 8\nreference_num = 64\nswd_levels = 2\n'
    sweep, out = load_sweep(write_sweep(tmp_path, body)), tmp_path / "out"
    assert [c.name for c in sweep.only(["steps=8"])] == ["steps=8", "steps=8 seed=1"]
    assert sweep.only([]) == sweep.cells and len(sweep.only(["steps=*"])) == 4
    with pytest.raises(DfmError, match=r"--only 'steps=16' names no results row.* The rows are: steps=4; steps=8"):
        sweep.only(["steps=16"])
    fake = SeededFake(fail_after=4)  # stops as the second cell starts sampling
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, Console(file=io.StringIO()), runner=fake, only=["steps=8"])
    assert fake.calls == ["train", "sample", "eval", "train"]
    with (out / "results.csv").open() as fh:  # written after the first cell, before the stop
        assert [(r["cell"], r["seed"], r["swd"]) for r in csv.DictReader(fh)] == [
            ("steps=4", "0", ""),
            ("steps=4", "1", ""),
            ("steps=8", "0", "31.0"),
            ("steps=8", "1", ""),
        ]
    fake = SeededFake()
    run_sweep(sweep, out, Console(file=io.StringIO()), runner=fake)
    assert fake.calls == ["train", "sample", "eval"] * 2 + ["sample", "eval"]  # steps=4's seeds, then the stopped cell
    result = cli("ablate", sweep.path, "--dry-run", "--only", "steps=4")
    assert result.exit_code == 0 and "2 cells, 2 trained runs" in " ".join(result.stdout.split())
    result = cli("ablate", sweep.path, "--only", "steps=2")
    assert result.exit_code == 2 and "names no results row" in result.output and "Traceback" not in result.output


@pytest.mark.e2e
def test_two_seeds_for_real(tmp_path):
    """Two 2-step trainings that differ only in train.seed, evaluated while training: the runs
    differ, and results.csv, results.md and curves.png report them as one row."""
    body = (
        'seeds = 2\nbaseline = "tiny"\n[set]\n"train.steps" = 2\n"train.eval_every" = 2\n'
        '"train.eval_metrics" = ["swd"]\n"train.eval_num" = 8\n"train.eval_reference_num" = 64\n'
        '[[cell]]\nname = "tiny"\n[eval]\nmetrics = ["swd"]\nnum = 8\nreference_num = 64\nswd_levels = 2\n'
    )
    out = tmp_path / "out"
    proc = run_dfm("ablate", write_sweep(tmp_path, body), "--out", out)
    assert "(1 rows, 2 cells, 2 runs with their seeds)" in " ".join(proc.stdout.split())
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["cell"], r["seed"]) for r in table] == [("tiny", "0"), ("tiny", "1")]
    assert table[0]["swd"] != table[1]["swd"]  # another seed, another training
    md = (out / "results.md").read_text()
    assert "| tiny (baseline) | 16 |" in md and " | 2 | " in md and " ± " in md
    assert "| tiny | tiny | ≤ 1 |" in md and (out / "curves.png").is_file()  # one evaluation: at the end


def test_cells_scored_on_another_machine_are_carried_from_its_results_csv(tmp_path):
    """A study split over sessions that each start on a fresh machine: `--scored` reads the
    committed results.csv of the earlier parts, so its cells are not run again and the results
    equal those of one machine that ran everything; lines whose settings changed are left out."""
    body = 'seeds = 2\nbaseline = {"train.steps" = 4}\n' + GRID.replace('"sample.cfg" = [1.0, 3.0]\n', "")
    body += '[eval]\nmetrics = ["swd"]\nnum = 8\nreference_num = 64\nswd_levels = 2\n'
    sweep = load_sweep(write_sweep(tmp_path, body))
    whole = tmp_path / "whole"
    run_sweep(sweep, whole, Console(file=io.StringIO()), runner=SeededFake())
    with (whole / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["cell_id"] for r in table] == [c.cell_id for row in sweep.rows for c in row.cells]

    # everything scored there: nothing runs, and the results are the same lines
    fake, printed = SeededFake(), io.StringIO()
    lines = run_sweep(sweep, tmp_path / "fresh", Console(file=printed), runner=fake, scored=whole / "results.csv")
    assert fake.calls == [] and "4 cells scored there are not run again" in printed.getvalue()
    assert (tmp_path / "fresh" / "results.csv").read_text() == (whole / "results.csv").read_text()
    assert [line["swd"] for line in lines] == [11.0, 12.0, 31.0, 32.0]

    # the earlier part scored the baseline row only: the rest runs, and ratios pair across parts
    part = tmp_path / "part.csv"
    with part.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(table[0]))
        writer.writeheader()
        writer.writerows({**r, "swd": ""} if r["cell"] == "steps=8" else r for r in table)
    fake = SeededFake()
    run_sweep(sweep, tmp_path / "second", Console(file=io.StringIO()), runner=fake, scored=part)
    assert fake.calls == ["train", "sample", "eval"] * 2

    def table_rows(md: Path) -> list[str]:  # the results table (the curves' section needs the runs' stats.jsonl)
        return [line for line in md.read_text().splitlines() if line.startswith("| steps=")][:2]

    assert table_rows(tmp_path / "second" / "results.md") == table_rows(whole / "results.md")
    assert len(table_rows(whole / "results.md")) == 2 and " ± " in table_rows(whole / "results.md")[1]

    # other evaluation settings: each line names a cell that no longer exists, so all of it runs
    changed = load_sweep(write_sweep(tmp_path, body.replace("num = 8\n", "num = 16\n"), "changed.toml"))
    fake, printed = SeededFake(), io.StringIO()
    run_sweep(changed, tmp_path / "third", Console(file=printed), runner=fake, scored=whole / "results.csv")
    assert fake.calls == ["train", "sample", "eval"] * 4
    assert "4 scored lines name no cell of this sweep" in " ".join(printed.getvalue().split())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("just some notes\n", "needs 'cell' and 'run' columns"),
        ("cell,run,swd\nsteps=4,r1,lots\n", "line 2, column 'swd': 'lots' is not a number"),
        ("cell,run,swd,curves\nsteps=4,r1,1.0,eval_swd@64\n", "line 2, column 'curves': 'eval_swd@64' is not"),
    ],
)
def test_a_bad_scored_file_is_one_line_naming_it(tmp_path, content, message):
    body = '[grid]\n"train.steps" = [4, 8]\n[eval]\nmetrics = ["swd"]\nnum = 8\nreference_num = 64\nswd_levels = 2\n'
    sweep = write_sweep(tmp_path, body)
    scored = tmp_path / "results.csv"
    if content is not None:
        scored.write_text(content)
    result = cli("ablate", sweep, "--out", tmp_path / "out", "--scored", scored)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "runs").exists()  # refused before anything ran


def test_dry_run_charges_only_what_is_left(tmp_path, monkeypatch):
    """Planning the next part of a split sweep: runs trained and cells sampled in --out, and
    cells scored in --scored, cost nothing, and the table says which."""
    monkeypatch.setattr(compute, "TIMING_BUDGET", 0.0)
    sweep, out = load_sweep(write_sweep(tmp_path, GRID)), tmp_path / "out"
    whole = compute.plan(sweep, out=out)
    assert [r["done"] for r in whole] == [""] * 4 and all(r["seconds"] > 0 for r in whole)
    fake = SeededFake(fail_after=3)  # the first run trained and its first cell scored, then a stop
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, Console(file=io.StringIO()), runner=fake)
    part = compute.plan(sweep, out=out, carried={"steps=8 cfg=1"})
    assert [r["done"] for r in part] == ["sampled", "trained", "scored", ""]
    assert [r["seconds"] for r in part[:3:2]] == [0.0, 0.0]
    assert part[1]["seconds"] == pytest.approx(whole[1]["seconds"])  # sampling only: its run is trained
    assert part[3]["seconds"] > whole[3]["seconds"]  # it trains the run the scored cell would have
    result = cli("ablate", sweep.path, "--dry-run", "--out", out)
    said = " ".join(result.stdout.split())
    assert result.exit_code == 0 and "(sampled)" in said and "(trained)" in said
    assert "for what is left (1 of 4 cells sampled or scored already" in said
