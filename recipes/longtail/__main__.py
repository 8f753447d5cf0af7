"""Entry point: ``python -m recipes.longtail``."""

import sys
import time

# Taken before the heavy imports, so that the report's total time includes them.
STARTED = time.time()


def cli() -> int:
    """Parses first (``--help`` and bad options answer before the heavy imports), then runs."""
    from recipes.longtail.cli import build_parser

    build_parser().parse_args()
    from recipes.longtail.run import main

    return main(started=STARTED)


if __name__ == "__main__":
    sys.exit(cli())
