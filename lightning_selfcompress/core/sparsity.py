"""2:4 structured sparsity masks, along the axis where TensorRT's sparse tensor cores look for them.

A weight is 2:4 sparse when, in every group of 4 consecutive input channels, at most 2 weights are non-zero: for a
Linear [out, in], groups of 4 consecutive inputs in each row; for a convolution [K, C, R, S], groups of 4
consecutive input channels c at each (k, r, s). Both views are the matrix `as_rows(weight)`: rows (r, s, k), columns
c (a Linear is its own matrix), so that every mask here is computed on and checked against one layout.

Two ways to choose the kept weights by magnitude (NVIDIA ASP's calculators):
- `mask_1d` (ASP's m4n2_1d): in each group of 4, keep the 2 largest magnitudes (the best of the 6 patterns).
- `mask_2d` (ASP's m4n2_2d_best): in each 4x4 block of the matrix (4 rows by 4 input channels), the pattern with
  2 kept per row and 2 per column that keeps the most magnitude, of the 90 such patterns. The transposed weight
  that the backward pass multiplies with is then 2:4 too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .checks import check_choice, check_integer
from .quant import check_patterns, check_patterns_match, selected

__all__ = [
    "MaskEnforcer",
    "Sparsifier24",
    "apply_masks",
    "as_rows",
    "attach_masks",
    "eligible_layers",
    "from_rows",
    "ineligible_reason",
    "is_24",
    "kept_magnitude",
    "mask_1d",
    "mask_2d",
    "masked_layers",
    "recompute_mask",
    "stow_dropped",
]

MASK = "weight_mask"  # the buffer's name: masks live in the state_dict and in checkpoints
DROPPED = "weight_dropped"  # the weights a mask dropped, kept for recomputing masks
CALCULATORS: dict = {}  # name -> mask function, filled below


def as_rows(weight: Tensor) -> Tensor:
    """The weight as a matrix whose rows hold the input channels: Linear [out, in]; conv [K, C, *k] -> [*k K, C]."""
    if weight.dim() == 2:
        return weight
    if weight.dim() < 3:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} is neither a Linear's nor a convolution's")
    return weight.movedim(1, -1).movedim(0, -2).reshape(-1, weight.shape[1])


def from_rows(matrix: Tensor, shape: torch.Size) -> Tensor:
    """Undo `as_rows` for a weight of `shape`."""
    if len(shape) == 2:
        return matrix
    kernel = tuple(shape[2:])
    return matrix.reshape(*kernel, shape[0], shape[1]).movedim(-2, 0).movedim(-1, 1).contiguous()


def _check_groups(matrix: Tensor, shape: torch.Size) -> None:
    if matrix.shape[1] % 4:
        raise ValueError(
            f"a weight of shape {tuple(shape)} has {matrix.shape[1]} input channels, not a multiple of 4: it cannot "
            "hold a 2:4 pattern along its input channels"
        )


def mask_1d(weight: Tensor) -> Tensor:
    """Keep the 2 largest magnitudes in every group of 4 consecutive input channels. Same shape as `weight`, bool."""
    matrix = as_rows(weight.detach())
    _check_groups(matrix, weight.shape)
    groups = matrix.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return from_rows(keep.reshape(matrix.shape), weight.shape)


def _patterns_2d() -> Tensor:
    """The 90 4x4 binary patterns with exactly 2 ones in every row and every column, flattened: [90, 16]."""
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    found = [p for p in itertools.product(rows, repeat=4) if all(sum(col) == 2 for col in zip(*p))]
    return torch.tensor(found, dtype=torch.float32).reshape(len(found), 16)


_PATTERNS_2D = _patterns_2d()


def mask_2d(weight: Tensor) -> Tensor:
    """In every 4x4 block (4 rows of `as_rows`, 4 input channels), the 2-per-row, 2-per-column pattern that keeps
    the most magnitude. Needs the rows (for a conv, the output channels K) to be a multiple of 4 too."""
    matrix = as_rows(weight.detach())
    _check_groups(matrix, weight.shape)
    out_channels = weight.shape[0]
    if out_channels % 4:
        raise ValueError(
            f"a weight of shape {tuple(weight.shape)} has {out_channels} output channels, not a multiple of 4: the "
            "2-D calculator needs 4x4 blocks; use mask_1d"
        )
    rows, cols = matrix.shape
    blocks = matrix.abs().float().reshape(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(-1, 16)
    patterns = _PATTERNS_2D.to(blocks.device)
    best = patterns[(blocks @ patterns.T).argmax(1)]
    keep = best.reshape(rows // 4, cols // 4, 4, 4).transpose(1, 2).reshape(rows, cols).bool()
    return from_rows(keep, weight.shape)


def is_24(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive input channels holds at most 2 non-zeros (what TensorRT checks)."""
    matrix = as_rows(weight.detach())
    if matrix.shape[1] % 4:
        return False
    return bool(((matrix != 0).reshape(-1, 4).sum(1) <= 2).all())


def kept_magnitude(weight: Tensor, mask: Tensor) -> float:
    """The fraction of the weight's total magnitude that `mask` keeps."""
    magnitude = weight.detach().abs().float()
    return float((magnitude * mask).sum() / magnitude.sum().clamp_min(torch.finfo(torch.float32).tiny))


def ineligible_reason(module: nn.Module, calculator: str = "1d") -> str | None:
    """Why this layer cannot be 2:4-sparse the way TensorRT runs it (None: it can). Stated rules: a Linear or an
    ungrouped convolution whose input channels are a multiple of 4, and more than 4 of them (a 3-channel stem or a
    depthwise convolution stays dense: too few inputs per output for a sparse kernel to pay); the 2-D calculator
    also needs the output channels to be a multiple of 4; a quantizer on the mid-rise grid has no zero level for
    the pruned weights to take."""
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and quantizer.offset:
        return "its quantizer's mid-rise grid has no zero level (train with grid='integer' for 2:4 sparsity)"
    if isinstance(module, _ConvNd):
        if module.transposed:
            return "transposed convolution: its weight is [in, out, ...], not supported"
        if module.groups > 1:
            return f"grouped convolution (groups={module.groups}): TensorRT runs it dense"
        inputs = module.in_channels
    elif isinstance(module, nn.Linear):
        inputs = module.in_features
    else:
        return f"{type(module).__name__} is neither a convolution nor a Linear"
    if inputs % 4:
        return f"{inputs} input channels, not a multiple of 4"
    if inputs <= 4:
        return f"only {inputs} input channels: a 2:4 kernel does not pay"
    if calculator == "2d" and module.weight.shape[0] % 4:
        return f"{module.weight.shape[0]} output channels, not a multiple of 4 (the 2-D calculator's blocks)"
    return None


CALCULATORS.update({"1d": mask_1d, "2d": mask_2d})


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` that hold a 2:4 mask, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, MASK, None), Tensor)}


def eligible_layers(
    model: nn.Module, calculator: str = "1d", include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(the Conv/Linear layers that can hold a 2:4 pattern and that `include`/`exclude`, glob patterns on module
    names, select; {the others: why not}); an error if none can."""
    check_choice("calculator", calculator, sorted(CALCULATORS))
    check_patterns_match(model, include, exclude)
    eligible, skipped = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (_ConvNd, nn.Linear)):
            chosen = selected(name, include, exclude)
            reason = ineligible_reason(module, calculator) if chosen else "left out by include/exclude"
            if reason is None:
                eligible[name] = module
            else:
                skipped[name] = reason
    if not eligible:
        raise ValueError(
            f"No layer of {type(model).__name__} can hold a 2:4 pattern: "
            + "; ".join(f"{n}: {r}" for n, r in skipped.items())
        )
    return eligible, skipped


@torch.no_grad()
def attach_masks(
    model: nn.Module, calculator: str = "1d", include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Give every eligible Conv/Linear a 2:4 mask by magnitude (a `weight_mask` buffer) and zero what it drops.

    Returns (masked layers, {skipped layer: why}). A layer that already has a mask gets a new one from its weights.
    """
    masked, skipped = eligible_layers(model, calculator, include, exclude)
    for module in masked.values():
        mask = CALCULATORS[calculator](module.weight)
        module.register_buffer(MASK, mask)
        module.weight.mul_(mask)
    return masked, skipped


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], optimizers=()) -> None:
    """Zero the masked weights, and every optimizer state tensor of the weight's shape at the masked positions."""
    for module in layers.values():
        mask = getattr(module, MASK)
        if mask.shape != module.weight.shape:
            raise ValueError(
                f"The 2:4 mask {tuple(mask.shape)} no longer fits the weight {tuple(module.weight.shape)} of "
                f"{type(module).__name__}: re-derive it (attach_masks) after changing the layer."
            )
        module.weight.mul_(mask)
        for optimizer in optimizers:
            for value in optimizer.state.get(module.weight, {}).values():
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    value.mul_(mask)


@torch.no_grad()
def recompute_mask(module: nn.Module, calculator: str = "1d") -> Tensor:
    """Derive `module`'s mask anew by magnitude, the way ASP recomputes masks (`allow_recompute_mask`).

    Under enforcement the weights a mask drops are exactly zero, so a magnitude mask derived from the weights alone
    would only find itself again. As in ASP, a module that has a `weight_dropped` buffer (see `stow_dropped`) keeps
    there the weights its mask dropped, at their value of that moment; they are put back before the new mask is
    chosen, so the trained kept weights compete with the frozen dropped ones and a kept weight that shrank in
    training can lose its place to one that was dropped. Zeroes what the new mask drops and returns those weights.
    """
    weight, stowed = module.weight, getattr(module, DROPPED, None)
    if isinstance(stowed, Tensor):
        weight.add_(stowed)  # the weight is 0 wherever the stowed weights are not
    mask = CALCULATORS[calculator](weight)
    getattr(module, MASK).copy_(mask)
    dropped = weight * ~mask
    weight.mul_(mask)
    if isinstance(stowed, Tensor):
        stowed.copy_(dropped)
    return dropped


def stow_dropped(module: nn.Module) -> None:
    """Give `module` a `weight_dropped` buffer (zeros) for `recompute_mask`: a buffer of the weight's shape, so a
    surgery or a permutation moves it with the weight, and checkpoints carry it."""
    if not isinstance(getattr(module, DROPPED, None), Tensor):
        module.register_buffer(DROPPED, torch.zeros_like(module.weight, memory_format=torch.preserve_format))


class MaskEnforcer:
    """Keeps masked weights exactly zero through `optimizer.step()`: gradients are masked before the step (so no
    momentum or Adam moment builds up where a weight is pruned), weights and state after it (weight decay and state
    from before the mask cannot leak either)."""

    def __init__(self, optimizer: torch.optim.Optimizer, layers: dict[str, nn.Module]) -> None:
        self.optimizer, self.layers = optimizer, layers
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._weights = {name: m for name, m in layers.items() if id(m.weight) in held}
        apply_masks(self._weights, [optimizer])
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self._mask_grads()),
            optimizer.register_step_post_hook(lambda *_: apply_masks(self._weights, [self.optimizer])),
        ]

    @torch.no_grad()
    def _mask_grads(self) -> None:
        for module in self._weights.values():
            if module.weight.grad is not None:
                module.weight.grad.mul_(getattr(module, MASK))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class Sparsifier24:
    """NVIDIA ASP's 2:4 workflow over a model, in plain PyTorch: all-ones masks on the eligible layers (`attach`),
    one magnitude prune (`prune`), the pattern kept through every optimizer step (`enforce`), the masks derived anew
    by magnitude every `recompute_every_n_steps` steps if asked (`step`), and kept 2:4 when a surgery changes a layer's
    shape (`follow_shapes`). Its state (`state_dict`) is what a checkpoint needs beside the model's mask buffers.
    `Sparsity24` is its Lightning adapter.

    Args:
        calculator: "1d" (best 2 of every 4, ASP's m4n2_1d) or "2d" (4x4 blocks 2:4 along rows and columns).
        recompute_every_n_steps: None (ASP's workflow: the masks stay as the prune chose them), or the optimizer steps
            between recomputed masks; the weights a mask dropped are then stowed at their value when dropped and
            compete again at each recompute (ASP's `allow_recompute_mask`).
        include: glob patterns on module names: which eligible layers get masks.
        exclude: glob patterns on module names: eligible layers that stay dense.
    """

    def __init__(
        self,
        calculator: str = "1d",
        recompute_every_n_steps: int | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
    ) -> None:
        check_choice("calculator", calculator, sorted(CALCULATORS))
        every = check_integer("recompute_every_n_steps", recompute_every_n_steps, none="masks fixed after the prune")
        self.calculator, self.recompute_every_n_steps = calculator, every
        self.include, self.exclude = check_patterns("include", include), check_patterns("exclude", exclude)
        self.layers: dict[str, nn.Module] = {}
        self.skipped: dict[str, str] = {}  # layer -> why it stays dense
        self.pruned = False
        self.masked_at_step = 0  # the optimizer step of the last prune or recompute of every mask
        self.recomputed, self.masks_changed = 0, 0.0
        self.kept_magnitude: dict[str, float] = {}
        self.rederived = 0  # masks derived anew after surgeries shifted their groups of 4
        self._enforcers: list[MaskEnforcer] = []
        self._shapes: dict[str, torch.Size] = {}

    def attach(self, model: nn.Module) -> None:
        """All-ones masks on the eligible layers, before the optimizer is built and a checkpoint's masks load."""
        self.layers, self.skipped = eligible_layers(model, self.calculator, self.include, self.exclude)
        for module in self.layers.values():
            if not isinstance(getattr(module, MASK, None), Tensor):
                module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
            if self.recompute_every_n_steps is not None:
                stow_dropped(module)

    def enforce(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Keep the masks through these optimizers' steps; every layer's shape is checked at the next `step`."""
        self.remove()
        self._enforcers = [MaskEnforcer(optimizer, self.layers) for optimizer in optimizers]
        self._shapes = {}

    @torch.no_grad()
    def prune(self, optimizers: Sequence[torch.optim.Optimizer], step: int, names: list[str] | None = None) -> None:
        """Derive masks by magnitude (for `names`, default every eligible layer) and zero what they drop."""
        for name in names or [n for n, m in self.layers.items() if ineligible_reason(m, self.calculator) is None]:
            module = self.layers[name]
            dropped = recompute_mask(module, self.calculator)
            self.kept_magnitude[name] = kept_magnitude(module.weight + dropped, getattr(module, MASK))
        apply_masks(self.layers, optimizers)
        self.pruned = True
        if names is None:
            self.masked_at_step = step

    def step(self, optimizers: Sequence[torch.optim.Optimizer], step: int) -> dict[str, str]:
        """Before optimizer step `step`, once pruned: follow surgeries, and recompute the masks when due. Returns the
        layers a surgery made dense, with why."""
        if not self.pruned:
            return {}
        dense = self.follow_shapes(optimizers, step)
        every = self.recompute_every_n_steps
        if every is not None and step - self.masked_at_step >= every:
            before = {name: getattr(m, MASK).clone() for name, m in self.layers.items()}
            self.prune(optimizers, step)
            changed = sum(int((getattr(m, MASK) != before[n]).sum()) for n, m in self.layers.items())
            self.masks_changed = changed / sum(m.weight.numel() for m in self.layers.values())
            self.recomputed += 1
        return dense

    def follow_shapes(self, optimizers: Sequence[torch.optim.Optimizer], step: int) -> dict[str, str]:
        """A surgery sliced a masked layer: keep its mask 2:4 on the new groups of 4, or let it go dense (returned,
        with why). Every layer counts as changed after `enforce`, so that a checkpoint saved between a surgery and
        this check resumes to the same masks as the uninterrupted run."""
        changed = [name for name, m in self.layers.items() if m.weight.shape != self._shapes.get(name)]
        if not changed:  # every step: nothing else to do unless a surgery ran
            return {}
        dense = {n: r for n in changed if (r := ineligible_reason(self.layers[n], self.calculator)) is not None}
        gone = {}
        for name, reason in dense.items():
            mask = getattr(self.layers[name], MASK)
            if not mask.all():
                mask.fill_(True)
                self.kept_magnitude.pop(name, None)
                if isinstance(stowed := getattr(self.layers[name], DROPPED, None), Tensor):
                    stowed.zero_()  # the dropped weights train again from 0: none to put back
                gone[name] = reason
        rederive = [n for n in changed if n not in dense and not is_24(getattr(self.layers[n], MASK))]
        if rederive:
            self.prune(optimizers, step, rederive)
        self.rederived += len(rederive)
        self._shapes = {name: m.weight.shape for name, m in self.layers.items()}
        return gone

    def metrics(self) -> dict[str, float]:
        """What to log once pruned: mean kept magnitude, masks re-derived after surgeries, masks a recompute changed."""
        if not (self.pruned and self.kept_magnitude):
            return {}
        metrics = {
            "sparsity/kept_magnitude": sum(self.kept_magnitude.values()) / len(self.kept_magnitude),
            "sparsity/masks_rederived": float(self.rederived),
        }
        if self.recompute_every_n_steps is not None:
            metrics["sparsity/masks_changed"] = self.masks_changed
        return metrics

    def remove(self) -> None:
        """Stop enforcing the masks (the hooks on the optimizers go); the masks stay on the layers."""
        for enforcer in self._enforcers:
            enforcer.remove()
        self._enforcers = []

    def state_dict(self) -> dict:
        """Whether the masks are pruned, and what they kept: for a checkpoint."""
        return {"pruned": self.pruned, "kept_magnitude": dict(self.kept_magnitude),
                "masked_at_step": self.masked_at_step, "recomputed": self.recomputed, "rederived": self.rederived,
                "masks_changed": self.masks_changed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`'s output (the masks themselves load with the model's weights)."""
        self.pruned = bool(state["pruned"])
        self.kept_magnitude = dict(state.get("kept_magnitude", {}))
        self.masked_at_step = int(state.get("masked_at_step", 0))
        self.recomputed = int(state.get("recomputed", 0))
        self.rederived = int(state.get("rederived", 0))
        self.masks_changed = float(state.get("masks_changed", 0.0))
