"""`cellfm demo` as a script, for `ray job submit --working-dir . -- python jobs/demo.py ...` (see `cellfm demo --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
