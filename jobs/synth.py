"""`cellfm synth` as a script, for `ray job submit --working-dir . -- python jobs/synth.py ...` (see `cellfm synth --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
