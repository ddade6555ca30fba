"""`cellfm pretrain` as a script, for `ray job submit --working-dir . -- python jobs/pretrain.py ...` (see `cellfm pretrain --help`)."""

import sys

from cellfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
