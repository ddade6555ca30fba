"""`cellfm evaluate` as a script, for `ray job submit --working-dir . -- python jobs/evaluate.py ...` (see `cellfm evaluate --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
