"""The two errors of ``python -m openclip_tau.train`` and which rank prints them."""

from __future__ import annotations

from open_clip_train.distributed import world_info_from_env


class TrainingSetupError(ValueError):
    """A problem with the command line or the data found before training starts."""


class UpstreamDriftError(RuntimeError):
    """open_clip_train no longer calls a name that openclip_tau replaces (loss, save)."""


def prints_errors() -> bool:
    """Whether this process prints setup errors: rank 0 of the launcher (torchrun, SLURM, MPI),
    or a process started alone. The other ranks find the same error and exit quietly with the
    same code, so a bad command line gives one line, not one per rank."""
    return world_info_from_env()[1] == 0
