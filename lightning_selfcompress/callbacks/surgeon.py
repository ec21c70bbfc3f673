"""Lightning adapter for the structural surgeon: remove dead channels while training, keep the history in checkpoints."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from ..core.checks import check_choice, check_flag, check_integer
from ..core.groups import ChannelGraph
from ..core.inputs import model_input
from ..core.quant import check_patterns
from ..core.size import LayerShape
from ..core.surgery import SURGERY_KEY, Surgeon, SurgeryRecord, check_optimizer, traced_input
from ..core.widths import BACKENDS, default_cache_dir, latency_tables, stream_pressure
from ..report import print_surgery_table
from .strategies import check_strategy, half_dtype

__all__ = ["ChannelSurgeon"]

WIDTHS = ("any", *BACKENDS)


class ChannelSurgeon(Callback):
    """Physically removes channel groups whose bit depth reached 0 and whose constant output is provably harmless,
    from every layer that produces, normalises or consumes them, optimizer state included. Pairs with
    `SelfCompression`; the LightningModule is not changed.

    Args:
        every_n_steps: run a surgery after every this many optimizer steps (None: never by steps).
        on_epoch_end: also run one at the end of every training epoch.
        constant_pull: per step, how far the biases and norm scales/shifts of dead channels are pulled towards
            zero (the paper's L1 pull, as a proximal step), so that their constant output can be removed. 0: off.
        atol: how far from zero (or from train/eval agreement, for folding) a dead channel's constant may be.
            0 (the default) removes only what provably leaves the function unchanged.
        round_to: keep every layer whose width is a multiple of this a multiple of it (8 for GPU tensor cores),
            leaving some dead channels in place until enough have died. With latency steps, only the steps that are
            multiples of it count.
        widths: "any", or "onnxruntime-cpu": cut each layer only to the widths on its latency staircase, measured
            once in ONNX Runtime on this machine's CPU (`core.widths`, cached on disk), and on its channel block
            (16 with AVX-512, 8 with AVX2) or half of it where the table says that pays, so that every cut makes
            the deployed layer faster; dead channels wait as exact zeros until the next step down is reached.
            "onnxruntime-cpu-int8": the same for ONNX Runtime's integer kernels (a file exported with int8
            activations, `runtime="onnxruntime"`), whose steps are not the float kernels' steps. "tensorrt-int8":
            TensorRT's int8 engines on this CUDA GPU (the export's default int8 file; needs `tensorrt`), each width
            an engine, on multiples of 8. "torch": PyTorch's own steps (eager, in the run's precision: its half type
            under bf16/16 precision) on the device the model trains on, a GPU's where it trains on one.
        latency_batch: the batch size at which the latency tables are measured.
        width_tolerance: a width counts as a step only if it is at least this fraction faster than the next one up.
        width_pressure: with latency steps, added per optimizer step to the gradient of b of each layer's weakest
            live channels above the step below its live count (`core.widths.stream_pressure`; on a residual stream,
            channel groups, in every layer that writes them, those some writer let go first), so that the layer
            reaches that step instead of keeping dead channels that the file still stores. 0: off.
        include: glob patterns on module names: the layers whose dead channels may be cut (default: all).
        exclude: glob patterns on module names: layers never cut (their dead channels stay, as exact zeros).
    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        *,
        on_epoch_end: bool = False,
        constant_pull: float = 1e-3,
        atol: float = 0.0,
        round_to: int = 1,
        widths: str = "any",
        latency_batch: int = 64,
        width_tolerance: float = 0.02,
        width_pressure: float = 0.0,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
    ) -> None:
        check_integer("every_n_steps", every_n_steps, none="only at epoch ends")
        check_flag("on_epoch_end", on_epoch_end)
        if every_n_steps is None and not on_epoch_end:
            raise ValueError("ChannelSurgeon would never run: set every_n_steps or on_epoch_end=True.")
        if not constant_pull >= 0:
            raise ValueError(f"constant_pull={constant_pull} must be >= 0 (0 turns the pull off).")
        Surgeon.check_options(atol, round_to)
        check_choice("widths", widths, WIDTHS)
        check_integer("latency_batch", latency_batch)
        if not 0 <= width_tolerance < 1:
            raise ValueError(f"width_tolerance={width_tolerance} must be a fraction in [0, 1).")
        if not (width_pressure >= 0 and (width_pressure == 0 or widths != "any")):
            raise ValueError(
                f"width_pressure={width_pressure} must be >= 0 and needs latency steps (not widths='any')."
            )
        self.widths, self.latency_batch, self.width_tolerance = widths, latency_batch, width_tolerance
        self.width_pressure = width_pressure
        self.step_widths: dict[str, list[int]] = {}  # per layer, the widths it may be cut to (widths != "any")
        self._resumed_steps: dict[str, list[int]] | None = None  # those of the checkpoint a run resumes from
        self.every_n_steps = every_n_steps
        self.on_epoch_end = on_epoch_end
        self.constant_pull = constant_pull
        self.atol = atol
        self.round_to = round_to
        self.include, self.exclude = check_patterns("include", include), check_patterns("exclude", exclude)
        self.surgeon: Surgeon | None = None
        self.example_input: Tensor | None = None
        self.original: dict[str, tuple[int, int]] = {}  # module -> (output channels, weights) as first traced
        self.original_macs = 0
        self._restore = None
        self._last_step = -1

    @property
    def history(self) -> list[SurgeryRecord]:
        """Every surgery of this run (and of the run it resumed), oldest first."""
        return self.surgeon.history if self.surgeon else []

    # ---- set-up and resume ---------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "ChannelSurgeon")
        averaging = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, (StochasticWeightAveraging, WeightAveraging))]
        if averaging:
            raise RuntimeError(
                f"ChannelSurgeon cannot be combined with {averaging}: the averaged copy of the weights would keep "
                "the removed channels. Drop one of the two callbacks."
            )
        if self.surgeon is not None and self.surgeon.graph.model is not pl_module:
            self.surgeon = None  # a different module than the one traced
        # Lightning restores weights after setup() and before callback state, via the strategy: the history in the
        # checkpoint must reshape the model just before the weights load, so wrap that one call.
        strategy = trainer.strategy
        load = strategy.load_model_state_dict

        def replay_then_load(checkpoint: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
            saved = (checkpoint.get(SURGERY_KEY) or {}).get("latency_steps") or {}
            if saved.get("widths") == self.widths:  # a resumed run keeps its steps, on any machine, without timing
                self._resumed_steps = saved["steps"]
            self._replay(pl_module, checkpoint.get(SURGERY_KEY), trainer)
            return load(checkpoint, *args, **kwargs)

        strategy.load_model_state_dict = replay_then_load
        self._restore = (strategy, load)

    def _replay(self, pl_module: pl.LightningModule, state: Mapping[str, Any] | None, trainer: pl.Trainer) -> None:
        if not state or not state.get("history"):
            return
        if self.surgeon is not None and self.surgeon.history:
            if [r.to_dict() for r in self.surgeon.history] == list(state["history"]):
                return  # this module was cut in this process already
            raise RuntimeError(
                f"ChannelSurgeon: this module has been cut {len(self.surgeon.history)} times in this process, the "
                f"checkpoint's model {len(state['history'])} times, and cut channels cannot be put back. Evaluate "
                "that checkpoint on a freshly built module (or `load_compressed(fresh_module, path)`)."
            )
        self._trace(pl_module, traced_input(state), trainer)
        self.surgeon.replay(state["history"])
        self.surgeon.cuts.check_unchanged()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._restore is not None:
            strategy, load = self._restore
            strategy.load_model_state_dict = load
            self._restore = None

    def _trace(self, pl_module: pl.LightningModule, example: Tensor, trainer: pl.Trainer) -> None:
        device = next(pl_module.parameters()).device
        self.example_input = example.detach()[:2].to(device)
        graph = ChannelGraph(pl_module, self.example_input)
        if self.widths in BACKENDS:  # traced before any cut: the tables cover every width
            steps, self._resumed_steps = self._resumed_steps, None
            if steps is None:  # measured on rank 0 alone (ranks timing at once would slow each other), for all
                if trainer.is_global_zero:
                    rank_zero_info(f"ChannelSurgeon: latency tables ({self.widths}, batch {self.latency_batch}) from "
                                   f"{default_cache_dir()}, each timed there once per machine (idle is best)")
                    autocast = half_dtype(trainer) if self.widths == "torch" else None
                    tables = latency_tables(graph, self.example_input, backend=self.widths, batch=self.latency_batch,
                                            autocast=autocast)
                    steps = {name: t.step_widths(self.width_tolerance, self.round_to) for name, t in tables.items()}
                steps = trainer.strategy.broadcast(steps, src=0)
            self.step_widths = steps
            rank_zero_info(f"ChannelSurgeon: widths each layer may be cut to ({self.widths}): {self.step_widths}")
        self.surgeon = Surgeon(graph, self.atol, self.round_to, self.step_widths or None, self.include, self.exclude)
        self.original = {
            name: (len(groups), pl_module.get_submodule(name).weight.numel()) for name, groups in graph.outputs.items()
        }
        self.original_macs = graph.macs()

    # ---- training ------------------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # before the first step, not at the first cut
            check_optimizer(optimizer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.surgeon is None:
            self._trace(pl_module, model_input(pl_module, batch, "ChannelSurgeon"), trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.width_pressure:
            return
        bits = self.surgeon.producer_bits()
        pressure = stream_pressure(bits, self.surgeon.present_groups(), self.step_widths, self.width_pressure)
        for name, grad in pressure.items():
            b = bits[name]
            if b.requires_grad:  # not in the whole-bit phase; after the backward pass (and AMP unscaling)
                b.grad = grad if b.grad is None else b.grad.add_(grad)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step:  # within a gradient-accumulation window: act once per optimizer step
            return
        self._last_step = step
        if self.constant_pull:
            dead = self.surgeon.pull_constants(self.constant_pull)
            pl_module.log("surgeon/dead_groups", float(dead), on_step=True, on_epoch=False)
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self.operate(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_epoch_end and self.surgeon is not None:
            self.operate(trainer, pl_module)

    def operate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SurgeryRecord | None:
        """One surgery now: find the removable groups and remove them from the model and the optimizers."""
        self.surgeon.settle_statistics()  # a training-time step, like the pull; the surgery itself changes nothing
        start = time.perf_counter()
        removal = trainer.strategy.broadcast(self.surgeon.find(), src=0)  # every rank takes rank 0's decision
        if not removal.count:
            return None
        record = self.surgeon.remove(removal, trainer.optimizers, step=trainer.global_step)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # DDP's gradient buckets were sized for the old shapes: wrap the module anew, as the strategy did
            trainer.strategy.model = pl_module
            trainer.strategy.configure_ddp()
        seconds = time.perf_counter() - start
        record.seconds = round(seconds, 4)
        metrics = {
            "surgeon/channels_removed": float(sum(record.channels.values())),
            "surgeon/weights_removed": float(record.weights_removed),
            "surgeon/seconds": seconds,
            "surgeon/macs": float(self.surgeon.graph.macs()),
        }
        if trainer.is_global_zero:  # straight to the loggers, once: `log` would repeat them at every logging step
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return record

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.surgeon is not None:
            self._print(pl_module)

    def summary(self, pl_module: pl.LightningModule) -> list[LayerShape]:
        """Per producer layer: output channels and weights as first traced, and now."""
        rows = []
        for name, (channels, weights) in self.original.items():
            weight = pl_module.get_submodule(name).weight
            rows.append(LayerShape(name, channels, weight.shape[0], weights, weight.numel()))
        return rows

    @rank_zero_only
    def _print(self, pl_module: pl.LightningModule) -> None:
        print_surgery_table(self.summary(pl_module), self.history)

    # ---- checkpoint ----------------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The history goes where `load_compressed` reads it, beside the weights (not in Lightning's callback slot):
        a plain PyTorch user reads the cut network from this file as from `save_compressed`'s."""
        checkpoint[SURGERY_KEY] = self.surgeon.state_dict() if self.surgeon else {"history": []}
        if self.step_widths:  # resumed, the run keeps cutting to these steps (timed anew they could differ)
            checkpoint[SURGERY_KEY]["latency_steps"] = {"widths": self.widths, "steps": self.step_widths}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The history was replayed before the weights loaded (see setup); here it only has to agree.
        history = (checkpoint.get(SURGERY_KEY) or {}).get("history")
        if history and [r.to_dict() for r in self.history] != list(history):
            raise RuntimeError("ChannelSurgeon: the checkpoint's surgery history was not replayed on this model.")
