"""Entry point: ``python -m recipes.longtail``."""

import sys
import time

# Taken before the heavy imports, so that the report's total time includes them.
STARTED = time.time()

from recipes.longtail.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
