"""The two errors of ``python -m openclip_tau.train`` and which rank prints them."""

from __future__ import annotations


class TrainingSetupError(ValueError):
    """A problem with the command line or the data found before training starts.

    :func:`~openclip_tau.train.command.cli` prints its message as one line
    (``openclip_tau.train: error: ...``, rank 0 only) and exits with code 2.
    """


class UpstreamDriftError(RuntimeError):
    """open_clip_train no longer calls a name that openclip_tau replaces (loss, save).

    Raised instead of training on without the loss's state, or writing checkpoints that cannot
    be resumed exactly; the message names the upstream call that went missing.
    """


def prints_errors() -> bool:
    """Whether this process prints setup errors.

    True for rank 0 of the launcher (torchrun, SLURM, MPI: read from the environment) and for a
    process started alone. The other ranks find the same error and exit quietly with the same
    code, so a bad command line gives one line, not one per rank.

    Returns:
        True on rank 0 or without a launcher, False on every other rank.
    """
    # upstream's reading of the launchers' variables (imported here: it loads torch, which
    # ``--help`` does without)
    from open_clip_train.distributed import world_info_from_env

    return world_info_from_env()[1] == 0
