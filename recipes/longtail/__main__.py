"""Entry point: ``python -m recipes.longtail``."""

import sys

from recipes.longtail.run import main

if __name__ == "__main__":
    sys.exit(main())
