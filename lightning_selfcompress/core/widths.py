"""Widths on the hardware's steps: per prunable layer, latency against its output channel count, measured on the
target, and the widths worth cutting to.

Kernels work in blocks of channels (16 on this CPU's ONNX Runtime, 8 or 32 on GPU tensor cores), so latency against
width is a staircase: a width one past a step costs almost a whole step more. For each Conv/Linear whose output
channels the surgeon may remove, `latency_tables` times that layer together with every layer that reads its channels,
as one ONNX graph per width in ONNX Runtime (CPU) or as a TensorRT engine (GPU), or the same chain in PyTorch on the
model's device, at the shapes they have in the model, chained as in the model (measured in isolation, a width off the
CPU's 16-channel block looked as fast as one on it; in the network it breaks ONNX Runtime's blocked layout between the
layers and costs more than the wider width), and caches the table on disk keyed by backend, device, shapes and how
it was timed. It times only widths the surgeon may cut to (`timed_widths`: on the channel block and half of it, at
most 128 per layer), so a wide network's tables take minutes, not hours.
`LatencyTable.step_widths` keeps the widths, on the CPU's channel block (or half of it), that are measurably faster
than every wider one; the surgeon cuts a layer only to those (`Surgeon(widths=...)`), leaving dead channels in place
(exact zeros) until enough have died to reach the next step down.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from ..extras import require
from .atomic import atomic_path
from .checks import check_choice
from .groups import ChannelGraph
from .machine_load import SHORTEST, OtherLoad, busy_share

# how a table was timed (part of the cache key: tables timed otherwise are measured again)
TIMING = "in its chain, half a block too"
# ONNX Runtime's float kernels (CPU); its integer kernels (int8 activations); TensorRT's int8 kernels (the export's
# default int8 layout, on this CUDA GPU); PyTorch eager on the model's device (a GPU where it trains on one), float32 or
# under autocast to a half type
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cpu-int8", "tensorrt-int8", "torch")
# ONNX Runtime's channel blocks on the CPU, (with AVX-512, with AVX2): its float kernels' NCHWc layout, and the
# channel alignment of its integer kernels' symmetric convolution (`channel_block`)
CPU_BLOCKS = {"onnxruntime-cpu": (16, 8), "onnxruntime-cpu-int8": (4, 8)}
# A table whose fitted line (`fitted_slope`) falls less than this share of its full width's time from the full width
# to the narrowest is flat: its latency is bound by something other than its channels (kernel launches: the main
# job's layers on an H200, PyTorch eager, batch 64, 0.13-0.28 ms at any width, 2026-12-04), and the differences
# between widths are noise or kernel choices, not steps
FLAT = 0.1
MAX_TIMED_WIDTHS = 128  # per layer: up to this many channels every width is timed, a wider layer on a coarser grid

__all__ = ["BACKENDS", "LatencyTable", "channel_block", "default_cache_dir", "latency_tables", "latency_weights",
           "step_widths", "stream_pressure", "timed_widths"]


@dataclass(frozen=True)
class LatencyTable:
    layer: str
    widths: list[int]  # the widths timed, ascending, up to the layer's full output width (`timed_widths`)
    ms: list[float]  # median latency of the layer and its readers at each width
    device: str
    batch: int
    backend: str = "onnxruntime-cpu"

    @property
    def block(self) -> int:
        return channel_block(self.backend, self.device)

    def step_widths(self, tolerance: float = 0.02, multiple_of: int = 1) -> list[int]:
        """`step_widths` on this table; a layer whose width is a multiple of its `block` (so in that layout) stays
        on it, or goes to half a block where its table says that pays, as `round_to` keeps a layer on its multiple."""
        block = self.block if max(self.widths) % self.block == 0 else 1
        half = [w for w in self.widths if 2 * w == block and w % multiple_of == 0]
        return step_widths(self.widths, self.ms, tolerance, math.lcm(multiple_of, block), also=half)


def channel_block(backend: str, device: str) -> int:
    """The channel block of the layout a backend's kernels run in: ONNX Runtime's float convolutions run in its
    blocked NCHWc layout, 16 channels wide with AVX-512 and 8 with AVX2 (MLAS's `NchwcBlockSize`). A width off
    the block drops the layers around it out of that layout, which costs more in the whole network than the
    layer timed in its chain shows (the main job cut to 17 of 32 channels ran slower than at 16, 2026-12-03).
    ONNX Runtime's integer convolutions run MLAS's symmetric kernel only on output channels in multiples of 8 with
    AVX2 and of 4 with AVX-512 (its `KernelOutputChannelAlignment`; input channels in multiples of 4), a generic
    one otherwise: on an AVX2 host a width one past a multiple of 8 timed up to 40% slower than the multiple below
    it, and a table of every width, noisy between them, had steps at 65 and 115 of 128 (2026-12-04; the AVX-512
    block is MLAS's, not measured). TensorRT's int8 tensor-core kernels read channels in vectors of 8 or 32 (by
    format): its tables time multiples of 8, and which of them are steps is read from the times. PyTorch: no such
    layout known, 1. `device`: as `_device` names it."""
    if backend == "tensorrt-int8":
        return 8
    if backend not in CPU_BLOCKS:
        return 1
    with_avx512, with_avx2 = CPU_BLOCKS[backend]
    return with_avx512 if "+avx512f" in device else with_avx2 if "+avx2" in device else 1


def timed_widths(full: int, block: int) -> list[int]:
    """The widths a layer's table times, ascending, ending at `full`: on its channel block where the layer is (no
    other width is a step there), and at most about `MAX_TIMED_WIDTHS` of them, evenly spaced, so that a wide layer
    (ResNet-50's 2,048 channels) costs as much to time as a narrow one. Half a block (8 of 16) too: a layer of
    fewer channels than one block leaves its neighbours in the blocked layout (ResNet-9's first layer at 8 of 16
    channels ran its int8 file 2.14x / 3.84x the float export, 2.02x / 3.37x at 16, 2026-12-04), where 17 of 32
    did not."""
    grid = block if full % block == 0 else 1
    grid *= math.ceil(full / grid / MAX_TIMED_WIDTHS)
    half = [block // 2] if grid == block >= 8 else []
    return half + list(range(grid, full, grid)) + [full]


def step_widths(
    widths: Sequence[int], ms: Sequence[float], tolerance: float = 0.02, multiple_of: int = 1, also: Sequence[int] = ()
) -> list[int]:
    """The widths worth cutting to, ascending: from the full width down, each width kept is at least `tolerance`
    (a fraction) faster than the narrowest one kept above it. On a staircase these are the step edges; widths inside
    a step, no faster than its edge above, are left out; on a smooth slope every few widths stay.
    `multiple_of`: only multiples of it are candidates (the full width always is): a layer timed in its chain can
    look fast at a width off the CPU's channel block (17 of 32, say) that in the whole network breaks the blocked
    layout around it (`LatencyTable.step_widths` keeps its table's cuts on that block). A flat table (`FLAT`) keeps
    every candidate: no width is slower than another, so a cut may land anywhere, as without tables. `also`: widths
    that are candidates though not multiples (half a block)."""
    full = max(widths)
    order = sorted((i for i in range(len(widths)) if widths[i] % multiple_of == 0 or widths[i] in (full, *also)),
                   key=lambda i: -widths[i])  # fmt: skip
    if is_flat(widths, ms):
        return sorted(widths[i] for i in order)
    kept = [order[0]]
    for i in order[1:]:
        if ms[i] < ms[kept[-1]] * (1 - tolerance):
            kept.append(i)
    return sorted(widths[i] for i in kept)


def fitted_slope(widths: Sequence[int], ms: Sequence[float]) -> float:
    """Milliseconds per channel: the least-squares line through a table. Its two ends alone are two samples of
    noise where the time hardly depends on the width: on an H200 a layer whose narrowest width timed slower than
    its full one was weighted 0 (and a faster middle width made its table look sloped), another 69 (2026-12-04)."""
    n = len(widths)
    if n < 2:
        return 0.0
    mean_w, mean_ms = sum(widths) / n, sum(ms) / n
    covariance = sum((w - mean_w) * (t - mean_ms) for w, t in zip(widths, ms))
    return covariance / sum((w - mean_w) ** 2 for w in widths)


def is_flat(widths: Sequence[int], ms: Sequence[float]) -> bool:
    """Whether a table's time hardly depends on its width (`FLAT`)."""
    full = max(widths)
    return fitted_slope(widths, ms) * (full - min(widths)) < FLAT * ms[list(widths).index(full)]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_selfcompress" / "latency"


# the vector extensions ONNX Runtime's kernels choose between: one CPU model name ("AMD EPYC") covers hosts with and
# without AVX-512, whose channel blocks (16 and 8) and so whose steps differ
VECTOR_EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def _device(backend: str, device: torch.device) -> str:
    """What the timings depend on: the runtime and its version, the processor (a CPU's model name and vector
    extensions, a GPU's name) and the threads a CPU runtime uses."""
    if backend == "tensorrt-int8":
        from .tensorrt import import_tensorrt

        return f"tensorrt {import_tensorrt().__version__}, {torch.cuda.get_device_name()}"
    if backend != "torch":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} CPU, {_cpu()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        return f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}"
    return f"torch {torch.__version__} {device.type.upper()}, {_cpu()}, {torch.get_num_threads()} threads"


def _cpu() -> str:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return name + "".join(f"+{e}" for e in VECTOR_EXTENSIONS if e in flags)


def _spec(module: nn.Module, input_shape: Sequence[int]) -> dict:
    """What fixes a layer's cost, apart from the channel counts: its kind and geometry and its input's shape."""
    if isinstance(module, nn.Linear):
        return {"op": "Gemm", "in": module.in_features, "out": module.out_features, "shape": list(input_shape[1:-1])}
    if not isinstance(module, _ConvNd) or module.groups != 1 or isinstance(module.padding, str):
        raise TypeError(f"{type(module).__name__} (groups={getattr(module, 'groups', '-')}) is not timed here")
    return {"op": "Conv", "in": module.in_channels, "out": module.out_channels, "shape": list(input_shape[2:]),
            "kernel": list(module.kernel_size), "stride": list(module.stride), "pads": list(module.padding) * 2,
            "dilation": list(module.dilation), "bias": module.bias is not None}  # fmt: skip


def _graph(specs: list[dict], batch: int, int8: str | None = None):
    """One ONNX model timing the layer `specs[0]` in its chain, as inside the network: its input comes out of a
    convolution (a 1x1 feeder of constant cost), and each reader of `specs[1:]` reads the layer's ReLU'd output
    (through a max-pooling or a flattening where its shape says so), so that the runtime's layout changes between
    them are timed too; a width off the CPU's channel block can cost more than a wider one that stays on it. A
    reader whose input holds other channels too (a concatenation) reads its own random input.
    `int8`: in the layout `export_onnx(runtime=int8)` writes. "onnxruntime", which ONNX Runtime runs as integer
    kernels: int8 weights behind DequantizeLinear, a uint8 Q/DQ pair on every layer's input and output (zero point 0
    after a ReLU, which it then drops); a layer reading fewer channels than the export quantizes (a first layer, on
    the image) reads its float input directly, its float kernel and the transposition into its readers' integer
    layout timed as in the file (ResNet-9's `prep` timed as an integer kernel stepped to 14 of 16 channels, which
    made the file's transposition after it 8x as slow). "tensorrt": TensorRT's rules, symmetric int8 pairs (zero
    point 0) on every layer's input and output, the first layer's too."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, initializers = [], [], [], []
    paired: set[str] = set()  # tensors that come out of a Q/DQ pair already

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    if int8:  # one step for every activation, so that a pair on either side of a pooling fuses into it
        constant("act.scale", np.array(0.05, np.float32))
    if int8 == "onnxruntime":
        constant("act.zero0", np.array(0, np.uint8))  # a ReLU's output (and what pooling makes of it)
        constant("act.zero128", np.array(128, np.uint8))
    elif int8 == "tensorrt":  # signed, zero point 0, whatever the sign
        constant("act.zero0", np.array(0, np.int8))

    def qdq(tensor: str, zero_point: int) -> str:
        if not int8 or tensor in paired:
            return tensor
        args = ["act.scale", f"act.zero{zero_point if int8 == 'onnxruntime' else 0}"]
        nodes.append(helper.make_node("QuantizeLinear", [tensor, *args], [f"{tensor}.q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}.q", *args], [f"{tensor}.dq"]))
        paired.add(f"{tensor}.dq")
        return f"{tensor}.dq"

    def weight(name: str, shape: Sequence[int], integer: bool) -> str:
        """Float where the layer's kernel is (the file's int8 weights of a float layer are folded at load)."""
        if not integer:
            return constant(name, rng.standard_normal(shape, dtype=np.float32))
        args = [constant(f"{name}.int8", rng.integers(-8, 8, shape, dtype=np.int8)),
                constant(f"{name}.scale", np.full(shape[0], 0.01, np.float32)),
                constant(f"{name}.zero", np.zeros(shape[0], np.int8))]  # fmt: skip
        nodes.append(helper.make_node("DequantizeLinear", args, [name], axis=0))
        return name

    def layer(i: int, s: dict, x: str, relu: bool = False, relu_input: bool = False) -> str:
        """The layer on `x` (a ReLU's output, through pooling, where `relu_input`); returns its output (ReLU'd and
        paired where asked)."""
        integer = int8 == "tensorrt" or (int8 == "onnxruntime" and not _float_input(s))
        x, y = (qdq(x, 0 if relu_input else 128) if integer else x), f"y{i}"
        if s["op"] == "Gemm":
            nodes.append(helper.make_node("Gemm", [x, weight(f"w{i}", (s["out"], s["in"]), integer)], [y], transB=1))
        else:
            names = [x, weight(f"w{i}", (s["out"], s["in"], *s["kernel"]), integer)]
            if s["bias"]:
                names.append(constant(f"b{i}", np.zeros(s["out"], np.float32)))
            nodes.append(helper.make_node("Conv", names, [y], kernel_shape=s["kernel"], strides=s["stride"],
                                          pads=s["pads"], dilations=s["dilation"]))  # fmt: skip
        if relu:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
            y = f"r{i}"
        return qdq(y, 0 if relu else 128)

    def own_copy(tensor: str, i: int) -> str:
        """Reader i's own DequantizeLinear of a paired tensor, as the export writes it: ONNX Runtime fuses a DQ into
        the integer op after it (a uint8 max-pooling, say) only where that op is the DQ's sole reader."""
        if tensor not in paired:
            return tensor
        name = tensor.removesuffix(".dq")
        args = [f"{name}.q", "act.scale", "act.zero0"]
        nodes.append(helper.make_node("DequantizeLinear", args, [f"{name}.dq{i}"]))
        paired.add(f"{name}.dq{i}")
        return f"{name}.dq{i}"

    def own_input(i: int, s: dict) -> str:
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, _input_rows(s, batch)))
        return f"x{i}"

    own = specs[0]
    x = own_input(0, own)
    if own["op"] == "Conv" and not (int8 and _float_input(own)):  # a first layer reads the image itself
        x = layer(-1, _feeder(own), x, relu=True)
    out = layer(0, own, x, relu=True)
    shape = _output_shape(own)
    results = []
    for i, s in enumerate(specs[1:], 1):
        x = _connect(nodes, own_copy(out, i), i, s, shape, own["out"])
        results.append(layer(i, s, x, relu_input=True) if x else layer(i, s, own_input(i, s)))
    outputs.extend(helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in results or [out])
    graph = helper.make_graph(nodes, "widths", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _float_input(s: dict) -> bool:
    """Whether the int8 file for ONNX Runtime leaves the layer's input float (a first layer, on an image)."""
    from .quant import FEW_INPUT_CHANNELS

    return s["in"] < FEW_INPUT_CHANNELS


def _feeder(own: dict) -> dict:
    """A 1x1 convolution of constant cost that feeds a convolution `own` its input, as a layer before it would."""
    n = len(own["shape"])
    return {**own, "out": own["in"], "kernel": [1] * n, "stride": [1] * n, "pads": [0] * 2 * n, "dilation": [1] * n,
            "bias": True}


def _output_shape(s: dict) -> list[int]:
    """The spatial shape of a layer's output (a Gemm's: its input's leading shape)."""
    if s["op"] == "Gemm":
        return list(s["shape"])
    return [(n + 2 * p - d * (k - 1) - 1) // st + 1
            for n, p, d, k, st in zip(s["shape"], s["pads"], s["dilation"], s["kernel"], s["stride"])]  # fmt: skip


def _reading(s: dict, shape: list[int], width: int) -> tuple | None:
    """How reader `s` reads the layer's output (`width` channels of `shape`): ("direct",), ("maxpool", window) or
    ("flatten", after a global max-pooling?) as its input's shape asks; None where it cannot be read from there."""
    if s["op"] == "Gemm":
        per = int(np.prod(shape)) if shape else 1
        if s["shape"] or s["in"] not in (width, width * per):
            return None
        return ("flatten", s["in"] != width * per)
    if s["in"] != width or len(s["shape"]) != len(shape):
        return None
    if s["shape"] == shape:
        return ("direct",)
    factors = {n // m for n, m in zip(shape, s["shape"]) if m}
    if len(factors) != 1 or any(m * next(iter(factors)) != n for n, m in zip(shape, s["shape"])):
        return None
    return ("maxpool", [next(iter(factors))] * len(shape))


def _connect(nodes: list, source: str, i: int, s: dict, shape: list[int], width: int) -> str | None:
    """The ONNX tensor through which reader `s` reads the layer's output `source` (`_reading`), or None."""
    from onnx import helper

    how = _reading(s, shape, width)
    if how is None:
        return None
    if how[0] == "direct":
        return source
    if how[0] == "maxpool":
        nodes.append(helper.make_node("MaxPool", [source], [f"p{i}"], kernel_shape=how[1], strides=how[1]))
        return f"p{i}"
    if how[1]:
        nodes.append(helper.make_node("GlobalMaxPool", [source], [f"g{i}"]))
        source = f"g{i}"
    nodes.append(helper.make_node("Flatten", [source], [f"f{i}"]))
    return f"f{i}"


def _input_rows(s: dict, batch: int) -> list[int]:
    """The shape of a layer's own input (a Gemm's rows: the batch times its leading shape)."""
    return [batch * int(np.prod(s["shape"])), s["in"]] if s["op"] == "Gemm" else [batch, s["in"], *s["shape"]]


def _torch_layer(s: dict) -> nn.Module:
    if s["op"] == "Gemm":
        return nn.Linear(s["in"], s["out"])
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(s["kernel"]) - 1]
    return conv(s["in"], s["out"], s["kernel"], s["stride"], s["pads"][: len(s["kernel"])], s["dilation"],
                bias=s["bias"])  # fmt: skip


class _Chain(nn.Module):
    """`_graph`'s chain in PyTorch (float32): the layer behind a 1x1 feeder, each reader on its ReLU'd output."""

    def __init__(self, specs: list[dict]) -> None:
        super().__init__()
        own = specs[0]
        self.feeder = nn.Identity() if own["op"] == "Gemm" else _torch_layer(_feeder(own))
        self.own = _torch_layer(own)
        self.readers = nn.ModuleList(_torch_layer(s) for s in specs[1:])
        self.reads = [_reading(s, _output_shape(own), own["out"]) for s in specs[1:]]

    def forward(self, x: Tensor, *own_inputs: Tensor) -> list[Tensor]:
        y = torch.relu(self.own(torch.relu(self.feeder(x))))
        own_inputs, outputs = iter(own_inputs), []
        for reader, how in zip(self.readers, self.reads):
            if how is None:
                z = next(own_inputs)
            elif how[0] == "maxpool":
                z = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(how[1]) - 1](y, how[1])
            elif how[0] == "flatten":
                z = (y.amax(dim=tuple(range(2, y.dim()))) if how[1] else y).flatten(1)
            else:
                z = y
            outputs.append(reader(z))
        return outputs or [y]


def _median_ms(call, runs: int, sync=lambda: None) -> float:
    """The median of `runs` timed calls, after 3 untimed ones (`sync`: wait for the device to finish)."""
    for _ in range(3):
        call()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_torch(specs: list[dict], batch: int, runs: int, device: torch.device, autocast: torch.dtype | None) -> float:
    chain = _Chain(specs).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    own = [specs[0]] + [s for s, how in zip(specs[1:], chain.reads) if how is None]
    inputs = [torch.randn(_input_rows(s, batch), generator=generator).to(device) for s in own]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device.type, autocast, enabled=autocast is not None):
        return _median_ms(lambda: chain(*inputs), runs, sync)


def _time_tensorrt(specs: list[dict], batch: int, runs: int) -> float:
    """The chain in TensorRT's int8 layout, built into an engine for its shapes (strongly typed: int8 exactly where
    its Q/DQ are), timed with CUDA events."""
    import onnx

    from .tensorrt import Engine, build_engine

    model = _graph(specs, batch, "tensorrt")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "chain.onnx"
        onnx.save(model, str(path))
        engine = Engine(build_engine(path, path.with_suffix(".engine")))
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shapes[name], generator=generator).cuda() for name in engine.inputs]
    return engine.median_ms(*inputs, runs=runs, warmup=3)


def _time(specs: list[dict], batch: int, runs: int, int8: str | None = None) -> float:
    import onnxruntime

    model = _graph(specs, batch, int8).SerializeToString()
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape, dtype=np.float32) for i in session.get_inputs()}
    return _median_ms(lambda: session.run(None, feeds), runs)


def _cached(path: Path, full: int) -> dict | None:
    """The table cached at `path`, or None where there is none; one that does not fit its layer (unreadable, its
    widths not ending at the layer's `full` width, a time missing) is stale: said, and timed again over it."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        widths, ms = stored["widths"], stored["ms"]
        if widths and widths[-1] == full and widths == sorted(set(widths)) and len(ms) == len(widths):
            if all(isinstance(t, (int, float)) and 0 < t < math.inf for t in ms):
                return stored
    except (OSError, ValueError, KeyError, TypeError):
        pass
    warnings.warn(f"The latency table cached in {path} is stale (unreadable, or not for a layer of {full} channels): "
                  "timing it again, over it.", stacklevel=3)  # fmt: skip
    return None


@contextmanager
def _timing_lock(cache: Path) -> Iterator[None]:
    """Runs started together (a sweep's parallel jobs) time their tables one at a time, each while the others wait
    rather than disturb it, and the later ones find the tables cached. A cache folder that cannot hold the lock
    (read-only) is read without it."""
    lock = FileLock(cache / ".timing.lock")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            warnings.warn(f"Waiting for another process to finish timing latency tables in {cache} (one timing at a "
                          "time, so that neither disturbs the other).", stacklevel=4)  # fmt: skip
            lock.acquire()
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _idle_now(seconds: float = SHORTEST) -> bool:
    """Whether other processes leave this machine alone now (a short look; False where the platform does not say)."""
    with OtherLoad() as load:
        time.sleep(seconds)
    return load.share is not None and not busy_share(load.share)


def _time_widths(widths: list[int], own: dict, readers: list, rounds: int, time_chain) -> tuple[list, float | None]:
    """Each width's latency, the layer and its readers chained: the best of `rounds` rounds over all widths (a busy
    moment hits one round, not all), and the share of the machine's CPU other processes used meanwhile. Rounds go on
    until the block lasts `SHORTEST`: a shorter one's share cannot be told, and a small layer timed beside other work
    passed as idle (a width-4 CNN's last layer, in a test, timed in under 0.5 s on an idle AMX host, 2026-12-04)."""
    full, ms = own["out"], [math.inf] * len(widths)
    with OtherLoad() as load:
        start, done = time.perf_counter(), 0
        while done < rounds or time.perf_counter() - start < SHORTEST:
            done += 1
            for i, width in enumerate(widths):
                specs = [{**own, "out": width}]
                specs += [{**s, "in": s["in"] - (full - width) * per} for s, per in readers]
                ms[i] = min(ms[i], time_chain(specs))
    return ms, load.share


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _input_shapes(model: nn.Module, example_input: Tensor) -> dict[str, list[int]]:
    shapes, handles = {}, []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, list(args[0].shape))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, _ConvNd)):
            handles.append(module.register_forward_pre_hook(record(name)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1].to(_model_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def latency_tables(
    graph: ChannelGraph,
    example_input: Tensor,
    *,
    backend: str = "onnxruntime-cpu",
    batch: int = 64,
    runs: int = 20,
    rounds: int = 3,
    cache_dir: str | os.PathLike | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, LatencyTable]:
    """Per Conv/Linear producer of removable channels (as the model is now, every channel present), its latency
    table, from the cache where this device measured the same shapes before, else measured (the median of `runs`,
    the best of `rounds`) and cached. The steps are read from these numbers, so processes time them one at a time
    (a lock in the cache folder), and a table timed while other processes kept the machine busy is said, used, and
    timed again by the first later call that finds the machine idle.
    `backend`: "onnxruntime-cpu" (float kernels, the weight-only file), "onnxruntime-cpu-int8" (integer kernels,
    the file `export_onnx(runtime="onnxruntime")` writes with int8 activations), "tensorrt-int8" (TensorRT on this
    CUDA GPU, in the layout `export_onnx`'s default int8 file has; needs `tensorrt`) or "torch" (PyTorch eager, float32,
    on the device the model is on: a GPU's own steps where it trains on one). `autocast`: with "torch", time the
    chain under `torch.autocast` to this dtype, as a mixed-precision run computes (a GPU's bfloat16 or float16
    kernels step at other widths than its float32 ones)."""
    check_choice("backend", backend, BACKENDS)
    if autocast is not None and backend != "torch":
        raise ValueError(f"autocast={autocast} is for backend='torch'; {backend!r} times the file's own types.")
    if backend != "torch":
        ort = ("onnxruntime",) if backend.startswith("onnxruntime") else ()
        require(f"Latency tables (ChannelSurgeon's widths={backend!r})", "onnx", *ort)
    model = graph.model
    shapes = _input_shapes(model, example_input)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    on = _model_device(model)
    device = _device(backend, on) + (f", autocast to {str(autocast).removeprefix('torch.')}" if autocast else "")
    ort_layout = "onnxruntime" if backend == "onnxruntime-cpu-int8" else None  # the float kernels' graph otherwise
    time_chain = (partial(_time_torch, batch=batch, runs=runs, device=on, autocast=autocast) if backend == "torch" else
                  partial(_time_tensorrt, batch=batch, runs=runs) if backend == "tensorrt-int8" else
                  partial(_time, batch=batch, runs=runs, int8=ort_layout))  # fmt: skip
    tables, busy = {}, {}
    with _timing_lock(cache):
        idle_now = None  # measured once, where a table cached as provisional asks whether to time it again
        for producer, groups in graph.outputs.items():
            module = model.get_submodule(producer)
            if producer not in shapes or bool(graph.pinned_mask[groups].all()) or producer in graph.branches:
                continue  # a residual branch's last layer runs at its stream's width in the file (zero rows): not timed
            try:
                own = _spec(module, shapes[producer])
                readers = []  # (spec, input positions per producer channel)
                for name, inputs in graph.inputs.items():
                    share = int(torch.isin(inputs, groups).sum())
                    if share and name != producer and name in shapes:
                        readers.append((_spec(model.get_submodule(name), shapes[name]), share // len(groups)))
            except TypeError:
                continue  # grouped convolutions and the like: no table, the surgeon cuts them as before
            full = own["out"]
            key = {"device": device, "batch": batch, "layer": own, "readers": [[s, per] for s, per in readers],
                   "timing": TIMING, "backend": backend}
            if backend == "onnxruntime-cpu-int8" and _float_input(own):
                key["timing"] += ", on its float input"  # timed as an integer kernel before: measured again
            path = cache / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"
            stored = _cached(path, full)
            provisional = stored is not None and busy_share(stored.get("others_load"))  # timed on a busy machine
            if provisional and idle_now is None:
                idle_now = _idle_now()
            if stored is None or (provisional and idle_now):
                widths = timed_widths(full, channel_block(backend, device))
                ms, load = _time_widths(widths, own, readers, rounds, time_chain)
                table = LatencyTable(producer, widths, ms, device, batch, backend)
                with atomic_path(path) as tmp:  # parent folders included
                    tmp.write_text(json.dumps({**asdict(table), "others_load": load, "key": key}))
            else:
                table = LatencyTable(producer, stored["widths"], stored["ms"], device, batch, backend)
                load = stored.get("others_load")
            if busy_share(load):
                busy[producer] = load
            tables[producer] = table
    if busy:
        warnings.warn(
            f"The latency tables of {', '.join(busy)} were timed while other processes used up to "
            f"{max(busy.values()):.0%} of this machine's CPU: their steps and weights may be noise. They are used, "
            f"and timed again by the next run that finds the machine idle; for runs that agree, time them first on "
            f"an idle machine (`lsc-latency` with the run's model, or one run alone).",
            stacklevel=2,
        )
    return tables


def latency_weights(tables: dict[str, LatencyTable], original: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Per layer with a table, a factor for its bits in the size term, so that a channel is pulled towards 0 bits
    in proportion to the time it costs (its own and its readers' share: its table's fitted slope, ms per channel)
    rather than to its weight count. `original`: per layer, (channels, weights). Scaled so that, at equal bit depths,
    the weighted size of those layers is their plain size: gamma keeps its meaning. Layers without a table keep 1,
    as do those whose table is flat: their slope is noise, and a weight of 0 would leave their bits free to grow
    (on an H200 three of the main job's four tables were flat, and that weight drove its size over the budget)."""
    slopes = {
        name: fitted_slope(t.widths, t.ms)
        for name, t in tables.items()
        if name in original and not is_flat(t.widths, t.ms)
    }
    time = sum(original[name][0] * slope for name, slope in slopes.items())
    if not time > 0:
        return {}
    per_ms = sum(original[name][1] for name in slopes) / time  # weights per ms, over the timed layers
    return {name: per_ms * slope * original[name][0] / original[name][1] for name, slope in slopes.items()}


def stream_pressure(
    bits: Mapping[str, Tensor | None], groups: Mapping[str, Tensor], steps: Mapping[str, Sequence[int]], strength: float
) -> dict[str, Tensor]:
    """Per producer, a gradient for its bit depths that pushes the weakest live channel groups of each layer with
    steps down towards 0, as many as its live count exceeds its target step, so that the surgeon reaches that step
    instead of keeping dead channels that the file still stores. A layer alone: its target is the step below its
    live count, none while the count is on a step, and it is never pushed to nothing.
    A group that several producers write (a residual stream: the layer that starts it and each branch that adds to
    it) is live while any producer's channel of it is. Pushed one layer at a time, the producers let different
    channels go and ResNet-9's streams kept their full width, no group dead in all. So a stream aims at the step at
    or below its groups live in every producer, and pushes first the groups that some producer already let go (the
    size term's saving on them is not real until all do), then the weakest by their strongest producer's bits, in
    every producer where they are live. `bits`: per producer, None where it is not quantized (its groups never
    die: they count as live everywhere, are never pushed, and no step below their count is aimed at); `groups`: per
    producer, the group of each of its present channels (on the CPU). It runs every optimizer step: the bits come to
    the CPU in one transfer, and only the gradients go back."""
    quantized = {name: b for name, b in bits.items() if b is not None}
    if not quantized or not steps:
        return {}
    flat = torch.cat([b.detach().float().reshape(-1) for b in quantized.values()]).cpu()
    values = dict(zip(quantized, flat.split([b.numel() for b in quantized.values()])))
    top = 1 + max(int(ids.max()) for ids in groups.values() if len(ids))
    strongest = torch.full((top,), -math.inf)
    weakest = torch.full((top,), math.inf)
    for name, ids in groups.items():
        own = values.get(name, torch.full((len(ids),), math.inf))  # not quantized: never dies
        strongest[ids] = torch.maximum(strongest[ids], own)
        weakest[ids] = torch.minimum(weakest[ids], own)
    mortal = strongest.isfinite()  # a group that a float layer writes never dies: it is never pushed
    let_go = (weakest <= 0) & mortal
    push = torch.zeros(top, dtype=torch.bool)
    for name, allowed in steps.items():
        if name not in values:
            continue
        ids = groups[name]
        live = ids[strongest[ids] > 0]
        candidates = live[mortal[live]]
        immortal = len(live) - len(candidates)
        everywhere = len(live) - int(let_go[live].sum())
        below = max((w for w in allowed if w < len(live)), default=0)  # never pushed to nothing
        target = max((w for w in allowed if w <= everywhere), default=0) or below
        if target < immortal:  # no lower than the groups that never die leave
            target = min((w for w in allowed if w >= immortal), default=0)
        if 0 < target < len(live):
            by_strength = candidates[strongest[candidates].argsort(stable=True)]
            first = by_strength[(~let_go[by_strength]).argsort(stable=True)]  # let go somewhere: first
            push[first[: len(live) - target]] = True
    grads: dict[str, Tensor] = {}
    for name, b in quantized.items():
        where = push[groups[name]] & (values[name] > 0)
        if where.any():
            grads[name] = torch.zeros_like(b)
            grads[name][where.to(b.device)] = strength
    return grads
