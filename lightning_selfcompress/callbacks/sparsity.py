"""Lightning adapter for 2:4 structured sparsity: prune once by magnitude, then keep the pattern through training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..core.inputs import model_input
from ..core.permute import PermutationReport, permute_for_24
from ..core.checks import check_flag, check_integer
from ..core.sparsity import Sparsifier24
from .strategies import check_strategy
from .surgeon import ChannelSurgeon

__all__ = ["Sparsity24"]


class Sparsity24(Callback):
    """NVIDIA ASP's workflow as a callback: at `start_step` (0: sparse from the start) or at the start of
    `start_epoch`, every eligible Conv/Linear gets a 2:4 magnitude mask along its input channels, and from then on
    the masked weights, their gradients and their optimizer state stay exactly zero. The masks are buffers
    (`<layer>.weight_mask`), so checkpoints carry them; they exist, all ones, from `setup()` on, so that a checkpoint
    taken before or after pruning loads into a freshly built model. When a surgery removes input channels of a
    masked layer, the groups of 4 shift: that layer's mask is derived anew by magnitude from its kept weights.
    The lifecycle is `core.sparsity.Sparsifier24` (`self.sparsifier`), for plain PyTorch loops too; this adapter
    chooses when to prune, permutes, and logs.

    Args:
        start_step: optimizer step at which to prune (None: use start_epoch).
        start_epoch: epoch at whose start to prune (None: use start_step).
        calculator: "1d" (best 2 of every 4, ASP's m4n2_1d) or "2d" (4x4 blocks 2:4 along rows and columns, so
            the transposed weight is sparse too; ASP's m4n2_2d_best).
        recompute_every_n_steps: None (default, ASP's workflow): the masks stay as the prune chose them. N: every N
            optimizer steps after the prune, derive every mask anew by magnitude, as ASP's `allow_recompute_mask`
            does: the weights a mask dropped are kept aside at their value when dropped (a `<layer>.weight_dropped`
            buffer, so surgeries slice it and checkpoints carry it), put back beside the trained kept weights, and
            the 2 largest of every 4 win; a weight that comes back resumes from its stowed value with zero optimizer
            state. Logged as `sparsity/masks_changed`, the fraction of mask entries the last recompute changed.
        permute: at the prune, first reorder channels (Pool & Yu's channel permutation, with the optimizers'
            state) so that the masks keep more weight magnitude; the network computes the same function. Traced on
            the first tensor of the batch (or `example_input_array`). Beside a ChannelSurgeon only before its first
            cut: a permutation keeps every layer's shape and moves channels only among positions that live in the
            same modules, so the surgeon's traced graph stays true and its history replays onto the permuted
            checkpoint.
        include: glob patterns on module names: which eligible layers get masks (default: all).
        exclude: glob patterns on module names: eligible layers that stay dense.
    """

    def __init__(
        self,
        start_step: int | None = 0,
        *,
        start_epoch: int | None = None,
        calculator: str = "1d",
        recompute_every_n_steps: int | None = None,
        permute: bool = False,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
    ) -> None:
        if (start_step is None) == (start_epoch is None):
            raise ValueError("Give exactly one of start_step (0: sparse from the start) and start_epoch.")
        check_integer("start_step", start_step, least=0, none="prune at start_epoch")
        check_integer("start_epoch", start_epoch, least=0, none="prune at start_step")
        self.sparsifier = Sparsifier24(calculator, recompute_every_n_steps, include, exclude)
        check_flag("permute", permute)
        if permute and calculator == "2d":
            raise ValueError(
                "permute=True searches for what the 1-D calculator keeps, and moves the rows of the 2-D calculator's "
                "blocks too: use calculator='1d' with it."
            )
        self.start_step, self.start_epoch, self.permute = start_step, start_epoch, permute
        self.permutation: PermutationReport | None = None  # kept magnitude per layer before and after permuting

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "Sparsity24")
        for surgeon in (cb for cb in trainer.callbacks if isinstance(cb, ChannelSurgeon) and cb.round_to % 4):
            rank_zero_warn(
                f"Sparsity24 beside ChannelSurgeon(round_to={surgeon.round_to}): a cut that leaves a layer's inputs "
                "off a multiple of 4 makes it dense. Set round_to=4 (or 8, 16) to keep the widths 2:4 can use."
            )
        self.sparsifier.attach(pl_module)  # all-ones masks before the optimizer is built and a checkpoint loads

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped = self.sparsifier.skipped
        if skipped:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
            rank_zero_info(f"Sparsity24: {len(skipped)} layer(s) stay dense ({reasons}).")
        self.sparsifier.enforce(trainer.optimizers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        # the start of an epoch is its first batch: the permutation's trace needs an example input
        due_step = self.start_step is not None and trainer.global_step >= self.start_step
        due_epoch = self.start_epoch is not None and trainer.current_epoch >= self.start_epoch
        if not self.sparsifier.pruned and (due_step or due_epoch):
            if self.permute:
                self._permute(trainer, pl_module, batch)
            self.sparsifier.prune(trainer.optimizers, trainer.global_step)
        self._log_dense(self.sparsifier.step(trainer.optimizers, trainer.global_step))

    def _permute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if any(cb.history for cb in trainer.callbacks if isinstance(cb, ChannelSurgeon)):
            raise RuntimeError(
                "Sparsity24(permute=True) must prune before the ChannelSurgeon's first cut: the surgeon's history "
                "names channels by their positions when it traced the model, and a permutation after a cut would "
                "reorder what that history has already removed around. Prune earlier (start_step=0, or a start_epoch "
                "before the first surgery), or use permute=False."
            )
        example = model_input(pl_module, batch, "Sparsity24(permute=True)")
        device = next(pl_module.parameters()).device
        self.permutation = permute_for_24(pl_module, example.detach()[:2].to(device), list(self.sparsifier.layers),
                                          trainer.optimizers, self.sparsifier.calculator)  # fmt: skip
        report = self.permutation
        rank_zero_info(
            f"Sparsity24: channel permutation in {report.seconds:.2f} s ({report.swaps} swaps in {report.spaces} "
            f"channel spaces); kept magnitude per layer: "
            + ", ".join(f"{n} {report.before[n]:.3f} -> {report.after[n]:.3f}" for n in report.before)
        )
        for space, why in report.unsearched.items():
            rank_zero_info(f"Sparsity24: channels {space} not permuted: {why}")

    @staticmethod
    def _log_dense(dense: dict[str, str]) -> None:
        for name, reason in dense.items():
            rank_zero_info(f"Sparsity24: {name} goes dense after a surgery: {reason}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparsifier.pruned:  # a surgery in the last step: the model leaves fit 2:4 (for export) all the same
            self._log_dense(self.sparsifier.follow_shapes(trainer.optimizers, trainer.global_step))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if metrics := self.sparsifier.metrics():
            if self.permutation is not None:
                gain = self.permutation.gain()
                metrics["sparsity/kept_magnitude_gain"] = sum(gain.values()) / max(1, len(gain))
            pl_module.log_dict(metrics)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.sparsifier.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        permutation = self.permutation.to_dict() if self.permutation is not None else None
        return {**self.sparsifier.state_dict(), "permutation": permutation}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsifier.load_state_dict(state_dict)
        if state_dict.get("permutation"):
            self.permutation = PermutationReport(**state_dict["permutation"])
