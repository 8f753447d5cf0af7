"""Console scripts (``[project.scripts]`` in pyproject.toml) for commands whose ``main`` returns
a result object instead of an exit code; each imports its command only when run."""

from __future__ import annotations


def longtail() -> int:
    """``lightly-tau-longtail``: ``python -m recipes.longtail``."""
    from recipes.longtail.__main__ import cli

    return cli()


def simclr() -> int:
    """``lightly-tau-simclr``: ``python -m recipes.simclr.simclr``."""
    from recipes.simclr.simclr import main

    main()
    return 0


def simclr_lightning() -> int:
    """``lightly-tau-simclr-lightning``: ``python -m recipes.simclr.simclr_lightning``."""
    from recipes.simclr.simclr_lightning import main

    main()
    return 0


def cc3m_make_smoke_data() -> int:
    """``openclip-tau-cc3m-make-smoke-data``: ``python -m recipes.cc3m.make_smoke_data``."""
    from recipes.cc3m.make_smoke_data import main

    main()
    return 0
