"""`cellfm embed` as a script, for `ray job submit --working-dir . -- python jobs/embed.py ...` (see `cellfm embed --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
