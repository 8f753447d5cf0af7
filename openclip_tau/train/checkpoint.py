"""The loss in checkpoints: its entries in upstream's checkpoints (``loss_name``,
``loss_options``, ``loss_state_dict``), the per-sample state shards of ``--tau-state sharded``
beside them, the restore on ``--resume`` (with its refusals), and the optimizer's temperature
groups (added to upstream's optimizer after it is built, split off its saved state on load)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from typing import Any, Optional

import torch
from open_clip_train import file_utils as upstream_file_utils
from open_clip_train.distributed import is_master

from openclip_tau.train.errors import TrainingSetupError, UpstreamDriftError
from openclip_tau.train.options import class_defaults
from tau_core import load_state_shards, save_state_shards
from tau_core.adapter import signature_keywords

CHECKPOINT_KEYS = ("loss_state_dict", "loss_name", "loss_options")
"""The entries a training checkpoint gets beside upstream's (``epoch``, ``state_dict``, ...)."""
TEMPERATURE_GROUP = "temperature"
"""The ``"name"`` of a loss's group in ``param_groups()`` (and in a saved optimizer state)."""


class LossCheckpoints:
    """Checkpoint and optimizer-state handling of a run (mixed into
    :class:`~openclip_tau.train.training.LossTraining`)."""

    def pt_load(self, file_path: str, map_location: Any = None) -> Any:
        """``open_clip_train.file_utils.pt_load`` for ``--resume``: keeps the loss entries.

        The loss entries and the whole optimizer state are kept for :meth:`attach_optimizer`
        and the restore in ``create_loss``; upstream gets the optimizer state without the
        temperature groups (its optimizer holds the model's groups only).

        Args:
            file_path: The checkpoint (a path or an fsspec URL).
            map_location: As for ``torch.load``. Default None.

        Returns:
            The checkpoint as upstream reads it.
        """
        checkpoint = upstream_file_utils.pt_load(file_path, map_location=map_location)
        if isinstance(checkpoint, dict) and "epoch" in checkpoint:
            self.resumed = {
                k: checkpoint[k] for k in ("epoch", *CHECKPOINT_KEYS) if k in checkpoint
            }
            self.resumed_path = str(file_path)
            saved = checkpoint.get("optimizer")
            if isinstance(saved, dict) and temperature_groups(saved):
                # open_clip_train loads the optimizer before create_loss, into an optimizer of
                # the model's groups only: it gets the state without the temperature group; the
                # whole state is loaded once that group is added (attach_optimizer).
                self.resumed["optimizer"] = saved
                checkpoint = {**checkpoint, "optimizer": without_temperature_groups(saved)}
        return checkpoint

    def _restore_loss_state(self) -> None:
        if self.resumed is None:
            return
        resumed, self.resumed = self.resumed, None  # release the tables once done
        path = self.resumed_path
        fresh = self.options.tau_fresh_state
        self._check_resumable(path, resumed)
        if not self.stateful:
            return
        if resumed.get("loss_name") is None or "loss_state_dict" not in resumed:
            self._log_master(f"openclip_tau: {path} holds no loss state; starting it fresh.")
            return
        options = resumed.get("loss_options", {})
        before = options.get("index")
        if fresh:
            self._log_master(
                f"openclip_tau: --tau-fresh-state: the {self.loss_name} loss state of {path} "
                "is not restored; it starts fresh."
            )
            return
        shards = options.get("state_shards")
        try:
            if shards is None:
                self.loss.load_state_dict(resumed["loss_state_dict"])
            else:
                # The tables are in a folder of shards beside the checkpoint (saved by every
                # rank); the checkpoint holds the rest (epoch, temperature parameters).
                loaded = self.loss.load_state_dict(resumed["loss_state_dict"], strict=False)
                stray = [k for k in loaded.missing_keys if not k.startswith("state.")]
                if stray or loaded.unexpected_keys:
                    raise ValueError(
                        f"missing keys {stray}, unexpected keys {loaded.unexpected_keys}"
                    )
                folder = os.path.join(os.path.dirname(os.path.abspath(path)), shards)
                load_state_shards(self.loss, folder)
        except (ValueError, RuntimeError, OSError) as err:
            raise TrainingSetupError(f"Cannot restore the loss state from {path}: {err}") from err
        self.optimizer_state = resumed.get("optimizer")
        if options.get("kwargs", {}) != self.loss_kwargs:
            self._log_master(
                f"Resuming with loss options {self.loss_kwargs}; {path} used "
                f"{options.get('kwargs', {})}.",
                logging.WARNING,
            )
        if before is None:
            self._log_master(
                f"{path} records no sample-to-row fingerprint (older checkpoint); the map "
                "could not be checked.",
                logging.WARNING,
            )
        self._log_master(f"openclip_tau: restored the {self.loss_name} loss state from {path}.")

    def _check_resumable(self, path: str, resumed: dict[str, Any]) -> None:
        """Refuses a checkpoint trained with another loss, or (unless ``--tau-fresh-state``)
        one without loss state, with another table size or another sample-to-row map."""
        fresh = self.options.tau_fresh_state
        saved = resumed.get("loss_name")
        if saved is not None and saved != self.loss_name:
            raise TrainingSetupError(
                f"{path} was trained with --loss {saved}; resume it with --loss {saved}, not "
                f"--loss {self.loss_name}."
            )
        if not self.stateful or fresh:
            return
        if saved is None or "loss_state_dict" not in resumed:
            raise TrainingSetupError(
                f"{path} holds no loss state (written by open_clip_train itself, or by "
                f"another tool): resuming --loss {self.loss_name} from it would start the "
                "per-sample state fresh. Pass --tau-fresh-state to do that."
            )
        options = resumed.get("loss_options", {})
        before = options.get("index")
        if before is not None and before != self.index_fingerprint:
            raise TrainingSetupError(
                f"{path} was trained with another sample-to-row map ({before}); this run uses "
                f"{self.index_fingerprint} ({self.index_source}), so the saved state would "
                "belong to other samples. Resume with the key index (or csv) it was trained "
                "with, or pass --tau-fresh-state to start the per-sample state fresh."
            )
        rows = options.get("num_samples")
        if rows is not None and self.num_samples is not None and rows != self.num_samples:
            raise TrainingSetupError(
                f"{path} holds a per-sample table of {rows} rows; this run's has "
                f"{self.num_samples} (num_samples={self.num_samples}, from {self.index_source}). "
                f"Resume with --tau-num-samples {rows}, or pass --tau-fresh-state to start the "
                "per-sample state fresh."
            )

    def class_kwargs(self) -> dict[str, Any]:
        """Every keyword of the loss's constructor as this run built it (no rank/world/table).

        Returns:
            The class's defaults updated with the ``--tau-*`` options given; ``dim`` set to the
            model's ``embed_dim``; without ``rank``, ``world_size``, ``num_samples`` and
            ``state_layout`` (properties of the run, not of the loss).
        """
        kwargs = dict(class_defaults(self.spec.cls), **self.loss_kwargs)
        if "dim" in signature_keywords(self.spec.cls):  # a required keyword: no class default
            kwargs["dim"] = self.embed_dim
        for name in ("rank", "world_size", "num_samples", "state_layout"):
            kwargs.pop(name, None)
        return kwargs

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.save`` for ``open_clip_train.main``: training checkpoints get the loss state.

        Args:
            obj: What upstream saves; a dict with ``epoch``, ``state_dict`` and ``optimizer``
                gets :meth:`checkpoint_entries`, anything else is saved as it is.
            f: The file (path or file object) as for ``torch.save``.
            *args: Passed on to ``torch.save``.
            **kwargs: Passed on to ``torch.save``.

        Returns:
            What ``torch.save`` returns (None).
        """
        if isinstance(obj, dict) and {"epoch", "state_dict", "optimizer"} <= obj.keys():
            obj = {**obj, **self.checkpoint_entries(obj["epoch"])}
            if isinstance(f, (str, os.PathLike)):
                self.saved_paths.add(os.path.abspath(f))
        return torch.save(obj, f, *args, **kwargs)

    def checkpoint_entries(self, completed_epoch: Optional[int] = None) -> dict[str, Any]:
        """``loss_name``, ``loss_options`` and ``loss_state_dict`` of a checkpoint.

        ``loss_options["class_kwargs"]`` holds every keyword the loss was built with (defaults
        included, e.g. TempNet's temperature range and ``dim``), so the loss can be rebuilt
        from the checkpoint alone. With ``--tau-state sharded`` the tables are not in
        ``loss_state_dict`` (rank 0 holds only its rows): every rank wrote its rows into the
        folder ``loss_options["state_shards"]``, a name relative to the checkpoint's folder.

        Args:
            completed_epoch: The number of epochs the checkpoint holds, >= 1. Default None (no
                shard folder named: the entries of the replicated layout).

        Returns:
            The three entries of :data:`CHECKPOINT_KEYS`.
        """
        options: dict[str, Any] = {
            "kwargs": dict(self.loss_kwargs),
            "num_samples": self.num_samples,
            "key_index": self.options.tau_key_index,
            "index": self.index_fingerprint,
            "logit_scale": self.spec.temperature_rule if self.ours else None,
        }
        state: dict[str, Any] = {}
        if self.loss is not None:
            state = self.loss.state_dict()
        if self.ours:
            options["class"] = self.spec.cls.__name__
            options["class_kwargs"] = self.class_kwargs()
            options["state_layout"] = self.state_layout if self.stateful else None
        if self.sharded() and completed_epoch is not None:
            state = {k: v for k, v in state.items() if not k.startswith("state.")}
            options["state_shards"] = shard_folder_name(completed_epoch)
        return {
            "loss_name": self.loss_name,
            "loss_options": options,
            "loss_state_dict": state,
        }

    def will_checkpoint(self, completed_epoch: int) -> bool:
        """Whether upstream writes a checkpoint after ``completed_epoch`` (on the master).

        Args:
            completed_epoch: The number of epochs done, >= 1.

        Returns:
            True when ``--logs`` is set and the epoch is the last, a multiple of
            ``--save-frequency``, or ``--save-most-recent`` is on.
        """
        args = self.args
        if not args.logs or args.logs.lower() == "none":
            return False
        return (
            completed_epoch == args.epochs
            or (args.save_frequency > 0 and completed_epoch % args.save_frequency == 0)
            or bool(args.save_most_recent)
        )

    def remove_unreferenced_shards(self, args: argparse.Namespace) -> None:
        """Master: removes shard folders of this run's earlier epochs that no checkpoint names.

        Called once upstream's checkpoints of the last epoch are complete: ``epoch_latest.pt``
        names the newest folder, and ``epoch_K.pt`` (unless upstream's
        ``--delete-previous-checkpoint`` removed it) names folder K.

        Args:
            args: ``open_clip_train``'s parsed options.
        """
        if not is_master(args):
            return
        for epoch, folder in sorted(self.shard_folders.items()):
            if epoch >= (self.last_completed or 0):
                continue
            if not os.path.exists(os.path.join(args.checkpoint_path, f"epoch_{epoch}.pt")):
                shutil.rmtree(folder, ignore_errors=True)
            del self.shard_folders[epoch]

    def attach_optimizer(self, optimizer: Any) -> None:
        """Adds the loss's temperature group to upstream's optimizer (once) and its hooks.

        open_clip_train builds the optimizer before the loss; its first ``train_one_epoch``
        hands it over. The group (``loss.param_groups()``) is appended after the model's groups,
        ``register_optimizer`` keeps its own learning rate schedule (the model's scheduler sets
        every group's lr; the pre-step hook sets this one's again) and the temperature's bounds.
        On ``--resume`` the saved optimizer state, temperature group included, is loaded now.

        Args:
            optimizer: The optimizer upstream built (and passes to ``train_one_epoch``).

        Raises:
            UpstreamDriftError: A later epoch passes another optimizer than the first.
            TrainingSetupError: The optimizer is not a ``torch.optim.Optimizer``, or the saved
                optimizer state does not fit it.
        """
        if optimizer is self.optimizer:
            return
        if self.optimizer is not None:
            raise UpstreamDriftError(
                "open_clip_train passed another optimizer to train_one_epoch than in the first "
                f"epoch: --loss {self.loss_name}'s temperature group is in the first one. This "
                "open_clip_train version is not supported."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TrainingSetupError(
                f"--loss {self.loss_name} needs a torch optimizer for its temperature group; "
                f"open_clip_train built a {type(optimizer).__name__}."
            )
        for group in self.loss.param_groups():
            optimizer.add_param_group(group)
        self.optimizer = optimizer
        saved, self.optimizer_state = self.optimizer_state, None
        if saved is not None:
            try:
                optimizer.load_state_dict(saved)
            except (ValueError, KeyError) as err:
                raise TrainingSetupError(
                    f"Cannot restore the optimizer state of --loss {self.loss_name}'s "
                    f"temperature group from {self.resumed_path}: {err}"
                ) from err
            self._log_master(
                f"openclip_tau: restored the optimizer state of the temperature group from "
                f"{self.resumed_path}."
            )
        # After the load: load_state_dict replaces the group dicts, and the hooks hold the
        # groups they were registered with.
        self.loss.register_optimizer(optimizer)

    def save_shards(self, args: argparse.Namespace, completed_epoch: int) -> None:
        """Sharded layout: every rank writes its rows (a collective) when upstream checkpoints
        ``completed_epoch``; upstream's checkpoint, written by the master after
        ``train_one_epoch`` returns, names the folder.

        Args:
            args: ``open_clip_train``'s parsed options (``checkpoint_path``).
            completed_epoch: The number of epochs done, >= 1.
        """
        if self.sharded() and self.will_checkpoint(completed_epoch):
            folder = os.path.join(args.checkpoint_path, shard_folder_name(completed_epoch))
            save_state_shards(self.loss, folder)
            self.shard_folders[completed_epoch] = folder


def temperature_groups(optimizer_state: dict[str, Any]) -> list[int]:
    """Positions of the loss's temperature groups in a saved optimizer ``state_dict``.

    Args:
        optimizer_state: A saved ``Optimizer.state_dict()``.

    Returns:
        The positions of the groups named :data:`TEMPERATURE_GROUP`, in order (empty if none).
    """
    return [
        i
        for i, group in enumerate(optimizer_state.get("param_groups", []))
        if isinstance(group, dict) and group.get("name") == TEMPERATURE_GROUP
    ]


def without_temperature_groups(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer ``state_dict`` without the temperature groups and their moments.

    ``Optimizer.load_state_dict`` pairs the saved parameters with the optimizer's in group
    order, so the model's groups load into an optimizer that does not hold the loss's group yet.

    Args:
        optimizer_state: A saved ``Optimizer.state_dict()``.

    Returns:
        A copy without the temperature groups and the moments of their parameters.
    """
    drop = set(temperature_groups(optimizer_state))
    groups = optimizer_state["param_groups"]
    dropped = {p for i in drop for p in groups[i]["params"]}
    return {
        **optimizer_state,
        "state": {k: v for k, v in optimizer_state["state"].items() if k not in dropped},
        "param_groups": [g for i, g in enumerate(groups) if i not in drop],
    }


def shard_folder_name(completed_epoch: int) -> str:
    """``epoch_K.tau_state``: the per-sample state shards of checkpoint ``epoch_K.pt``.

    Args:
        completed_epoch: K, the number of epochs the checkpoint holds, >= 1.
    """
    return f"epoch_{completed_epoch}.tau_state"


def read_loss_entries(path: str) -> Optional[dict[str, Any]]:
    """``epoch`` and the loss entries of a training checkpoint, read before the model is built
    (memory-mapped: the weights are not read), or None for a bare model checkpoint.

    Args:
        path: The ``--resume`` file.

    Returns:
        ``epoch`` and those of :data:`CHECKPOINT_KEYS` it holds, or None when the file is not a
        training checkpoint (no ``epoch``).

    Raises:
        TrainingSetupError: The file cannot be read or unpickled.
    """
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not the zip format: no memory map
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds
        raise TrainingSetupError(f"--resume {path} cannot be read: {err}") from None
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        return None
    return {k: checkpoint[k] for k in ("epoch", *CHECKPOINT_KEYS) if k in checkpoint}
