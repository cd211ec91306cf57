"""`dfm ablate`: a sweep of recipes trained, sampled and scored as one resumable study.

Cells whose recipes differ only in `sample.*` keys share one trained run; cells that differ
only in `train.seed` (`seeds = N`, or a swept seed) are the seed replicates of one results
row, each with its own run. Train, sample and eval go through the public CLI in subprocesses
(`python -m dfm_cli train|sample|eval`), the most stable interface of the library. Every run
folder (`runs/<id>`) and cell folder (`cells/<id>`) holds an `ablate.json` manifest with its
resolved settings; the id ends in a hash of those settings, so an edited cell gets a new
folder and old outputs are never mixed in. A finished run or cell is reused; an unfinished
one is continued (`dfm train` and `dfm sample --num` both resume by themselves).

One module per step, each importing only the ones before it:
- `sweep`: the sweep file's schema, read and validated into cells before anything runs;
- `compute`: training and sampling FLOPs, and the `--dry-run` plan with its time estimates;
- `layout`: where a sweep's outputs live, and the manifests that make a rerun resume;
- `results`: `results.csv` (per run) / `results.md` (per row: mean ± std, ratio intervals), the plots;
- `execute`: running a sweep, cell by cell, through the CLI.
"""
