"""OpenCLIP's own training loop with a ``--loss`` choice: clip, siglip, sogclr, isogclr, rgclg,
tempnet, dystress (``python -m openclip_tau.train``; the OpenCLIP guide of the documentation).

Nothing of the training loop is copied: ``open_clip_train.main.main`` runs as it is, with the
names it bound at import replaced for the duration of the run. The package is split as
``open_clip_train`` is:

- :mod:`~openclip_tau.train.options`: our options (from :mod:`openclip_tau.registry`'s loss
  table) and their parser;
- :mod:`~openclip_tau.train.patches`: every replaced ``open_clip_train`` name, installed and
  removed in one place, and the guards that detect upstream drift;
- :mod:`~openclip_tau.train.checks`: the refusals made before the model is built;
- :mod:`~openclip_tau.train.checkpoint`: the loss state in checkpoints, resume, the optimizer's
  temperature groups;
- :mod:`~openclip_tau.train.monitoring`: statistics, the model's ``logit_scale``, logging;
- :mod:`~openclip_tau.train.errors`: its two errors and which rank prints them;
- :mod:`~openclip_tau.train.training`: :class:`LossTraining`, which coordinates them;
- :mod:`~openclip_tau.train.command`: the entry points :func:`main` and :func:`cli`.

The names below load on first use, so that ``--help`` answers without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tau_core.lazy import lazy_exports

if TYPE_CHECKING:
    from openclip_tau.flags import (
        option_flag,
    )
    from openclip_tau.losses import (
        DySTreSSClipLoss,
        ISogCLRClipLoss,
        RGCLGClipLoss,
        SogCLRClipLoss,
        TempNetClipLoss,
    )
    from openclip_tau.registry import (
        LOSSES,
        LossSpec,
        Temperature,
    )
    from openclip_tau.train.checkpoint import (
        CHECKPOINT_KEYS,
        TEMPERATURE_GROUP,
        read_loss_entries,
        shard_folder_name,
        temperature_groups,
        without_temperature_groups,
    )
    from openclip_tau.train.checks import (
        csv_rows,
        model_embed_dim,
        read_key_index,
    )
    from openclip_tau.train.command import (
        cli,
        main,
    )
    from openclip_tau.train.errors import (
        TrainingSetupError,
        UpstreamDriftError,
        prints_errors,
    )
    from openclip_tau.train.monitoring import (
        OWN_LOGGERS,
        SHARD_SAMPLE_ROWS,
        quantile_stats,
        setup_logging,
        sharded_sample,
        state_checksums,
    )
    from openclip_tau.train.options import (
        INFINITY_ALLOWED,
        LOSS_CHOICES,
        LOSS_OPTIONS,
        OFF_AT_ZERO,
        STATEFUL_LOSSES,
        SWITCHES,
        build_loss,
        build_parser,
        loss_kwargs,
        parse_loss_args,
        with_flag_names,
    )
    from openclip_tau.train.patches import (
        distributed_data_parallel,
        zero_shot_accuracy,
    )
    from openclip_tau.train.training import (
        IndexedLoss,
        LossTraining,
        run_training,
    )

__all__ = [
    "CHECKPOINT_KEYS",
    "DySTreSSClipLoss",
    "INFINITY_ALLOWED",
    "ISogCLRClipLoss",
    "IndexedLoss",
    "LOSSES",
    "LOSS_CHOICES",
    "LOSS_OPTIONS",
    "LossSpec",
    "LossTraining",
    "OFF_AT_ZERO",
    "OWN_LOGGERS",
    "RGCLGClipLoss",
    "SHARD_SAMPLE_ROWS",
    "STATEFUL_LOSSES",
    "SWITCHES",
    "SogCLRClipLoss",
    "TEMPERATURE_GROUP",
    "TempNetClipLoss",
    "Temperature",
    "TrainingSetupError",
    "UpstreamDriftError",
    "build_loss",
    "build_parser",
    "cli",
    "csv_rows",
    "distributed_data_parallel",
    "loss_kwargs",
    "main",
    "model_embed_dim",
    "option_flag",
    "parse_loss_args",
    "prints_errors",
    "quantile_stats",
    "read_key_index",
    "read_loss_entries",
    "run_training",
    "setup_logging",
    "shard_folder_name",
    "sharded_sample",
    "state_checksums",
    "temperature_groups",
    "with_flag_names",
    "without_temperature_groups",
    "zero_shot_accuracy",
]

__getattr__, __dir__ = lazy_exports(__name__)
