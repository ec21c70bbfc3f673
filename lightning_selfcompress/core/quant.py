"""The differentiable quantizer of Self-Compressing Neural Networks (Csefalvay & Imber, 2023).

Each output channel i of a Conv/Linear weight learns a bit depth b_i and an exponent e_i:

    q(w) = 2^e * round(clamp(2^-e * w, -2^(b-1), 2^(b-1) - 1))

That grid (`grid="integer"`) has an asymmetric low end: 2 bits hold {-2, -1, 0, 1}, and below 2 bits only {-1, 0},
a channel of non-positive weights. The mid-rise grid (`grid="midrise"`) shifts every level by half a step,

    q(w) = 2^e * (round(clamp(2^-e * w - 1/2, -2^(b-1), 2^(b-1) - 1)) + 1/2)

so that b bits hold 2^b levels symmetric about 0 and 1 bit is a binary channel {-1/2, 1/2} 2^e; it has no zero
level, so 0 bits (a dead channel) is the only way to zero. Its integers are stored as 2k + 1 with the scale 2^(e-1).

Rounding is straight-through, so gradients reach the weight (inside the clamp range), e and b. Two traps of the
literal formula are closed here: b is clamped at 0 inside the bounds (for b < 0 `torch.clamp` would return -2^e),
and a channel with b <= 0 is masked to exact zeros, with no gradient reaching its b, e or weights.

Attaching swaps a layer's class in place for a quantized subclass (the trick `torch.nn.utils.parametrize` uses),
so the module, its Parameters and every reference to them stay the same objects, `isinstance(m, nn.Conv2d)` still
holds, and the state_dict keeps the float master weight under its own name next to `weight_quantizer.bits` and
`weight_quantizer.exponent`.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .checks import check_choice
from .ops import MAX_POOL_FUNCTIONS, MAX_POOLS, leaf_trace, node_is, weights_read_directly

__all__ = [
    "GRIDS",
    "ActivationQuantizer",
    "ChannelQuantizer",
    "QuantizationConfig",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedLinear",
    "attach_activation_quantizers",
    "attach_quantizers",
    "check_patterns",
    "check_patterns_match",
    "clamp_bits",
    "freeze_bits",
    "input_steps",
    "integer_bits",
    "integer_weights",
    "quantize",
    "quantized_layers",
    "quantizer_parameters",
    "share_input_steps",
    "snap_bits",
]


_LN2 = math.log(2.0)
RUNTIMES = ("tensorrt", "onnxruntime")  # whom int8 activations are laid out for (trained here, written by the export)
FEW_INPUT_CHANNELS = 4  # a layer reading fewer input channels (an image's first) keeps float inputs; ONNX Runtime's layout counts per group
GRIDS = ("integer", "midrise")


class _Quantize(torch.autograd.Function):
    """The quantizer with its straight-through gradients written out, in a few fused passes over the weight.

    With rounding passed straight through, per element (channel alive, x = 2^-e w, bounds lo = -2^(b-1),
    hi = 2^(b-1) - 1):  inside [lo, hi]: dq/dw = 1, dq/de = ln2 (q - w), dq/db = 0;  below lo / above hi:
    dq/dw = 0, dq/de = ln2 q, dq/db = -/+ ln2 2^e 2^(b-1).  A dead channel (b <= 0) gets no gradient at all.
    Outside the range the sign of q tells above (q >= 0) from below (q < 0), for any b > 0, so the forward keeps
    only q and a mask of the live elements inside the range. Autograd on the composite formula gives the same
    numbers (tests check both) at several times the cost. The mid-rise grid's half-step `offset` changes none of
    these formulas (its q is positive above the range and negative below it, too).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, bits: Tensor, exponent: Tensor, offset: float) -> Tensor:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        alive = (bits > 0).view(shape)
        high = torch.exp2(bits.relu() - 1)
        scaled = weight * torch.exp2(-exponent).view(shape)
        if offset:
            scaled.sub_(offset)
        clamped = torch.clamp(scaled, (-high).view(shape), (high - 1).view(shape))
        inside = torch.eq(clamped, scaled).logical_and_(alive)
        scale = torch.exp2(exponent).view(shape) * alive  # a dead channel's scale is 0: exact zeros
        q = clamped.round_()
        if offset:
            q.add_(offset)
        q.mul_(scale)
        ctx.save_for_backward(weight, bits, exponent, q, inside)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weight, bits, exponent, q, inside = ctx.saved_tensors
        per_channel = lambda t: t.flatten(1).sum(1) if t.dim() > 1 else t  # noqa: E731
        grad_weight = grad * inside
        grad_exponent = grad_bits = None
        if ctx.needs_input_grad[2]:  # q is 0 in dead channels, and so is grad_weight
            grad_exponent = _LN2 * (per_channel(grad * q) - per_channel(grad_weight * weight))
        if ctx.needs_input_grad[1]:
            outside = grad - grad_weight
            total = per_channel(outside)
            pull = 2 * per_channel(outside.masked_fill_(q < 0, 0)) - total  # above minus below
            high = torch.exp2(bits.relu() - 1)
            grad_bits = _LN2 * torch.exp2(exponent) * high * pull * (bits > 0)
        return (grad_weight if ctx.needs_input_grad[0] else None), grad_bits, grad_exponent, None


def quantize(weight: Tensor, bits: Tensor, exponent: Tensor, grid: str = "integer") -> Tensor:
    """Quantize `weight` per slice along dim 0 with real-valued `bits` and `exponent` (one value per slice), on the
    `grid` of the module docstring."""
    return _Quantize.apply(weight, bits, exponent, _offset(grid))


def _offset(grid: str) -> float:
    check_choice("grid", grid, GRIDS)
    return 0.5 if grid == "midrise" else 0.0


def initial_exponent(weight: Tensor, bits: float) -> Tensor:
    """Per output channel, the exponent at which `bits` bits span the channel's largest magnitude: 2^e 2^(b-1) = max|w|.

    The negative end of the range reaches it exactly; a positive weight that large rounds one level down.
    """
    absmax = weight.detach().flatten(1).abs().amax(1).float().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.log2(absmax / 2.0 ** (bits - 1))


def lsq_exponent(weight: Tensor, bits: float) -> Tensor:
    """Per output channel, log2 of LSQ's initial step (Esser et al., 2020): 2 mean|w| / sqrt(2^(b-1) - 1).

    For a fixed low bit depth the step that spans the largest magnitude leaves most weights at 0; LSQ's step sits
    near the bulk of the weights instead.
    """
    mean_abs = weight.detach().flatten(1).abs().mean(1).float().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.log2(2 * mean_abs / math.sqrt(max(2.0 ** (bits - 1) - 1, 1.0)))


class _QuantizeInt8(torch.autograd.Function):
    """8-bit fake quantization of a tensor with one learned step s = 2^a, LSQ's gradients (Esser et al., 2020), on the
    grid [low, high]: [-128, 127] (int8, zero point 0) or [0, 255] (uint8, zero point 0).

    Forward: q = s * round(clamp(x / s, low, high)), the float32 operations ONNX's QuantizeLinear/DequantizeLinear
    pair performs (x / s, round half to even, saturate, times s), so an exported file reproduces it exactly.
    Backward: straight through inside the range; ds gets, per element, round(x/s) - x/s inside and the clamp bound
    outside, scaled by LSQ's 1 / sqrt(features * high); da = ds * s ln2.
    """

    @staticmethod
    def forward(ctx, x: Tensor, log2_scale: Tensor, low: float = -128.0, high: float = 127.0) -> Tensor:
        scale = torch.exp2(log2_scale.float())
        scaled = x.float() / scale
        clamped = scaled.clamp(low, high)
        rounded = clamped.round()
        ctx.save_for_backward(scaled, rounded, scale)
        ctx.bounds = low, high
        return (rounded * scale).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        scaled, rounded, scale = ctx.saved_tensors
        low, high = ctx.bounds
        inside = (scaled >= low) & (scaled <= high)
        grad_x = (grad * inside).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_log2 = None
        if ctx.needs_input_grad[1]:
            features = max(scaled[0].numel() if scaled.dim() > 1 else scaled.numel(), 1)
            step = torch.where(inside, rounded - scaled, rounded)  # outside, rounded is the bound
            grad_scale = (grad.float() * step).sum() / math.sqrt(features * high)
            grad_log2 = (grad_scale * scale * _LN2).reshape(())
        return grad_x, grad_log2, None, None


class ActivationQuantizer(nn.Module):
    """A layer's input as 8-bit integers, per tensor, with a learned step: what TensorRT and ONNX Runtime need to run
    the layer as an integer kernel, trained rather than calibrated afterwards. The step starts at max|x| / 127 of the
    first batch it sees in training mode (`initialized` travels in the state_dict, so a resumed run does not start it
    again); until then the input passes unchanged. Not from an eval-mode pass: a trace or a validation sanity check
    before training sees BatchNorm's initial running statistics, activations up to 100x smaller than training's,
    and a step started there saturates every later batch, where the clamp passes no gradient.

    `unsigned=True`: an input that first batch shows non-negative (a ReLU's output, pooled) learns the uint8 grid
    [0, 255] instead of [-128, 127] (step max x / 255): twice the resolution, and ONNX Runtime then drops the ReLU
    into its integer kernel and keeps the tensor uint8 through pooling and residual adds. TensorRT takes symmetric
    int8 only, so a model with such steps exports for ONNX Runtime alone. Later negative values clamp to 0, in the file
    as in training. The grid chosen travels in the state_dict (`unsigned`; a state written before it: int8).

    `shifted`: the input is a BatchNorm's output after a ReLU (through max-pooling or reshapes), which the export folds
    away (its scale into the convolution before the ReLU, its shift into this layer's bias), so the file quantizes
    the input less that BatchNorm's shift: so does this step, x -> q(x - t) + t (`folded_steps`, which sets it and
    `shift`, the hook that keeps t). A state written before it: not shifted.
    """

    def __init__(self, unsigned: bool = False) -> None:
        super().__init__()
        self.log2_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("unsigned", torch.zeros((), dtype=torch.bool))
        self.register_buffer("shifted", torch.zeros((), dtype=torch.bool))
        self.may_be_unsigned = unsigned
        self.shift: Any = None  # where `shifted`, the BatchNorm's hook that keeps its shift (`folded_steps`)
        self._bounds: tuple[float, float] | None = None  # the buffers read once, not on every forward (a GPU read waits)
        self._shifted = False

    @property
    def scale(self) -> float:
        return float(torch.exp2(self.log2_scale.detach().float()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args: Any) -> None:
        if prefix.endswith("output_quantizer.") and not any(k.startswith(prefix) for k in state_dict):
            return  # a residual Add's step, in a state written before those trained: it starts on the next batch
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        for name in ("unsigned", "shifted"):  # written before these existed: int8, not shifted
            if prefix + name not in state_dict:
                getattr(self, name).fill_(False)
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
        self._bounds = None  # the loaded buffers decide again

    @torch.no_grad()
    def _start(self, x: Tensor) -> None:
        """The step from the first training batch: max |x| / 127, or max x / 255 on the unsigned grid. Under DDP the
        extremes are all ranks' (all-reduced), so every rank starts the same step on the same grid."""
        x = x.detach().float()
        extremes = torch.stack([x.abs().max(), -x.min()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        absmax, lowest = extremes[0].clamp_min(torch.finfo(torch.float32).tiny), -extremes[1]
        self.unsigned.fill_(self.may_be_unsigned and bool(lowest >= 0))
        self.log2_scale.copy_(torch.log2(absmax / (255.0 if self.unsigned else 127.0)))
        self.initialized.fill_(True)

    def quantize_around(self, shift: Any) -> None:
        """From now on quantize x - t, t the shift that `shift` (a BatchNorm's hook: `shift.value`) keeps."""
        self.shifted.fill_(True)
        self.shift = shift
        self._bounds = None

    def shift_of(self, x: Tensor) -> Tensor | float:
        """The BatchNorm's shift t the step quantizes `x` around, laid out as `x` (0 where not `shifted`)."""
        if not self._shifted:
            return 0.0
        if self.shift is None or self.shift.value is None:
            raise RuntimeError(
                "This int8 input step quantizes around a BatchNorm's shift, and no BatchNorm hook gave one: attach "
                "the quantizers with attach_quantizers(..., int8_activations=True) or load_compressed, which hook it."
            )
        t = self.shift.value.to(x.dtype)
        t = t.repeat_interleave(x.shape[1] // t.numel())  # a flattening reshape lays each channel out in a run
        return t.view(1, -1, *(1,) * (x.dim() - 2))

    def forward(self, x: Tensor) -> Tensor:
        if self._bounds is None:
            self._shifted = bool(self.shifted)
            if not self.initialized:
                if not self.training:
                    return x
                self._start(x - self.shift_of(x))
            self._bounds = (0.0, 255.0) if self.unsigned else (-128.0, 127.0)
        if not self._shifted:
            return _QuantizeInt8.apply(x, self.log2_scale, *self._bounds)
        t = self.shift_of(x)
        return _QuantizeInt8.apply(x - t, self.log2_scale, *self._bounds) + t


class ChannelQuantizer(nn.Module):
    """Learned bit depth and exponent, one of each per output channel, on one grid. The grid travels in the
    state_dict (`midrise`), so a checkpoint decides it on loading; one written before the grid existed is integer."""

    def __init__(self, channels: int, bits: float | Tensor, exponent: float | Tensor, grid: str = "integer") -> None:
        super().__init__()
        self.bits = nn.Parameter(torch.as_tensor(bits, dtype=torch.float32).expand(channels).clone())
        self.exponent = nn.Parameter(torch.as_tensor(exponent, dtype=torch.float32).expand(channels).clone())
        self.register_buffer("midrise", torch.tensor(_offset(grid) > 0))
        self.grid = grid  # the buffer read once here and on loading, not on every forward (a GPU read would wait)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        if prefix + "midrise" not in state_dict:  # written before the grid existed: the integer grid
            self.midrise.fill_(False)
            if prefix + "midrise" in missing_keys:
                missing_keys.remove(prefix + "midrise")
        self.grid = GRIDS[int(self.midrise)]

    @property
    def offset(self) -> float:
        return _offset(self.grid)

    def forward(self, weight: Tensor) -> Tensor:
        return quantize(weight, self.bits.to(weight.dtype), self.exponent.to(weight.dtype), self.grid)

    def extra_repr(self) -> str:
        return f"channels={self.bits.numel()}, grid={self.grid}"


def _levels(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(k, alive): each weight's grid level, round(clamp(...)) of the quantizer's forward with the same float32
    operations (dead channels 0), and per output channel whether b > 0."""
    quantizer = module.weight_quantizer
    weight = module.weight.detach().float()
    bits, exponent = quantizer.bits.detach().float(), quantizer.exponent.detach().float()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    high = torch.exp2(bits.relu() - 1).view(shape)
    scaled = weight * torch.exp2(-exponent).view(shape)
    if quantizer.offset:
        scaled.sub_(quantizer.offset)
    alive = bits > 0
    return torch.clamp(scaled, -high, high - 1).round() * alive.view(shape), alive


@torch.no_grad()
def integer_weights(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(integers, scale): the quantized layer's stored values (a float tensor of whole numbers, dead channels 0) and
    the scale per output channel (float32), so that integers * scale equals the quantized weight exactly: the levels
    k and 2^e on the integer grid, 2k + 1 and 2^(e-1) on the mid-rise grid."""
    quantizer = module.weight_quantizer
    levels, alive = _levels(module)
    exponent = quantizer.exponent.detach().float()
    if quantizer.offset:
        return (2 * levels + 1) * alive.view((-1,) + (1,) * (levels.dim() - 1)), torch.exp2(exponent) / 2  # exact half
    return levels, torch.exp2(exponent)


def _twos_complement_bits(flat: Tensor) -> Tensor:
    """Per row, the smallest k with every value in [-2^(k-1), 2^(k-1) - 1]; 0 for a row of zeros."""
    need = torch.maximum(-flat.amin(1), flat.amax(1) + 1)  # 2^(k-1) must reach this
    bits = torch.log2(need.clamp_min(1)).ceil() + 1
    return torch.where(flat.abs().amax(1) > 0, bits, torch.zeros_like(bits))


def integer_bits(integers: Tensor) -> Tensor:
    """Per output channel, the whole bits its stored integers need: as signed two's complement, or, for a channel
    of odd integers only (the mid-rise grid's 2k + 1), the bits of k, at least 1; 0 for a channel of zeros. This,
    not the real-valued b, is what a file stores: b = 1.3 rounds to {-1, 0} (1 bit), b = 2.2 to {-2, ..., 1} (2 bits).
    """
    flat = integers.flatten(1)
    odd = (flat.remainder(2) == 1).all(1)
    return torch.where(odd, _twos_complement_bits((flat - 1) / 2).clamp_min(1), _twos_complement_bits(flat))


@torch.no_grad()
def snap_bits(layers: dict[str, nn.Module]) -> None:
    """Set every b to the whole bits its channel's levels need now (integer-grid channels of zeros to 0 bits).

    Rounding depends on b only through the integer range [-round(2^(b-1)), round(2^(b-1)) - 1], so a weight whose
    integer stays inside the new range keeps it; a range such as [-3, 2] (b = 2.5, stored in 3 bits) widens to the
    [-4, 3] those bits can hold, and only weights clamped at its ends can move. The size is then what is paid for.
    """
    for module in layers.values():
        levels, alive = _levels(module)
        bits = _twos_complement_bits(levels.flatten(1))
        if module.weight_quantizer.offset:  # a live mid-rise channel is never zeros: 1 bit at least
            bits = torch.where(alive, bits.clamp_min(1), bits)
        module.weight_quantizer.bits.copy_(bits.to(module.weight_quantizer.bits))


@torch.no_grad()
def clamp_bits(layers: dict[str, nn.Module], max_bits: float | None, min_bits: float | None = None) -> None:
    """Keep every b at or below `max_bits` (after each optimizer step), so that the file stores every layer in
    `max_bits`-bit integers: on the mid-rise grid, whose file stores 2k + 1, b stays one bit lower. And at or above
    `min_bits`, where given: then no channel dies."""
    for module in layers.values():
        quantizer = module.weight_quantizer
        top = None if max_bits is None else max_bits - (1 if quantizer.offset else 0)
        quantizer.bits.clamp_(min=min_bits, max=top)


def freeze_bits(layers: dict[str, nn.Module], frozen: bool = True) -> None:
    """Stop (or restart) training every b: optimizers skip a parameter without a gradient."""
    for module in layers.values():
        bits = module.weight_quantizer.bits
        bits.requires_grad_(not frozen)
        if frozen:
            bits.grad = None


class _QuantizedWeight:
    """Mixin for Conv layers: run the layer's own convolution with the quantized weight (and input, where an
    `input_quantizer` is attached)."""

    weight: Tensor
    bias: Tensor | None
    weight_quantizer: ChannelQuantizer
    _modules: dict[str, nn.Module | None]

    def _input(self, input: Tensor) -> Tensor:
        quantizer = self._modules.get("input_quantizer")
        return input if quantizer is None else quantizer(input)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self._input(input), self.weight_quantizer(self.weight), self.bias)  # type: ignore[attr-defined]


class QuantizedConv1d(_QuantizedWeight, nn.Conv1d):
    """`nn.Conv1d` whose weight passes through a `ChannelQuantizer`."""


class QuantizedConv2d(_QuantizedWeight, nn.Conv2d):
    """`nn.Conv2d` whose weight passes through a `ChannelQuantizer`."""


class QuantizedConv3d(_QuantizedWeight, nn.Conv3d):
    """`nn.Conv3d` whose weight passes through a `ChannelQuantizer`."""


class QuantizedLinear(_QuantizedWeight, nn.Linear):
    """`nn.Linear` whose weight passes through a `ChannelQuantizer`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self._input(input), self.weight_quantizer(self.weight), self.bias)


QUANTIZED_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
    nn.Linear: QuantizedLinear,
}
_BY_NAME = {cls.__name__: cls for cls in QUANTIZED_CLASS}
_INIT_SCALES = {"absmax": initial_exponent, "lsq": lsq_exponent}


@dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """Which layers get quantizers, and how they start.

    `layer_types` names the float classes to quantize (exact types: a subclass may read its weight elsewhere, as
    MultiheadAttention's out_proj does, and would silently stay float). `include`/`exclude` are glob patterns
    on module names (`layer3.*`, `fc`). `init_bits` is where b starts; `init_exponent=None` picks, per channel,
    the exponent from `init_scale`: `"absmax"`, where the bit range spans the channel's largest magnitude (at 8 bits
    the quantized network starts within about 1% of the float one), or `"lsq"`, LSQ's step from the mean magnitude
    (better at a fixed 2 to 4 bits, where spanning the largest weight rounds most others to 0).
    `grid` is the quantizer's grid ("integer", the paper's, or "midrise"; see the module docstring).
    `int8_activations` also quantizes each selected layer's input to 8 bits with a learned step (`ActivationQuantizer`),
    except a layer reading fewer than 4 channels (a first convolution on an image: an integer kernel gains nothing
    there, ONNX Runtime's is slower than its float one, and the image's levels cost accuracy); and then both inputs of
    each residual Add that feeds such a layer (`residual_steps`). `activation_runtime`
    is the runtime those steps are for: "tensorrt", symmetric int8, the only form TensorRT takes; "onnxruntime", a
    non-negative input on the uint8 grid [0, 255], which ONNX Runtime's x86 integer kernels fuse with the ReLU before.
    """

    layer_types: Sequence[str] = ("Conv1d", "Conv2d", "Conv3d", "Linear")
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    init_bits: float = 8.0
    init_exponent: float | None = None
    init_scale: str = "absmax"
    grid: str = "integer"
    int8_activations: bool = False
    activation_runtime: str = "tensorrt"

    def __post_init__(self) -> None:
        check_choice("activation_runtime", self.activation_runtime, RUNTIMES)
        check_patterns("include", self.include)
        check_patterns("exclude", self.exclude)
        unknown = [t for t in self.layer_types if t not in _BY_NAME]
        if unknown:
            raise ValueError(f"layer_types {unknown} are not supported; choose from {sorted(_BY_NAME)}.")
        for name in ("init_bits", "init_exponent"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}={value} is not a finite number.")
        check_choice("init_scale", self.init_scale, sorted(_INIT_SCALES))
        _offset(self.grid)
        if self.init_bits <= 0:
            raise ValueError(f"init_bits={self.init_bits} would start every channel dead; use a value > 0 (8 is lossless).")

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether the layer `name` gets a quantizer."""
        return type(module) in {_BY_NAME[t] for t in self.layer_types} and selected(name, self.include, self.exclude)


def check_patterns(name: str, patterns: Sequence[str]) -> tuple[str, ...]:
    """`patterns` as a tuple of glob patterns on module names; a lone string (which would match by its letters) or a
    non-string is named."""
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name}={patterns!r} must be a list of glob patterns on module names, e.g. ['layer4.*'].")
    return tuple(patterns)


def check_patterns_match(model: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> None:
    """A pattern that matches no module of `model` changes nothing, silently: most often a name given without the
    prefix of the module that holds it (`layer1.0` for `net.layer1.0`). Named, with the names it may have meant."""
    names = [name for name, _ in model.named_modules()]
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                near = [name for name in names if fnmatch.fnmatchcase(name, f"*.{pattern}")]
                hint = f"did you mean {near[:3]}? " if near else ""
                raise ValueError(
                    f"{option} pattern {pattern!r} matches no module of {type(model).__name__}: {hint}Patterns match "
                    f"whole qualified names, as named_modules() gives them (e.g. {names[-1]!r})."
                )


def selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether glob patterns on module names pick `name`: one of `include` and none of `exclude`."""
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized Conv/Linear layers of `model` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _QuantizedWeight)}


def input_steps(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Each quantized layer's `input_quantizer` (int8 activations), by layer name."""
    return {n: m.input_quantizer for n, m in quantized_layers(model).items() if "input_quantizer" in m._modules}


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every b and e Parameter in `model`."""
    return [p for m in quantized_layers(model).values() for p in m.weight_quantizer.parameters()]


def attach_quantizers(model: nn.Module, config: QuantizationConfig = QuantizationConfig()) -> dict[str, nn.Module]:
    """Quantize the selected layers in place; layers already quantized are kept as they are. Returns all quantized layers."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(QUANTIZED_CLASS))]
    chosen = [(n, m) for n, m in candidates if config.selects(n, m)]
    if not chosen and not quantized_layers(model):
        if not candidates:
            raise ValueError(
                f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer to quantize; "
                "self-compression needs at least one."
            )
        raise ValueError(
            f"The layer filter (layer_types={list(config.layer_types)}, include={list(config.include)}, "
            f"exclude={list(config.exclude)}) selects none of the layers {[n for n, _ in candidates]}. "
            "Only exact types are quantized (a subclass may read its weight outside forward)."
        )
    check_patterns_match(model, config.include, config.exclude)
    # a layer named whole in `include` is quantized as asked (a checkpoint's layers are named so when it is loaded)
    unnamed = [n for n, _ in chosen if n not in config.include]
    graph = leaf_trace(model) if unnamed or config.int8_activations else None  # what the trace is for
    if functional := _read_outside_forward(graph, unnamed):
        warnings.warn(
            f"{len(functional)} layer(s) stay float: the model reads their weight without calling them (a function "
            f"takes it, as Swin's attention does), so a quantizer on their forward would change nothing it computes: "
            f"{sorted(functional)}.",
            stacklevel=2,
        )
        chosen = [(n, m) for n, m in chosen if n not in functional]
    for _, module in chosen:
        weight = module.weight
        exponent = config.init_exponent
        if exponent is None:
            exponent = _INIT_SCALES[config.init_scale](weight, config.init_bits)
        quantizer = ChannelQuantizer(weight.shape[0], config.init_bits, exponent, config.grid).to(weight.device)
        module.__class__ = QUANTIZED_CLASS[type(module)]
        module.add_module("weight_quantizer", quantizer)
    if config.int8_activations:
        reading_enough = {n: m for n, m in quantized_layers(model).items() if _input_channels(m) >= FEW_INPUT_CHANNELS}
        attach_activation_quantizers(reading_enough, unsigned=config.activation_runtime == "onnxruntime")
        if graph is not None:  # an untraceable model: each layer keeps its own step, its residual Adds stay float
            from .folded_steps import attach_folded_steps  # here, not at the top: they build on this module
            from .residual_steps import attach_residual_steps

            share_input_steps(model, graph)
            attach_residual_steps(model, unsigned=config.activation_runtime == "onnxruntime", graph=graph)
            attach_folded_steps(model, graph)
    return quantized_layers(model)


def _read_outside_forward(graph: fx.Graph | None, names: list[str]) -> set[str]:
    """Of the layers `names`, those whose weight the traced model reads itself and which it never calls (none where
    torch.fx could not trace the model; never the model itself, a layer its caller calls)."""
    if graph is None:  # an untraceable model: every chosen layer is quantized, as before
        return set()
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    read = set(weights_read_directly(graph)) - called
    return {name for name in names if name and name in read}


def _input_channels(module: nn.Module) -> int:
    return module.weight.shape[1] * getattr(module, "groups", 1)


def attach_activation_quantizers(layers: dict[str, nn.Module], unsigned: bool = False) -> None:
    """Give each quantized layer without one an `input_quantizer` (8 bits, learned step), on its weight's device;
    `unsigned`: a non-negative input may take the uint8 grid (`ActivationQuantizer`)."""
    for module in layers.values():
        if "input_quantizer" not in module._modules:
            module.add_module("input_quantizer", ActivationQuantizer(unsigned).to(module.weight.device))


def _reads_node(node: fx.Node) -> bool:
    """Whether the traced call's first argument is a traced tensor."""
    return bool(node.args) and isinstance(node.args[0], fx.Node)


def share_input_steps(
    model: nn.Module, graph: fx.Graph | None = None, state: Mapping[str, Tensor] | None = None
) -> list[tuple[str, ...]]:
    """Layers that read the same tensor take one step, the first reader's: the file then quantizes that tensor once,
    so its maker's output quantization fuses (ONNX Runtime's QLinearConv or QLinearAdd takes one output step; with two
    steps on its output, a torchvision ResNet's downsampling block left the Add before it float). So do layers that
    read it through max pools read by such layers alone (an Inception block's pool branch): max pooling commutes with
    the rounding, so the file pools the one quantized tensor (`export._pool_quantized_inputs`). Steps a batch has
    started keep their own; given `state` (a checkpoint being loaded), only where it holds one step for them all (a
    state written before steps were shared loads as it was trained). `graph`: the model's trace, where the caller
    has one (an untraceable model shares nothing). Returns the groups tied, by layer name."""
    graph = graph if graph is not None else leaf_trace(model)
    if graph is None:
        return []
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    steps = {name: step for name, step in input_steps(model).items() if calls[name] == 1}  # a layer run twice: its own
    modules = dict(model.named_modules())

    def stepped(node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in steps and _reads_node(node)

    def pooled(node: fx.Node) -> bool:
        """A max pool read by stepped layers and such pools alone."""
        return (
            node_is(node, modules, MAX_POOLS, MAX_POOL_FUNCTIONS)
            and _reads_node(node)
            and all((stepped(user) and user.args[0] is node) or pooled(user) for user in node.users)
        )

    readers: dict[fx.Node, list[str]] = defaultdict(list)
    for node in filter(stepped, graph.nodes):
        source = node.args[0]
        while pooled(source):
            source = source.args[0]
        readers[source].append(node.target)
    layers = quantized_layers(model)
    shared = []
    for names in (names for names in readers.values() if len(names) > 1):
        if any(steps[n].initialized for n in names):
            continue
        if state is not None:
            keys = [f"{n}.input_quantizer.log2_scale" for n in names]
            if not all(k in state for k in keys) or any(not torch.equal(state[k], state[keys[0]]) for k in keys):
                continue
        for name in names[1:]:
            layers[name].add_module("input_quantizer", layers[names[0]].input_quantizer)
        shared.append(tuple(names))
    return shared
