"""`dfm ablate`: parse, load the sweep, then list it (--dry-run) or run it (see `dfm_cli/ablate/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import JustifyMethod
from rich.table import Table

from dfm_cli.ablate.carry import read_scored
from dfm_cli.ablate.compute import plan
from dfm_cli.ablate.execute import run_sweep
from dfm_cli.ablate.sweep import load_sweep
from dfm_cli.commands.common import app, console, user_errors

COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("cell", "left"),
    ("run", "left"),
    ("train images", "right"),
    ("train FLOPs", "right"),
    ("est. time", "right"),
)


@app.command()
@user_errors
def ablate(
    sweep: Annotated[
        Path,
        typer.Argument(
            # brackets escaped: Typer renders help as rich markup, which would eat `[grid]`
            help=r"Sweep TOML: a base recipe and a \[grid] and/or [\[cell]] list, e.g. recipes/tiny/ablate.toml."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Sweep folder (default ablations/<sweep name>); re-run to resume.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="List the cells, the runs they share, their compute and the estimated time of what is "
            "left (runs trained and cells sampled in --out, or scored in --scored, cost nothing); run nothing."
        ),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only the results rows this names (a shell pattern on row names, e.g. 'DFM-*'; "
            "repeat for more), every seed of each: to split a long sweep over sessions. "
            "The results cover every cell scored so far."
        ),
    ] = None,
    scored: Annotated[
        Path | None,
        typer.Option(
            help="The results.csv of an earlier part of this sweep, run on another machine (e.g. committed): "
            "the cells it scores with today's settings are not run again and count in the results."
        ),
    ] = None,
) -> None:
    """Train, sample and score every cell of a sweep; writes results.csv, results.md and plots."""
    loaded = load_sweep(sweep)
    folder = out or Path("ablations") / sweep.stem
    if not dry_run:
        run_sweep(loaded, folder, console, only=only, scored=scored)
        return
    carried = read_scored(loaded, scored)[0] if scored is not None else {}
    rows = plan(loaded, loaded.only(only or []), folder, carried)
    table = Table(title=f"{loaded.title}: {len(rows)} cells, {len({r['run'] for r in rows})} trained runs")
    for name, justify in COLUMNS:
        table.add_column(name, justify=justify)
    for row in rows:
        shared = f" (shared by {row['shared']} cells)" if row["shared"] > 1 else ""
        table.add_row(
            row["cell"],
            row["run"] + shared,
            f"{row['train_images']:,}",
            f"{row['train_flops']:.3g}",
            (_duration(row["seconds"]) if row["seconds"] else "–") + (f" ({row['done']})" if row["done"] else ""),
        )
    console.print(table)
    done = sum(row["done"] in ("sampled", "scored") for row in rows)
    where = f"{folder}" + (f" or {scored}" if scored else "")
    left = f" for what is left ({done} of {len(rows)} cells sampled or scored already, in {where})"
    console.print(
        f"total: {_duration(sum(r['seconds'] for r in rows))} on this machine"
        + (left if any(r["done"] for r in rows) else "")
        + f"; time estimates: {'; '.join(sorted({r['estimate'] for r in rows if r['estimate']}))}; "
        "including ~5 s start-up per command; not including the metrics' feature extraction",
        markup=False,
    )
    for note in sorted({r["note"] for r in rows if r["note"]}):
        console.print(f"note: {note}", markup=False)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
