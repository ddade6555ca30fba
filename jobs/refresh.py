"""`cellfm refresh` as a script, for `ray job submit --working-dir . -- python jobs/refresh.py ...` (see `cellfm refresh --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
