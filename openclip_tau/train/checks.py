"""Early refusals of ``python -m openclip_tau.train``: option combinations (once upstream has
parsed its options), then the files (the ``--resume`` checkpoint, the key index, the csv), all
before the model is built, on every rank."""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
from typing import Optional

import open_clip
from open_clip_train import data as upstream_data
from open_clip_train.distributed import is_using_distributed

from openclip_tau.key_index import KeyIndex, expand_shards, load_key_index, shard_name
from openclip_tau.train.checkpoint import read_loss_entries
from openclip_tau.train.errors import TrainingSetupError
from openclip_tau.train.options import STATEFUL_LOSSES


class InputChecks:
    """The checks of a run (mixed into :class:`~openclip_tau.train.training.LossTraining`):
    :meth:`_check` on upstream's parsed options, :meth:`check_inputs` on the files."""

    def _check(self, args: argparse.Namespace) -> None:
        """Refuses option combinations once upstream has parsed its options (every rank).

        Args:
            args: ``open_clip_train``'s parsed options.

        Raises:
            TrainingSetupError: A combination this loss does not support: ``--siglip``
                without ``--loss siglip``, ``--tau-state`` with a loss without state or in one
                process, a trained temperature with ``--accum-freq`` > 1, distillation, CoCa,
                ``--horovod``, ``--local-loss`` without ``--gather-with-grad``,
                ``--loss-dist-impl``, a ``timm/`` optimizer, ``--tau-fresh-state`` without
                ``--resume``, a dataset type without indices, ``--tau-key-index`` with other
                data than webdataset, or webdataset without a table size.
        """
        if args.siglip and self.loss_name != "siglip":
            raise TrainingSetupError(
                f"--siglip selects upstream's SigLIP loss: use --loss siglip, not --loss {self.loss_name} with --siglip."
            )
        if self.state_layout != "replicated" and not self.stateful:
            raise TrainingSetupError(
                f"--tau-state applies to {', '.join(STATEFUL_LOSSES)} (the losses with "
                f"per-sample state), not --loss {self.loss_name}."
            )
        if self.state_layout == "sharded" and not is_using_distributed():
            raise TrainingSetupError(
                "--tau-state sharded splits the tables over the ranks of torchrun; this run has "
                "one process: use --tau-state replicated."
            )
        if not self.ours:
            return
        name = f"--loss {self.loss_name}"
        if self.trains_temperature and args.accum_freq > 1:
            raise TrainingSetupError(
                f"{name} with --accum-freq {args.accum_freq}: open_clip_train calls the loss "
                f"{args.accum_freq} times per step, each on all of the step's features, so the "
                f"temperature's gradient would be counted {args.accum_freq} times. Use "
                "--accum-freq 1 (a larger --batch-size, or more processes)."
            )
        if args.distill_model or args.distill_pretrained:
            raise TrainingSetupError(f"{name} does not support distillation (--distill-model).")
        if "coca" in args.model.lower():
            raise TrainingSetupError(f"{name} trains CLIP-style models, not CoCa ({args.model}).")
        if args.horovod:
            raise TrainingSetupError(f"{name} needs torch.distributed (torchrun), not --horovod.")
        if args.local_loss and not args.gather_with_grad:
            raise TrainingSetupError(
                f"--local-loss without --gather-with-grad drops the other ranks' gradient in "
                f"upstream's ClipLoss; {name} always computes local anchors against all gathered "
                "candidates with the gradient through the gather (as --local-loss "
                "--gather-with-grad): pass both flags or neither."
            )
        if args.loss_dist_impl is not None:
            raise TrainingSetupError(
                f"--loss-dist-impl {args.loss_dist_impl} selects upstream's SigLIP exchange; "
                f"{name} has one distributed implementation (all-gather with gradient): leave "
                "--loss-dist-impl out."
            )
        if self.spec.trains_temperature and getattr(args, "opt", "adamw").startswith("timm/"):
            raise TrainingSetupError(
                f"{name} adds its temperature group to open_clip_train's AdamW (--opt adamw); "
                f"--opt {args.opt} is not supported with it."
            )
        if self.options.tau_fresh_state and not args.resume:
            raise TrainingSetupError("--tau-fresh-state applies to a --resume run only.")
        if not self.stateful:
            return
        kind = train_data_kind(args)
        if kind is None and args.train_data:
            raise TrainingSetupError(
                f"{name} supports --dataset-type webdataset, csv and synthetic; got "
                f"--dataset-type {args.dataset_type} for {args.train_data}."
            )
        if self.options.tau_key_index and kind != "webdataset":
            raise TrainingSetupError(
                f"--tau-key-index maps webdataset keys; the training data is {kind} "
                "(its index is the row number)."
            )
        if kind == "webdataset" and not (
            self.options.tau_num_samples or self.options.tau_key_index
        ):
            raise TrainingSetupError(
                f"{name} keeps per-sample state and needs the table size for webdataset: pass "
                "--tau-key-index <file> (built once with python -m openclip_tau.key_index "
                "--shards <pattern> --output <file>) or, for integer keys, --tau-num-samples N "
                "larger than every key."
            )

    def check_inputs(self, args: argparse.Namespace) -> None:
        """Refusals that read files: the checkpoint given to ``--resume`` (missing, or not
        resumable with this run's loss, table or sample-to-row map), the key index (missing,
        malformed, or without a training shard), the csv (``--tau-num-samples`` below its rows).

        Called on every rank after ``--resume latest`` is resolved, before the model is built;
        every rank reads the same files, so every rank raises the same error.

        Args:
            args: ``open_clip_train``'s parsed options.

        Raises:
            TrainingSetupError: For each refusal above (the message names the option).
        """
        self.inputs_checked = True
        resume = args.resume
        if resume and "://" not in resume and not os.path.isfile(resume):
            raise TrainingSetupError(f"--resume {resume}: no such file.")
        if self.stateful and (args.train_data or args.dataset_type == "synthetic"):
            self.plan_table(args)
        if resume and "://" not in resume:
            entries = read_loss_entries(resume)
            if entries is not None:
                self._check_resumable(resume, entries)

    def plan_table(self, args: argparse.Namespace) -> None:
        """Table size, sample-to-row map and its fingerprint, from the data's files.

        Sets ``num_samples`` (``--tau-num-samples``, else the rows of the csv, the synthetic
        samples or the keys of the key index), ``index_source`` and ``index_fingerprint``; logs
        a warning when ``--tau-num-samples`` is larger than the data.

        Args:
            args: ``open_clip_train``'s parsed options.

        Raises:
            TrainingSetupError: ``--tau-num-samples`` below the data's rows, synthetic data
                without ``--train-num-samples``, a training shard missing from the key index,
                or a key index or csv that cannot be read.
        """
        kind = train_data_kind(args)
        requested = self.options.tau_num_samples
        self.data_rows = None
        if kind == "csv":
            rows = self.data_rows = csv_rows(args)
            what = "rows of the csv"
            self.index_source = f"the row number ({rows} {what})"
            self.index_fingerprint = f"csv sha256:{_file_sha256(args.train_data)}"
        elif kind == "synthetic":
            if not args.train_num_samples:
                raise TrainingSetupError(
                    "--dataset-type synthetic needs --train-num-samples (the table size)."
                )
            rows = self.data_rows = args.train_num_samples
            what = "synthetic samples"
            self.index_source = f"the row number ({rows} {what})"
            self.index_fingerprint = f"synthetic {rows}"
        elif self.options.tau_key_index:
            self.key_index = key_index = read_key_index(self.options.tau_key_index)
            unmapped = [
                url
                for url in expand_shards(args.train_data)
                if shard_name(url) not in key_index.shards
            ]
            if unmapped:
                raise TrainingSetupError(
                    f"{len(unmapped)} training shard(s) are not in the key index "
                    f"{key_index.path}, e.g. {unmapped[0]}; rebuild it over the training shards "
                    "with python -m openclip_tau.key_index."
                )
            rows = len(key_index)
            what = "keys in the key index"
            self.index_source = f"the key index {key_index.path} ({rows} keys)"
            self.index_fingerprint = f"key index {key_index.fingerprint()}"
        else:
            rows = requested
            what = "--tau-num-samples"
            self.index_source = "the integer sample keys"
            self.index_fingerprint = "integer keys"
        if requested is not None and requested < rows:
            raise TrainingSetupError(
                f"--tau-num-samples {requested} is smaller than the {rows} {what}; omit it or "
                f"pass at least {rows}."
            )
        if requested is not None and requested > rows:
            self._log_master(
                f"openclip_tau: --tau-num-samples {requested} is larger than the {rows} {what}: "
                f"{requested - rows} rows of the per-sample table are never used.",
                logging.WARNING,
            )
        self.num_samples = requested or rows

    def _warn_small_batch(self, args: argparse.Namespace) -> None:
        """iSogCLR: the KL radius must stay below log(B - 1) of the global batch B."""
        state = getattr(self.loss, "state", None)
        learns = state is not None and any(n.startswith("tau_") for n in state.names)
        rho = self.option("rho")
        if not learns or rho is None or rho <= 0:
            return
        batch = args.batch_size * args.world_size * args.accum_freq
        limit = math.log(max(batch - 1, 1))
        if rho >= limit:
            logging.warning(
                f"openclip_tau: --tau-rho {rho:g} is not below log(B - 1) = {limit:.2f} for the "
                f"global batch B = {batch}: no temperature can reach it, so every per-sample "
                "temperature is driven to --tau-min. The published settings assume B >= 512; "
                f"for this batch use --tau-rho below {limit:.2f} (e.g. {0.5 * limit:.2f}) and a "
                "smaller --tau-eta."
            )


def train_data_kind(args: argparse.Namespace) -> Optional[str]:
    """``webdataset``, ``csv`` or ``synthetic`` (resolving ``--dataset-type auto``), or None.

    Args:
        args: ``open_clip_train``'s parsed options (``dataset_type``, ``train_data``).

    Returns:
        The kind upstream's ``get_dataset_fn`` picks, or None without training data or for
        another kind.
    """
    if args.dataset_type == "synthetic":
        return "synthetic"
    if not args.train_data:
        return None
    build = upstream_data.get_dataset_fn(args.train_data, args.dataset_type)
    return {
        upstream_data.get_wds_dataset: "webdataset",
        upstream_data.get_csv_dataset: "csv",
    }.get(build)


def model_embed_dim(model: str, loss_name: str) -> int:
    """``embed_dim`` of an OpenCLIP model config (the dimension of the features the loss gets).

    Args:
        model: The ``--model`` name.
        loss_name: The ``--loss`` name (for the message).

    Returns:
        The config's ``embed_dim``.

    Raises:
        TrainingSetupError: No config of that name, or one without an integer ``embed_dim``.
    """
    try:
        config = open_clip.get_model_config(model)
    except Exception as err:  # noqa: BLE001 - hf-hub lookups raise several kinds
        config, reason = None, str(err)
    else:
        reason = "no such model config"
    if not config or not isinstance(config.get("embed_dim"), int):
        raise TrainingSetupError(
            f"--loss {loss_name} builds temperature networks of the model's embed_dim, and the "
            f"config of --model {model} gives none ({reason}); register the model's JSON "
            "config with --add-model-config."
        )
    return int(config["embed_dim"])


def read_key_index(path: str) -> KeyIndex:
    """:func:`~openclip_tau.key_index.load_key_index` with its errors as one-line setup errors
    naming the option.

    Args:
        path: The ``--tau-key-index`` file.

    Returns:
        The loaded key index.

    Raises:
        TrainingSetupError: The file is missing, unreadable, not a key index or truncated.
    """
    try:
        return load_key_index(path)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--tau-key-index {path}: {err}") from None


def csv_rows(args: argparse.Namespace) -> int:
    """The number of rows upstream's ``CsvDataset`` reads from ``--train-data``.

    Args:
        args: ``open_clip_train``'s parsed options (``train_data``, ``csv_separator``,
            ``csv_img_key``).

    Returns:
        The number of data rows (the header excluded).

    Raises:
        TrainingSetupError: The csv cannot be read or lacks the image column.
    """
    import pandas as pd

    try:
        frame = pd.read_csv(args.train_data, sep=args.csv_separator, usecols=[args.csv_img_key])
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--train-data {args.train_data}: {err}") from None
    return len(frame)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
