"""The `dfm` subcommands, one module each, registered on `common.app`."""
