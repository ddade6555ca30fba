"""`cellfm sweep` as a script, for `ray job submit --working-dir . -- python jobs/sweep.py ...` (see `cellfm sweep --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
