"""Keep the feature store current (the scheduled job): embed what features.manifests has and the store lacks.

    python jobs/refresh.py --config configs/demo.yaml [--dry-run] [section.key=value ...]
    ray job submit --working-dir . -- python jobs/refresh.py --config configs/demo.yaml
"""

import argparse
import sys

from cellfm.cli import run_main
from cellfm.commands import refresh


def main() -> None:
    parser = argparse.ArgumentParser(description=refresh.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    refresh.add_arguments(parser)
    sys.exit(refresh.run(parser.parse_args()))


if __name__ == "__main__":
    run_main(main)
