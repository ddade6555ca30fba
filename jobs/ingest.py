"""`cellfm ingest` as a script, for `ray job submit --working-dir . -- python jobs/ingest.py ...` (see `cellfm ingest --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
