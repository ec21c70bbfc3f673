"""Own learning rate and weight decay for some parameters of an optimizer the user built.

The quantizer's b and e sit in whatever param groups the user's `configure_optimizers` made. Adding groups would
break optimizer checkpoints (the group count changes) and LR schedulers (they hold one entry per group). Instead,
around each `step()` the chosen parameters are moved into temporary groups with their own hyper-parameters and
put back afterwards: outside a step the optimizer is exactly the one the user built. Optimizer state is keyed by
the parameter, so it follows them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["HyperparameterOverride"]


class HyperparameterOverride:
    """Step `params` with `lr` (scaled along with the group's LR schedule) and `weight_decay`.

    `lr=None` keeps each group's own learning rate. Otherwise `lr` is the rate at the schedule's peak: it is scaled
    by the group's rate over the largest of its `initial_lr` (which every `torch.optim.lr_scheduler` sets), its
    `max_lr` (OneCycleLR's peak; its `initial_lr` is 25 times lower) and the largest rate seen, so a cosine decay
    decays the quantizer rate in proportion and a warm-up never lifts it past `lr`.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], lr: float | None, weight_decay: float
    ) -> None:
        self.optimizer = optimizer
        self.params = {id(p) for p in params}
        self.lr = lr
        self.weight_decay = weight_decay
        self._saved: list[list[nn.Parameter]] | None = None
        self._peaks: dict[int, float] = {}  # per group index: the largest rate it has had
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self._split()),
            optimizer.register_step_post_hook(lambda *_: self._restore()),
        ]

    def _split(self) -> None:
        groups = self.optimizer.param_groups
        self._saved = [group["params"] for group in groups]
        for index, group in enumerate(list(groups)):
            ours = [p for p in group["params"] if id(p) in self.params]
            if not ours:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in self.params]
            lr = group["lr"]
            if self.lr is not None:
                peak = max(lr, group.get("initial_lr", lr), group.get("max_lr", lr), self._peaks.get(index, lr))
                self._peaks[index] = peak
                lr = self.lr * lr / peak
            shadow = {k: v for k, v in group.items() if k != "params"}
            shadow.update(params=ours, lr=lr, weight_decay=self.weight_decay)
            groups.append(shadow)

    def _restore(self) -> None:
        if self._saved is None:
            return
        groups = self.optimizer.param_groups
        del groups[len(self._saved):]
        for group, params in zip(groups, self._saved):
            group["params"] = params
        self._saved = None

    def remove(self) -> None:
        self._restore()
        for handle in self._handles:
            handle.remove()
