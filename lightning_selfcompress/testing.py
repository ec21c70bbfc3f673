"""Helpers for tests and benchmarks of channel surgery: pick channel groups at random and make them dead, the way
self-compression leaves them (bit depth 0, constant output zero); and the survey of torchvision's classifiers that
both the zoo test and `bench/zoo.py` run."""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .core.groups import ChannelGraph, Cuts, GraphError
from .core.ops import LeafTracer, weights_read_directly

__all__ = [
    "ZooRow", "choose_branch_channels", "choose_groups", "kill_branch_channels", "kill_groups",
    "randomize_zero_weights", "removable_groups", "survey_torchvision",
]  # fmt: skip


@torch.no_grad()
def randomize_zero_weights(net: nn.Module, std: float = 0.02) -> None:
    """Weights initialised to zeros (ViT's head, its class token) make every output the same before and after a
    cut, which would hide any difference: give them random values."""
    for p in net.parameters():
        if p.dim() > 1 and not p.any():
            p.normal_(0, std)


def _cuts(model: ChannelGraph | Cuts) -> Cuts:
    """The model as a surgeon left it (its `cuts`), or as traced (a graph)."""
    return model if isinstance(model, Cuts) else Cuts(model)


def removable_groups(model: ChannelGraph | Cuts) -> Tensor:
    """Groups that have a producer, are not pinned and are still there."""
    cuts = _cuts(model)
    graph = cuts.graph
    has_producer = torch.zeros(graph.num_groups, dtype=torch.bool)
    for groups in graph.outputs.values():
        has_producer[groups] = True
    return has_producer & ~graph.pinned_mask & ~cuts.removed


def choose_groups(model: ChannelGraph | Cuts, fraction: float, seed: int = 0) -> Tensor:
    """A random `fraction` of the removable groups, as a mask over all groups."""
    graph = _cuts(model).graph
    candidates = removable_groups(model).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(graph.num_groups, dtype=torch.bool)
    mask[candidates[order[: int(fraction * len(candidates))]]] = True
    return mask


@torch.no_grad()
def kill_groups(model: ChannelGraph | Cuts, mask: Tensor, bits: bool = True) -> None:
    """Make the chosen groups emit exact zeros: producer bit depths (`bits=True`, quantized layers) or weights set to
    0, producer biases 0, and the shift and running mean of every per-channel module they pass through 0."""
    cuts = _cuts(model)
    for role in ("outputs", "members"):
        for name, groups in getattr(cuts.graph, role).items():
            _kill(cuts.graph.model.get_submodule(name), role, mask[groups[cuts.present(name, role)]], bits)


def choose_branch_channels(
    model: ChannelGraph | Cuts, fraction: float, seed: int = 0, spare: Tensor | None = None
) -> dict[str, Tensor]:
    """Per residual branch, a random `fraction` of its channels still there (and not in the groups `spare`), to
    remove from that branch alone; as masks over the producer's original positions."""
    now = _cuts(model)
    generator = torch.Generator().manual_seed(seed)
    cuts = {}
    for producer in now.graph.branches:
        groups = now.graph.outputs[producer]
        candidates = (now.present(producer, "outputs") & ~(spare[groups] if spare is not None else False)).nonzero()
        chosen = candidates.flatten()[torch.randperm(len(candidates), generator=generator)[: int(fraction * len(candidates))]]
        if len(chosen) and len(chosen) < len(candidates):
            cuts[producer] = torch.zeros(len(groups), dtype=torch.bool)
            cuts[producer][chosen] = True
    return cuts


@torch.no_grad()
def kill_branch_channels(model: ChannelGraph | Cuts, cuts: dict[str, Tensor], bits: bool = True) -> None:
    """Make the chosen channels of each branch add exact zeros: as `kill_groups`, on the branch's own modules."""
    now = _cuts(model)
    for producer, cut in cuts.items():
        for name, role in ((producer, "outputs"), *((m, "members") for m in now.graph.branches[producer].members)):
            _kill(now.graph.model.get_submodule(name), role, cut[now.present(name, role)], bits)


def _kill(module: nn.Module, role: str, where: Tensor, bits: bool) -> None:
    tensors = [module.weight_quantizer.bits if bits else module.weight] if role == "outputs" else []
    tensors += [t for t in (getattr(module, "bias", None), getattr(module, "running_mean", None)) if t is not None]
    for tensor in tensors:
        tensor[where.to(tensor.device)] = 0.0


# ---- the torchvision survey ----------------------------------------------------------------------------------------

SIDES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}  # the sides these need; the others 32 x 32
IMAGE_SIZE = {"vit_b_16": 32, "vit_b_32": 64, "vit_l_16": 32, "vit_l_32": 64, "vit_h_14": 28}  # 2 x 2 patches
SURGERY_TOLERANCE, EXPORT_TOLERANCE = 1e-5, 1e-4  # relative to the largest output


@dataclass
class ZooRow:
    """One model of the survey. `status`: exact (surgery within 1e-5 in train and eval mode, the history replayed
    bit for bit on a fresh copy, and the cut model's ONNX file within 1e-4 of it, or refused by torch.onnx before the
    cut as well), refused (a GraphError naming what the channel graph cannot follow), wrong, crashed or not run."""

    model: str
    status: str = ""
    detail: str = ""
    params: int = 0
    groups_removed: int = 0
    branch_channels: int = 0
    surgery: float = float("nan")  # the largest relative difference, train or eval mode
    replay: bool = False  # the replayed copy gives the same outputs bit for bit
    export: str = ""  # the parity of the cut model's ONNX file, or why torch.onnx cannot export it (nor the uncut one)
    seconds: float = 0.0


def _build(name: str) -> nn.Module:
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    if name in IMAGE_SIZE:
        kwargs["image_size"] = IMAGE_SIZE[name]
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _prepare(name: str, net: nn.Module) -> tuple[nn.Module, Tensor]:
    """float64 where there is BatchNorm (in train mode, over a few samples, it amplifies float32 round-off past 1e-5)
    and for Swin V2 (its LayerNorm at the end of every residual branch did too: 1.2e-5 on one CPU of this project's
    machine kind, under 1e-5 on another), else float32; running statistics made non-trivial and frozen, dropout and
    stochastic depth off (their masks are drawn per call), quantizers on every layer whose weight goes through its
    forward."""
    import torchvision

    from .core.quant import QuantizationConfig, attach_quantizers

    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    dtype = torch.float64 if batchnorm or name.startswith("swin_v2") else torch.float32
    net = net.to(dtype)
    randomize_zero_weights(net)
    side = SIDES.get(name, IMAGE_SIZE.get(name, 32))
    x = torch.randn(4, 3, side, side, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.train()(x)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
        if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth)):
            m.p = 0.0
    attach_quantizers(net, QuantizationConfig(exclude=weights_read_directly(LeafTracer().trace(net))))
    return net, x


@torch.no_grad()
def survey_torchvision(name: str, max_params: float = float("inf")) -> ZooRow:
    """Cut 30% of the removable channel groups of torchvision's `name` and 30% of each residual branch's channels
    from that branch alone; compare outputs, replay the history on a fresh copy, export the cut model to ONNX."""
    from .core.surgery import Surgeon

    row, started = ZooRow(name), time.perf_counter()
    try:
        net = _build(name)
        row.params = sum(p.numel() for p in net.parameters())
        if row.params > max_params:
            row.status, row.detail = "not run", f"{row.params / 1e6:.0f} M parameters, past the limit"
            return row
        net, x = _prepare(name, net)
        fresh = copy.deepcopy(net)
        graph = ChannelGraph(net, x[:2])
        killed = choose_groups(graph, 0.3)
        cuts = choose_branch_channels(graph, 0.3, spare=killed)
        kill_groups(graph, killed)
        kill_branch_channels(graph, cuts)
        before = {mode: net.train(mode)(x) for mode in (True, False)}
        surgeon = Surgeon(graph)
        removal = surgeon.find()
        surgeon.remove(removal)
        row.groups_removed = int(removal.groups.sum())
        row.branch_channels = int(sum(c.sum() for c in removal.cuts.values()))
        after = {mode: net.train(mode)(x) for mode in before}
        row.surgery = max(float((after[m] - before[m]).abs().max() / before[m].abs().max()) for m in before)
        Surgeon(ChannelGraph(fresh, x[:2])).replay(surgeon.history)
        fresh.load_state_dict(net.state_dict())
        row.replay = torch.equal(fresh.eval()(x), after[False])
        del fresh, before, after
        row.export = _export(net, x, name)
        good = row.surgery <= SURGERY_TOLERANCE and row.replay and not row.export.startswith("wrong")
        row.status = "exact" if good else "wrong"
        row.detail = f"max relative difference {row.surgery:.1e}; replay {'bit for bit' if row.replay else 'DIFFERS'}"
    except GraphError as error:
        row.status, row.detail = "refused", str(error).split(". Surgery refuses")[0]
    except Exception as error:  # noqa: BLE001 - the survey reports every failure
        row.status, row.detail = "crashed", f"{type(error).__name__}: {error}".splitlines()[0]
    finally:
        row.seconds = time.perf_counter() - started
    return row


def _export(net: nn.Module, x: Tensor, name: str) -> str:
    """The cut model's ONNX parity (in float32: the model is cast); where torch.onnx cannot export it, whether it
    could export the uncut model."""
    from .core.export import ExportError, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        try:
            parity = export_onnx(net.float().eval(), x[:2].float(), Path(tmp) / "cut.onnx", tolerance=None).parity
        except ExportError as error:
            uncut, _ = _prepare(name, _build(name))
            try:
                export_onnx(uncut.float().eval(), x[:2].float(), Path(tmp) / "uncut.onnx", tolerance=None)
            except ExportError:
                return "not exportable before the cut either: " + str(error).split(": ", 1)[-1][:160]
            return f"wrong: the uncut model exports, the cut one not: {error}"
    verdict = "parity" if parity.max_rel <= EXPORT_TOLERANCE else "wrong: parity"
    return f"{verdict} {parity.max_rel:.1e}"
