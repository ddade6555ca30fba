"""Embed the plates of manifests with a checkpoint into the feature store (one-off).

    python jobs/embed.py --config configs/demo.yaml --manifest demo_output/screen/heldout.parquet [--checkpoint PATH]
    ray job submit --working-dir . -- python jobs/embed.py --config configs/demo.yaml --manifest ...
"""

import argparse
import sys

from cellfm.cli import run_main
from cellfm.commands import embed


def main() -> None:
    parser = argparse.ArgumentParser(description=embed.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    embed.add_arguments(parser)
    sys.exit(embed.run(parser.parse_args()))


if __name__ == "__main__":
    run_main(main)
