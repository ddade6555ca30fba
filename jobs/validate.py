"""`cellfm validate` as a script, for `ray job submit --working-dir . -- python jobs/validate.py ...` (see `cellfm validate --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
