"""`python -m dfm_cli` runs the `dfm` app (so `torchrun -m dfm_cli train ...` works)."""

from dfm_cli.cli import main

main()
