"""The names of ``open_clip_train`` that ``python -m openclip_tau.train`` replaces, for one run.

``open_clip_train.main.main`` runs as it is; :func:`replacements` lists every name it uses that
is replaced (and by what), :func:`installed` replaces them for the duration of a run and restores
them on exit, even on error. The guards (:class:`UpstreamGuards`, and the name check of
:func:`installed`) raise :class:`UpstreamDriftError` when an ``open_clip_train`` version no longer
goes through those names, instead of training without the loss's state. docs/openclip.md says
what each replacement is for.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import ExitStack
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import open_clip_train.main as upstream_main
import torch
from open_clip_train import data as upstream_data
from open_clip_train import zero_shot as upstream_zero_shot
from torch import Tensor, nn

from openclip_tau.data import patched, tarfile_to_samples_nothrow
from openclip_tau.train.errors import UpstreamDriftError
from openclip_tau.train.monitoring import setup_logging

if TYPE_CHECKING:
    from openclip_tau.train.training import LossTraining


def replacements(run: LossTraining) -> dict[ModuleType, dict[str, Any]]:
    """Every replaced name, by module: ``open_clip_train.main``'s ``parse_args`` (our options out
    first), ``create_model_and_transforms`` (input checks first), ``get_data`` (indexed training
    data), ``create_loss``, ``train_one_epoch``, ``pt_load`` (the loss state of ``--resume``),
    ``setup_logging`` (other libraries' loggers keep their levels) and ``torch`` (``save`` with
    the loss state; DDP with ``device_ids=None`` on CPU); the data module's
    ``tarfile_to_samples_nothrow`` (end of shard, webdataset 1.0.2); the zero-shot module's
    ``accuracy`` (NumPy 2).

    Args:
        run: The run whose methods replace upstream's functions.

    Returns:
        Module to {name: replacement}.
    """
    torch_overlay = _Overlay(
        torch,
        save=run.save,
        nn=_Overlay(
            torch.nn,
            parallel=_Overlay(torch.nn.parallel, DistributedDataParallel=distributed_data_parallel),
        ),
    )
    return {
        upstream_main: {
            "parse_args": run.parse_args,
            "create_model_and_transforms": run.create_model_and_transforms,
            "get_data": run.get_data,
            "create_loss": run.create_loss,
            "train_one_epoch": run.train_one_epoch,
            "pt_load": run.pt_load,
            "setup_logging": setup_logging,
            "torch": torch_overlay,
        },
        upstream_data: {"tarfile_to_samples_nothrow": tarfile_to_samples_nothrow},
        upstream_zero_shot: {"accuracy": zero_shot_accuracy},
    }


@contextlib.contextmanager
def installed(run: LossTraining) -> Iterator[None]:
    """Replaces the names of :func:`replacements` for this run only (restored on exit).

    Args:
        run: The run whose methods replace upstream's functions.

    Raises:
        UpstreamDriftError: A module lacks one of the names (an ``open_clip_train`` version
            that is not supported); raised before anything is replaced.
    """
    table = replacements(run)
    for module, names in table.items():
        missing = [name for name in names if not hasattr(module, name)]
        if missing:
            raise UpstreamDriftError(
                f"{module.__name__} has no {', '.join(missing)}: openclip_tau replaces "
                "these names of open_clip_train. This open_clip_train version is not supported."
            )
    run._create_model = upstream_main.create_model_and_transforms
    with ExitStack() as stack:
        for module, names in table.items():
            stack.enter_context(patched(module, **names))
        yield


class _Overlay:
    """Stands in for a module: the given attributes replace its own, the rest pass through."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def distributed_data_parallel(
    module: nn.Module, device_ids: Optional[Sequence[Any]] = None, **kwargs: Any
) -> nn.Module:
    """DDP as upstream builds it, except that CPU devices give ``device_ids=None`` (CPU + gloo).

    Args:
        module: The model to wrap.
        device_ids: Upstream's ``[device]``. Default None. All-CPU devices become None, which
            is what ``DistributedDataParallel`` needs on CPU.
        **kwargs: Passed on to ``torch.nn.parallel.DistributedDataParallel``.

    Returns:
        The wrapped model.
    """
    if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def zero_shot_accuracy(output: Tensor, target: Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """``open_clip_train.zero_shot.accuracy`` that works with NumPy 2.

    Upstream (3.3.0) converts a 1-element array with ``float()``, which NumPy >= 2.3 refuses
    ("only 0-dimensional arrays can be converted"), so ``--imagenet-val`` crashed at the first
    evaluation batch. Same result: the number of samples whose target is among the top-k logits.

    Args:
        output: Logits, shape (batch, classes).
        target: Class of each sample, shape (batch,).
        topk: The k's, each in [1, classes]. Default (1,).

    Returns:
        For each k, the number of samples whose target is among their k largest logits.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) for k in topk]


class UpstreamGuards:
    """Checks, after each epoch, that upstream's loop went through the replaced names
    (mixed into :class:`~openclip_tau.train.training.LossTraining`)."""

    def verify_checkpoints(self, completed_epoch: int) -> None:
        """Raises if a checkpoint upstream wrote for ``completed_epoch`` lacks our entries.

        Args:
            completed_epoch: The number of epochs done (upstream's ``epoch_K.pt`` name), >= 1.

        Raises:
            UpstreamDriftError: ``epoch_K.pt`` or ``tmp.pt`` was due but not written through
                the replaced ``torch.save``.
        """
        args = self.args
        if not args.save_logs:
            return
        expected = []
        if completed_epoch == args.epochs or (
            args.save_frequency > 0 and completed_epoch % args.save_frequency == 0
        ):
            expected.append(os.path.join(args.checkpoint_path, f"epoch_{completed_epoch}.pt"))
        if args.save_most_recent:
            expected.append(os.path.join(args.checkpoint_path, "tmp.pt"))  # then renamed
        missing = [p for p in expected if os.path.abspath(p) not in self.saved_paths]
        if missing:
            raise UpstreamDriftError(
                f"open_clip_train wrote {missing[0]} without openclip_tau's loss entries (it no "
                "longer saves through the torch name of open_clip_train.main): the checkpoint "
                "cannot be resumed exactly. This open_clip_train version is not supported."
            )
        self.saved_paths.clear()

    def check_loss_was_called(self) -> None:
        """Raises unless upstream's loop called our loss once per batch it drew (with indices).

        Raises:
            UpstreamDriftError: The loss was called fewer times than batches were drawn (or, for
                the losses without per-sample state, never in this epoch).
        """
        if self.stateful:
            accum = self.args.accum_freq
            used = self.batches_seen - len(self.pending)  # a last incomplete group is dropped
            if (
                self.batches_seen == 0
                or len(self.pending) >= accum
                or used != self.step_in_epoch * accum
            ):
                raise UpstreamDriftError(
                    f"In epoch {self.epoch} open_clip_train drew {self.batches_seen} batches but "
                    f"called --loss {self.loss_name} with the indices of "
                    f"{self.step_in_epoch * self.args.accum_freq}: its loop no longer calls the "
                    "loss made by create_loss once per batch. This open_clip_train version is "
                    "not supported."
                )
        elif self.step_in_epoch == 0:
            raise UpstreamDriftError(
                f"In epoch {self.epoch} open_clip_train never called --loss {self.loss_name}: its "
                "loop no longer uses the loss made by create_loss."
            )
