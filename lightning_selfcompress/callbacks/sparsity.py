"""Lightning adapter for 2:4 structured sparsity: prune once by magnitude, then keep the pattern through training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..core.inputs import model_input
from ..core.permute import PermutationReport, permute_for_24
from ..core.quant import check_patterns
from ..core.sparsity import (
    CALCULATORS, DROPPED, MASK, MaskEnforcer, apply_masks, eligible_layers, ineligible_reason, is_24, kept_magnitude,
    recompute_mask, stow_dropped,
)  # fmt: skip
from .surgeon import ChannelSurgeon

__all__ = ["Sparsity24"]


class Sparsity24(Callback):
    """NVIDIA ASP's workflow as a callback: at `start_step` (0: sparse from the start) or at the start of
    `start_epoch`, every eligible Conv/Linear gets a 2:4 magnitude mask along its input channels, and from then on
    the masked weights, their gradients and their optimizer state stay exactly zero. The masks are buffers
    (`<layer>.weight_mask`), so checkpoints carry them; they exist, all ones, from `setup()` on, so that a checkpoint
    taken before or after pruning loads into a freshly built model. When a surgery removes input channels of a
    masked layer, the groups of 4 shift: that layer's mask is derived anew by magnitude from its kept weights.

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
        include, exclude: glob patterns on module names: which eligible layers get masks (default: all).
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
        for name, value in (("start_step", start_step), ("start_epoch", start_epoch)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be an integer >= 0.")
        if calculator not in CALCULATORS:
            raise ValueError(f"calculator={calculator!r} is not one of {sorted(CALCULATORS)}.")
        if recompute_every_n_steps is not None and (
            isinstance(recompute_every_n_steps, bool) or not isinstance(recompute_every_n_steps, int)
            or recompute_every_n_steps < 1
        ):  # fmt: skip
            raise ValueError(
                f"recompute_every_n_steps={recompute_every_n_steps!r} must be None (masks fixed after the prune, "
                "ASP's workflow) or an integer >= 1 (optimizer steps between recomputed masks)."
            )
        if not isinstance(permute, bool):
            raise TypeError(f"permute={permute!r} must be True or False.")
        if permute and calculator == "2d":
            raise ValueError(
                "permute=True searches for what the 1-D calculator keeps, and moves the rows of the 2-D calculator's "
                "blocks too: use calculator='1d' with it."
            )
        self.start_step, self.start_epoch, self.calculator = start_step, start_epoch, calculator
        self.recompute_every_n_steps = recompute_every_n_steps
        self.masked_at_step = 0  # the optimizer step of the last prune or recompute of every mask
        self.recomputed, self.masks_changed = 0, 0.0
        self.permute = permute
        self.include, self.exclude = check_patterns("include", include), check_patterns("exclude", exclude)
        self.permutation: PermutationReport | None = None  # kept magnitude per layer before and after permuting
        self.pruned = False
        self.layers: dict[str, torch.nn.Module] = {}
        self.skipped: dict[str, str] = {}
        self.kept_magnitude: dict[str, float] = {}
        self.rederived = 0  # masks derived anew after surgeries shifted their groups of 4
        self._enforcers: list[MaskEnforcer] = []
        self._shapes: dict[str, torch.Size] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for surgeon in (cb for cb in trainer.callbacks if isinstance(cb, ChannelSurgeon) and cb.round_to % 4):
            rank_zero_warn(
                f"Sparsity24 beside ChannelSurgeon(round_to={surgeon.round_to}): a cut that leaves a layer's inputs "
                "off a multiple of 4 makes it dense. Set round_to=4 (or 8, 16) to keep the widths 2:4 can use."
            )
        # All-ones masks now, before the optimizer is built and before a checkpoint's weights (and masks) load.
        self.layers, self.skipped = eligible_layers(pl_module, self.calculator, self.include, self.exclude)
        for module in self.layers.values():
            if not isinstance(getattr(module, MASK, None), torch.Tensor):
                module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
            if self.recompute_every_n_steps is not None:
                stow_dropped(module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, reason in self.skipped.items():
            rank_zero_info(f"Sparsity24: {name} stays dense: {reason}")
        self._enforcers = [MaskEnforcer(opt, self.layers) for opt in trainer.optimizers]
        self._shapes = {}  # every layer is checked at the first batch (see _follow_surgery)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        # the start of an epoch is its first batch: the permutation's trace needs an example input
        due_step = self.start_step is not None and trainer.global_step >= self.start_step
        due_epoch = self.start_epoch is not None and trainer.current_epoch >= self.start_epoch
        if not self.pruned and (due_step or due_epoch):
            if self.permute:
                self._permute(trainer, pl_module, batch)
            self.prune(trainer, pl_module)
        if self.pruned:
            self._follow_surgery(trainer, pl_module)
        every = self.recompute_every_n_steps
        if self.pruned and every is not None and trainer.global_step - self.masked_at_step >= every:
            before = {name: getattr(m, MASK).clone() for name, m in self.layers.items()}
            self.prune(trainer, pl_module)
            changed = sum(int((getattr(m, MASK) != before[n]).sum()) for n, m in self.layers.items())
            self.masks_changed = changed / sum(m.weight.numel() for m in self.layers.values())
            self.recomputed += 1

    @torch.no_grad()
    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str] | None = None) -> None:
        """Derive masks by magnitude (for `names`, default every eligible layer) and zero what they drop."""
        for name in names or [n for n, m in self.layers.items() if ineligible_reason(m, self.calculator) is None]:
            module = self.layers[name]
            dropped = recompute_mask(module, self.calculator)
            self.kept_magnitude[name] = kept_magnitude(module.weight + dropped, getattr(module, MASK))
        apply_masks(self.layers, trainer.optimizers)
        self.pruned = True
        if names is None:
            self.masked_at_step = trainer.global_step

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
        self.permutation = permute_for_24(
            pl_module, example.detach()[:2].to(device), list(self.layers), trainer.optimizers, self.calculator
        )
        report = self.permutation
        rank_zero_info(
            f"Sparsity24: channel permutation in {report.seconds:.2f} s ({report.swaps} swaps in {report.spaces} "
            f"channel spaces); kept magnitude per layer: "
            + ", ".join(f"{n} {report.before[n]:.3f} -> {report.after[n]:.3f}" for n in report.before)
        )
        for space, why in report.unsearched.items():
            rank_zero_info(f"Sparsity24: channels {space} not permuted: {why}")

    def _follow_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A surgery sliced a masked layer: keep its mask 2:4 on the new groups of 4, or let it go dense. Every layer
        counts as changed at the start of a fit, so that a checkpoint saved between a surgery and this check (the
        surgery ran last in its step) resumes to the same masks as the uninterrupted run."""
        changed = [name for name, m in self.layers.items() if m.weight.shape != self._shapes.get(name)]
        if not changed:
            return
        dense = {n: r for n in changed if (r := ineligible_reason(self.layers[n], self.calculator)) is not None}
        for name, reason in dense.items():
            mask = getattr(self.layers[name], MASK)
            if not mask.all():
                mask.fill_(True)
                self.kept_magnitude.pop(name, None)
                if isinstance(stowed := getattr(self.layers[name], DROPPED, None), torch.Tensor):
                    stowed.zero_()  # the dropped weights train again from 0: none to put back
                rank_zero_info(f"Sparsity24: {name} goes dense after a surgery: {reason}")
        rederive = [n for n in changed if n not in dense and not is_24(getattr(self.layers[n], MASK))]
        if rederive:
            self.prune(trainer, pl_module, rederive)
        self.rederived += len(rederive)
        self._shapes = {name: m.weight.shape for name, m in self.layers.items()}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:  # a surgery in the last step: the model leaves fit 2:4 (for export) all the same
            self._follow_surgery(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.pruned and self.kept_magnitude:
            kept = sum(self.kept_magnitude.values()) / len(self.kept_magnitude)
            metrics = {"sparsity/kept_magnitude": kept, "sparsity/masks_rederived": float(self.rederived)}
            if self.recompute_every_n_steps is not None:
                metrics["sparsity/masks_changed"] = self.masks_changed
            if self.permutation is not None:
                gain = self.permutation.gain()
                metrics["sparsity/kept_magnitude_gain"] = sum(gain.values()) / max(1, len(gain))
            pl_module.log_dict(metrics)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for enforcer in self._enforcers:
            enforcer.remove()
        self._enforcers = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "kept_magnitude": dict(self.kept_magnitude),
            "masked_at_step": self.masked_at_step,
            "recomputed": self.recomputed,
            "rederived": self.rederived,
            "masks_changed": self.masks_changed,
            "permutation": self.permutation.to_dict() if self.permutation is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = bool(state_dict["pruned"])
        self.kept_magnitude = dict(state_dict.get("kept_magnitude", {}))
        self.masked_at_step = int(state_dict.get("masked_at_step", 0))
        self.recomputed = int(state_dict.get("recomputed", 0))
        self.rederived = int(state_dict.get("rederived", 0))
        self.masks_changed = float(state_dict.get("masks_changed", 0.0))
        if state_dict.get("permutation"):
            self.permutation = PermutationReport(**state_dict["permutation"])
