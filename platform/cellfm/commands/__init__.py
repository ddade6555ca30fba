"""One module per `cellfm` subcommand (see cellfm.cli for the interface and the registry)."""
