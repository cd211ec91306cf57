"""dfm: Decomposable Flow Matching (arXiv 2506.19839) as a library and the `dfm` command."""

__version__ = "0.1.0"
