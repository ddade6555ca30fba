"""One module per `cellfm` subcommand: DESCRIPTION, add_arguments(parser), run(args) -> exit code."""
