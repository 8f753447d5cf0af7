"""The entry points of ``python -m openclip_tau.train`` (console script ``openclip-tau-train``).

``--help`` is answered from the parser alone (:mod:`~openclip_tau.train.options`, read from the
registry's source) and upstream's parser, which import no torch; the run itself is imported only
when there is one to run (:func:`~openclip_tau.train.training.run_training`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from openclip_tau.train.errors import TrainingSetupError, prints_errors
from openclip_tau.train.options import build_parser


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Runs ``open_clip_train.main.main`` with the chosen loss; returns what it returns.

    Args:
        argv: The command line without the program name (a leading ``--`` is dropped, as
            torchrun passes it). Default None: ``sys.argv[1:]``.

    Returns:
        What ``open_clip_train.main.main`` returns.

    Raises:
        TrainingSetupError: A refused input, found before the model is built.
        SystemExit: ``--help`` (code 0) or a refused option (code 2, one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m openclip_tau.train -- <args>
        argv = argv[1:]
    if "-h" in argv or "--help" in argv:
        from open_clip_train import params as upstream_params  # argparse only

        print(build_parser().format_help())
        print("\nopen_clip_train.main options:\n")
        upstream_params.parse_args(["--help"])
    from openclip_tau.train.training import run_training

    return run_training(argv)


def cli() -> None:
    """Console entry: setup errors and sample keys outside the table are one line, exit code 2.

    Under torchrun every rank finds a setup error and exits with 2; rank 0 prints it. A sample
    key outside the table is seen by the rank whose data holds it: that rank prints it.

    Raises:
        SystemExit: Always: 0 after training, 2 for a setup error or a bad sample key.
    """
    try:
        code = main()
    except TrainingSetupError as err:
        if prints_errors():
            print(f"openclip_tau.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:
        from open_clip_train.distributed import world_info_from_env

        from openclip_tau.data import SampleKeyError  # loaded already: the run has started

        if not isinstance(err, SampleKeyError):
            raise
        _, rank, world_size = world_info_from_env()
        where = f" (rank {rank})" if world_size > 1 else ""
        print(f"openclip_tau.train: error{where}: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
