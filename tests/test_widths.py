"""Widths on the hardware's steps: the staircase's edges, latency tables measured in ONNX Runtime and cached, and a
surgeon that cuts only to those widths (waiting, exactly, while the live count sits between them)."""

from __future__ import annotations

import importlib.util
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import trainer_kwargs
from torch import nn

from lightning_selfcompress import ChannelSurgeon, SelfCompression
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.quant import attach_quantizers, quantized_layers
from lightning_selfcompress.core.size import SizeModel
from lightning_selfcompress.core.surgery import SURGERY_KEY, Surgeon
from lightning_selfcompress.core.tensorrt import TensorRTUnavailable
from lightning_selfcompress.core.widths import (
    LatencyTable,
    fitted_slope,
    is_flat,
    latency_tables,
    latency_weights,
    step_widths,
    stream_pressure,
    timed_widths,
)
from lightning_selfcompress.models import BaselineCNN, ImageClassifier, ResNet9


def test_the_steps_of_a_staircase_are_its_edges():
    widths = list(range(1, 65))
    ms = [math.ceil(w / 16) + 0.001 * w for w in widths]  # blocks of 16, a faint slope inside each
    assert step_widths(widths, ms) == [16, 32, 48, 64]
    linear = [1.0 + w for w in widths]  # no staircase: every width is cheaper than the next by a few percent
    kept = step_widths(widths, linear, tolerance=0.02)
    assert kept[-1] == 64 and len(kept) > 16 and all(b - a <= 2 for a, b in zip(kept[40:], kept[41:]))


def test_a_flat_table_has_no_steps_to_keep_to():
    """Launch-bound layers (the main job's on an H200) time alike at every width, a few percent of noise apart: no
    width is a step, every one may be cut to, and their bits are not weighted by a slope that is noise."""
    widths = list(range(1, 33))
    noise = [0.157, 0.152, 0.160, 0.149, 0.155, 0.151, 0.158, 0.150]
    ms = [noise[w % 8] for w in widths]
    assert step_widths(widths, ms) == widths
    assert step_widths(widths, ms, multiple_of=8) == [8, 16, 24, 32]
    assert step_widths(widths, [0.1 + 0.005 * w for w in widths])[0] < 8, "a real slope still has its steps"
    flat, sloped = LatencyTable("flat", widths, ms, "cuda", 64), LatencyTable("sloped", [1, 2], [1.0, 2.0], "cpu", 1)
    assert latency_weights({"flat": flat}, {"flat": (32, 288)}) == {}
    alone = latency_weights({"flat": flat, "sloped": sloped}, {"flat": (32, 288), "sloped": (2, 4)})
    assert alone == {"sloped": pytest.approx(1.0)}, "a flat table's layer keeps 1, the one timed layer its own size"


def test_a_tables_slope_is_its_fitted_line_not_its_two_ends():
    """On an H200 a launch-bound layer's narrowest width timed slower than its full one and a middle width faster
    (a kernel choice): read from its two ends it was sloped with slope 0, its bits weighted 0. Its line is flat:
    it keeps 1. A real slope with noisy ends is read as the slope it is."""
    widths = list(range(1, 33))
    launch_bound = [0.30 if w == 1 else 0.22 if 12 <= w <= 16 else 0.28 for w in widths]
    assert is_flat(widths, launch_bound) and step_widths(widths, launch_bound) == widths
    sloped = [0.1 + 0.01 * w + {1: 0.02, 32: -0.02}.get(w, 0.0) for w in widths]  # its two ends: 0.0087 per channel
    assert not is_flat(widths, sloped) and fitted_slope(widths, sloped) == pytest.approx(0.01, rel=0.05)
    weights = latency_weights({"launch": LatencyTable("launch", widths, launch_bound, "cuda", 64),
                               "sloped": LatencyTable("sloped", widths, sloped, "cuda", 64)},
                              {"launch": (32, 288), "sloped": (32, 9216)})  # fmt: skip
    assert weights == {"sloped": pytest.approx(1.0)}


def test_steps_off_the_block_are_left_out_on_request():
    """A width off the block that timed a little faster than its edge above (19 of 32, as ResNet-9's tables showed)
    is a step of its own, unless only multiples of the block count; the edges below it stay, as does the full
    width when it is off the block itself."""
    widths = list(range(1, 33))
    ms = [math.ceil(w / 8) + 0.001 * w - (0.3 if w == 19 else 0.0) for w in widths]
    assert step_widths(widths, ms) == [8, 16, 19, 24, 32]
    assert step_widths(widths, ms, multiple_of=8) == [8, 16, 24, 32]
    assert step_widths(widths[:30], ms[:30], multiple_of=8) == [8, 16, 24, 30]


def test_onnx_runtime_tables_keep_their_steps_on_the_cpus_channel_block():
    """ONNX Runtime's NCHWc block is 16 channels with AVX-512 and 8 with AVX2: a layer on it steps only on multiples
    of it (17 of 32, which timed faster than 32 in its chain, cost the main job its speed), or at half of it below
    one block, where that is faster (ResNet-9's first layer at 8 of 16 channels was). Its integer kernels step
    on MLAS's symmetric kernel's alignment, 4 and 8. A CPU without either extension and a layer whose width is off
    the block keep every measured step."""
    widths = list(range(1, 33))
    ms = [math.ceil(w / 8) + 0.001 * w - (0.3 if w == 17 else 0.0) for w in widths]
    epyc = "onnxruntime 1.32.0 CPU, AMD EPYC+avx2"
    assert LatencyTable("a", widths, ms, epyc + "+avx512f+avx512_vnni", 64).step_widths() == [8, 16, 32], (
        "half a block (8 of 16) too, where it is a step")
    flat_below = [ms[15] if w < 16 else m for w, m in zip(widths, ms)]
    assert LatencyTable("a", widths, flat_below, epyc + "+avx512f", 64).step_widths() == [16, 32], "where it is not"
    assert LatencyTable("a", widths, ms, epyc, 64).step_widths() == [8, 16, 24, 32]
    assert LatencyTable("a", widths, ms, epyc, 64).step_widths(multiple_of=16) == [16, 32], "with round_to: both"
    assert LatencyTable("a", widths, ms, "onnxruntime 1.32.0 CPU, aarch64", 64).step_widths() == [8, 16, 17, 24, 32]
    dip = [m - (0.5 if w == 20 else 0.0) for w, m in zip(widths, ms)]  # 20: a multiple of 4, not of 8
    int8 = {extensions: LatencyTable("a", widths, dip, epyc + extensions, 64, backend="onnxruntime-cpu-int8")
            for extensions in ("", "+avx512f")}  # fmt: skip
    assert int8[""].step_widths() == [8, 16, 24, 32] and int8["+avx512f"].step_widths() == [8, 16, 20, 24, 32]
    narrow = LatencyTable("a", widths[:24], ms[:24], epyc + "+avx512f", 64)  # 24 wide: not in 16-channel blocks
    assert narrow.step_widths() == [8, 16, 17, 24], "a layer off the block keeps its table's steps"


def test_a_table_times_only_widths_the_surgeon_may_cut_to_and_a_wide_layer_on_a_coarser_grid():
    """On the CPU's block a table times its multiples alone, with the same steps as a table of every width; past
    `MAX_TIMED_WIDTHS` channels the grid widens, so ResNet-50's 2,048-channel layers are timed 128 times, not 2,048."""
    assert timed_widths(32, 16) == [8, 16, 32] and timed_widths(24, 16) == list(range(1, 25))
    assert timed_widths(128, 1) == list(range(1, 129))
    assert timed_widths(2048, 16) == [8, *range(16, 2049, 16)] and timed_widths(2048, 1) == list(range(16, 2049, 16))
    assert timed_widths(4096, 16) == list(range(32, 4097, 32))
    assert timed_widths(300, 1) == [*range(3, 300, 3), 300] and timed_widths(300, 16)[:2] == [3, 6]
    widths = list(range(1, 65))
    ms = [math.ceil(w / 16) + 0.001 * w - (0.3 if w == 17 else 0.0) for w in widths]
    device = "onnxruntime 1.32.0 CPU, AMD EPYC+avx2+avx512f"
    every = LatencyTable("a", widths, ms, device, 64)
    timed = LatencyTable("a", timed_widths(64, every.block), [ms[w - 1] for w in timed_widths(64, every.block)], device,
                         64)  # fmt: skip
    assert timed.widths == [8, 16, 32, 48, 64] and timed.step_widths() == every.step_widths() == [16, 32, 48, 64]


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_steps_that_do_not_fit_the_model_are_stale():
    graph = ChannelGraph(Two(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"steps for 'a' \(\[8, 16\]\) are stale: 'a' has 32 output channels"):
        Surgeon(graph, widths={"a": [8, 16]})
    with pytest.raises(ValueError, match="'c' is not a layer whose channels can be cut here"):
        Surgeon(graph, widths={"c": [4]})


@pytest.mark.parametrize(("dead", "width"), [(5, 32), (16, 16), (20, 16), (31, 16)])
def test_the_surgeon_cuts_only_to_allowed_widths(dead, width):
    """With steps {16, 32}: 5 dead channels wait (27 live would cost a full step of 32 anyway); 16, 20, 31 dead cut
    to 16, keeping 0, 4, 15 dead channels in place as exact zeros."""
    torch.manual_seed(0)
    net = Two().eval()
    attach_quantizers(net)
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(net, x[:1])
    with torch.no_grad():
        net.a.weight_quantizer.bits[:dead] = 0.0
        net.a.bias[:dead] = 0.0
    before = net(x)
    surgeon = Surgeon(graph, widths={"a": [16, 32]})
    surgeon.remove(surgeon.find())
    assert net.a.out_channels == width and net.b.in_channels == width
    assert torch.allclose(net(x), before, atol=1e-6), "the function is unchanged"


def test_latency_tables_are_measured_in_onnx_runtime_and_cached(tmp_path, monkeypatch):
    net = BaselineCNN(1, 10, width=4)
    x = torch.randn(2, 1, 28, 28)
    graph = ChannelGraph(net, x[:1])
    tables = latency_tables(graph, x, batch=2, runs=2, rounds=1, cache_dir=tmp_path)
    assert set(tables) == {"features.0", "features.2", "features.6", "features.8"}, "the classifier's are pinned"
    for name, table in tables.items():
        full = net.get_submodule(name).out_channels
        assert table.widths == timed_widths(full, table.block) and all(ms > 0 for ms in table.ms)
        assert table.step_widths()[-1] == full
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 4 and json.loads(files[0].read_text())["key"]["batch"] == 2
    for f in files:  # what the cache holds is what is read back, without timing again
        stored = json.loads(f.read_text())
        f.write_text(json.dumps({**stored, "ms": [7.0] * len(stored["ms"])}))
    again = latency_tables(graph, x, batch=2, runs=2, cache_dir=tmp_path)
    assert all(t.ms == [7.0] * len(t.ms) for t in again.values())
    files[0].write_text(files[0].read_text()[:40])  # cut short
    stored = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({**stored, "widths": stored["widths"][:-1], "ms": stored["ms"][:-1]}))
    with pytest.warns(UserWarning, match="is stale .*: timing it again") as stale:
        again = latency_tables(graph, x, batch=2, runs=1, rounds=1, cache_dir=tmp_path)
    stale = [str(w.message) for w in stale if "is stale" in str(w.message)]  # not a busy machine's warning
    assert sorted(message.split()[5] for message in stale) == [str(files[0]), str(files[1])]
    assert sum(t.ms != [7.0] * len(t.ms) for t in again.values()) == 2, "the two stale tables timed again"
    assert latency_tables(graph, x, batch=2, cache_dir=tmp_path) == again, "and cached again"
    assert len(latency_tables(graph, x, batch=3, runs=1, cache_dir=tmp_path / "b3")) == 4, "another batch, new tables"
    int8 = latency_tables(graph, x, backend="onnxruntime-cpu-int8", batch=2, runs=1, rounds=1, cache_dir=tmp_path)
    assert len(int8) == 4 and all(t.ms != [7.0] * len(t.ms) for t in int8.values()), "another backend, measured anew"
    assert len(list(tmp_path.glob("*.json"))) == 8
    from lightning_selfcompress.core import widths

    here = widths._device("onnxruntime-cpu", x.device)  # the same CPU model with other vector extensions: other steps
    monkeypatch.setattr(widths, "_device", lambda *args: here.replace(" CPU, ", " CPU, other+avx512f "))
    other = latency_tables(graph, x, batch=2, runs=1, rounds=1, cache_dir=tmp_path)
    assert all(t.ms != [7.0] * len(t.ms) for t in other.values()), "another CPU, measured anew"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="backend='tensorrt' is not one of"):
        latency_tables(graph, x, backend="tensorrt", cache_dir=tmp_path)


def test_torch_tables_time_the_same_chain_in_pytorch_on_the_models_device(tmp_path):
    """backend="torch": the chain that ONNX Runtime's tables time (the layer behind a feeder, its readers through the
    pooling or flattening their shapes ask for), built in PyTorch and timed in eager mode on the model's device (a
    GPU where it trains on one; this CPU here), cached apart from ONNX Runtime's tables."""
    import numpy as np
    import onnxruntime

    from lightning_selfcompress.core.widths import _Chain, _graph

    net = BaselineCNN(1, 10, width=4)
    x = torch.randn(2, 1, 28, 28)
    graph = ChannelGraph(net, x[:1])
    tables = latency_tables(graph, x, backend="torch", batch=2, runs=2, rounds=1, cache_dir=tmp_path)
    assert set(tables) == {"features.0", "features.2", "features.6", "features.8"}
    for name, table in tables.items():
        assert table.device.startswith(f"torch {torch.__version__} CPU") and table.block == 1, table.device
        assert all(ms > 0 for ms in table.ms) and table.step_widths()[-1] == net.get_submodule(name).out_channels
    assert len(latency_tables(graph, x, batch=2, runs=1, rounds=1, cache_dir=tmp_path)) == 4
    assert len(list(tmp_path.glob("*.json"))) == 8, "ONNX Runtime's tables are measured and cached apart"
    half = latency_tables(graph, x, backend="torch", batch=2, runs=1, rounds=1, cache_dir=tmp_path / "half",
                          autocast=torch.bfloat16)  # fmt: skip
    assert {t.device for t in half.values()} == {tables["features.0"].device + ", autocast to bfloat16"}
    with pytest.raises(ValueError, match="autocast=torch.bfloat16 is for backend='torch'"):
        latency_tables(graph, x, autocast=torch.bfloat16, cache_dir=tmp_path)
    rng = np.random.default_rng(0)
    for f in tmp_path.glob("*.json"):
        key = json.loads(f.read_text())["key"]
        specs = [key["layer"], *(spec for spec, _ in key["readers"])]
        session = onnxruntime.InferenceSession(_graph(specs, 2).SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = [rng.standard_normal(i.shape, dtype=np.float32) for i in session.get_inputs()]
        expected = [list(y.shape) for y in session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))]
        with torch.no_grad():
            got = [list(y.shape) for y in _Chain(specs)(*map(torch.from_numpy, feeds))]
        assert got == expected, (key["layer"], got, expected)


def test_a_layer_is_timed_in_its_chain_as_inside_the_network(tmp_path):
    """Its input comes out of a convolution and its readers read its output (through the pooling their shapes ask
    for), so that the runtime's layout changes between them are in the timing; only a reader whose input holds other
    channels too (a concatenation) reads an input of its own."""
    import onnx
    import onnxruntime

    from lightning_selfcompress.core.widths import _graph, _spec

    own = _spec(nn.Conv2d(8, 16, 3, padding=1), [1, 8, 14, 14])
    readers = [_spec(nn.Conv2d(16, 32, 3, padding=1), [1, 16, 7, 7]), _spec(nn.Linear(16, 10), [1, 16]),
               _spec(nn.Conv2d(24, 4, 1), [1, 24, 14, 14])]  # fmt: skip
    model = _graph([own, *readers], batch=2)
    assert [i.name for i in model.graph.input] == ["x0", "x3"], "the concatenation's reader alone reads its own input"
    ops = [n.op_type for n in model.graph.node]
    assert ops[:3] == ["Conv", "Relu", "Conv"] and {"MaxPool", "GlobalMaxPool", "Flatten"} <= set(ops)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: torch.randn(*i.shape).numpy() for i in session.get_inputs()}
    assert [o.shape for o in session.run(None, feeds)] == [(2, 32, 7, 7), (2, 10), (2, 4, 14, 14)]

    options = onnxruntime.SessionOptions()  # the int8 layout: ONNX Runtime runs every layer as an integer kernel
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(_graph([own, *readers], 2, int8="onnxruntime").SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])  # fmt: skip
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4 and "QGemm" in ops and "Conv" not in ops, ops
    assert "NhwcMaxPool" in ops, f"the pooling between the layer and its reader runs on uint8 too: {ops}"


def test_in_the_int8_layout_a_first_layer_on_the_image_is_timed_float_as_in_the_file(tmp_path):
    """The int8 file for ONNX Runtime leaves a layer reading fewer than 4 channels float (its weights folded at
    load): timed as an integer kernel, ResNet-9's `prep` stepped to 14 of 16 channels, and in the file the float
    kernel's output, transposed into the integer layout at 14 channels, cost 8x as long as at 16."""
    import onnx
    import onnxruntime

    from lightning_selfcompress.core.widths import _graph, _spec

    own = _spec(nn.Conv2d(1, 16, 3, padding=1), [1, 1, 28, 28])
    reader = _spec(nn.Conv2d(16, 32, 3, padding=1), [1, 16, 28, 28])
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(_graph([own, reader], 2, int8="onnxruntime").SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])  # fmt: skip
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops[0] == "Conv" and ops.count("QLinearConv") == 1, f"float on the image, its reader integer: {ops}"
    assert "Transpose" in ops[: ops.index("QLinearConv")], f"into the integer kernel's layout, as in the file: {ops}"


def test_in_tensorrt_s_layout_every_layer_of_the_chain_reads_int8_by_its_rules():
    """TensorRT runs a layer in INT8 only where both its input and its weight come through Q/DQ, symmetric (zero
    point 0 of int8): so the chain a "tensorrt-int8" table times, the first layer on the image included (the export
    for TensorRT quantizes it too), passes TensorRT's rule checker, and runs."""
    import onnxruntime

    from lightning_selfcompress.core.onnx_rules import check_explicit_quantization
    from lightning_selfcompress.core.widths import _graph, _spec

    own = _spec(nn.Conv2d(1, 16, 3, padding=1), [1, 1, 28, 28])
    readers = [_spec(nn.Conv2d(16, 32, 3, padding=1), [1, 16, 14, 14]), _spec(nn.Linear(16, 10), [1, 16])]
    model = _graph([own, *readers], 2, int8="tensorrt")
    assert check_explicit_quantization(model) > 0
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 3 and all(made_by.get(n.input[0]) == made_by.get(n.input[1]) == "DequantizeLinear"
                                    for n in layers), "every input and weight through Q/DQ, the image's layer too"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: torch.randn(*i.shape).numpy() for i in session.get_inputs()}
    assert [o.shape for o in session.run(None, feeds)] == [(2, 32, 14, 14), (2, 10)]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_tables_without_tensorrt_say_how_to_install_it(tmp_path):
    model = BaselineCNN(1, 10, width=8).eval()
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(TensorRTUnavailable, match="pip install --extra-index-url https://pypi.nvidia.com tensorrt"):
        latency_tables(ChannelGraph(model, x[:1]), x, backend="tensorrt-int8", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "nothing cached"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs TensorRT and a CUDA GPU (bench/gpu_check.py runs this on a lent one)")
def test_tensorrt_tables_time_multiples_of_8_on_the_gpu_and_are_cached(tmp_path):
    model = BaselineCNN(1, 10, width=16).eval()
    x = torch.randn(2, 1, 28, 28)
    tables = latency_tables(ChannelGraph(model, x[:1]), x, backend="tensorrt-int8", batch=8, runs=5, rounds=1,
                            cache_dir=tmp_path)  # fmt: skip
    assert tables and all(t.widths == [8, 16] and min(t.ms) > 0 for t in tables.values())
    assert "tensorrt" in next(iter(tables.values())).device and len(list(tmp_path.iterdir())) == len(tables)


@pytest.mark.parametrize(("backend", "precision"),
                         [("onnxruntime-cpu", "32-true"), ("torch", "32-true"), ("torch", "bf16-mixed")])
def test_a_surgeon_on_latency_steps_in_a_real_run(backend, precision, tiny_fmnist, tmp_path, monkeypatch):
    """PyTorch's tables are timed in the type the run computes in (a GPU's half kernels step elsewhere)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=16), optimizer="adam", lr=0.003)  # widths 16, 16, 32, 32
    surgeon = ChannelSurgeon(every_n_steps=2, widths=backend, latency_batch=4, round_to=2)

    class Kill(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            for m in quantized_layers(pl_module).values():
                m.weight_quantizer.bits.data[: m.weight_quantizer.bits.numel() // 2] = -1.0

    callbacks = [SelfCompression(gamma=0.0, init_bits=4.0), Kill(), surgeon]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=4, precision=precision)).fit(module,
                                                                                                   tiny_fmnist)
    assert set(surgeon.step_widths) == {"net.features.0", "net.features.2", "net.features.6", "net.features.8"}
    assert all(w % 2 == 0 for steps in surgeon.step_widths.values() for w in steps), "round_to=2: even steps only"
    stored = json.loads(next((tmp_path / "cache").rglob("*.json")).read_text())
    assert stored["device"].endswith(", autocast to bfloat16") == (precision == "bf16-mixed"), stored["device"]
    block = LatencyTable("", [1], [0.0], stored["device"], 4, backend).block  # ONNX Runtime on AVX-512: 16, AVX2: 8
    on_it = [w for steps in surgeon.step_widths.values() for w in steps if 2 * w != block]  # or half a block
    assert all(w % block == 0 for w in on_it), block  # 16, 32: on it
    assert list((tmp_path / "cache").rglob("*.json")), "the tables went to the cache"
    assert surgeon.history, "a surgery ran"
    for name, allowed in surgeon.step_widths.items():
        layer = module.get_submodule(name)
        alive = int((layer.weight_quantizer.bits > 0).sum())
        expected = min(w for w in allowed if w >= alive)  # the fastest width that holds the live channels
        assert layer.out_channels == expected, (name, alive, allowed)
    with pytest.raises(ValueError, match="widths='gpu' is not one of"):
        ChannelSurgeon(widths="gpu")


def test_a_resumed_run_keeps_cutting_to_its_checkpoint_s_steps(tiny_fmnist, tmp_path, monkeypatch):
    """The steps travel in the checkpoint: resumed on a machine whose cache is empty, the surgeon times nothing and
    cuts to the steps the run had (timed anew they could differ, and the resumed run would not be the same run)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def fit(max_steps: int, ckpt_path=None) -> ChannelSurgeon:
        pl.seed_everything(0, verbose=False)
        module = ImageClassifier(BaselineCNN(1, 10, width=4), optimizer="adam", lr=0.003)
        surgeon = ChannelSurgeon(every_n_steps=2, widths="onnxruntime-cpu", latency_batch=2, width_pressure=0.1)
        trainer = pl.Trainer(callbacks=[SelfCompression(gamma=0.0), surgeon],
                             **trainer_kwargs(tmp_path, max_steps=max_steps))  # fmt: skip
        trainer.fit(module, tiny_fmnist, ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / f"step{max_steps}.ckpt")
        return surgeon

    first = fit(2)
    saved = torch.load(tmp_path / "step2.ckpt", weights_only=True)[SURGERY_KEY]["latency_steps"]
    assert saved == {"widths": "onnxruntime-cpu", "steps": first.step_widths} and first.step_widths
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another machine"))
    resumed = fit(4, tmp_path / "step2.ckpt")
    assert resumed.step_widths == first.step_widths
    assert not list((tmp_path / "another machine").rglob("*.json")), "nothing was timed again"
    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=True)  # steps another model's run saved
    checkpoint[SURGERY_KEY]["latency_steps"]["steps"]["net.features.0"] = [16, 32]
    torch.save(checkpoint, tmp_path / "stale.ckpt")
    with pytest.raises(ValueError, match="latency steps for 'net.features.0' .* are stale: 'net.features.0' has 4 "):
        fit(4, tmp_path / "stale.ckpt")


def test_lsc_latency_prints_each_layers_steps(tmp_path, capsys):
    from lightning_selfcompress.latency_cli import main

    main(["--model", "baseline_cnn", "--set", "width=2", "--batch", "1", "--runs", "1", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert all(name in out for name in ("features.0", "features.2", "features.6", "features.8")), out
    assert "channel block" in out, out
    assert len(list(tmp_path.glob("*.json"))) == 4
    with pytest.raises(SystemExit):
        main(["--model", "no_such_model"])
    assert "no model config 'no_such_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--round-to", "0"])
    assert "--round-to 0: must be a positive integer" in capsys.readouterr().err
    main(["--set", "width=2", "--batch", "1", "--runs", "1", "--cache", str(tmp_path), "--torch"])
    assert "torch" in capsys.readouterr().out and len(list(tmp_path.glob("*.json"))) == 8, "PyTorch's own tables"
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "ONNX Runtime's tables are timed on the CPU; add --torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--autocast", "bfloat16"])
    assert "--autocast bfloat16: ONNX Runtime's tables time the file's own types" in capsys.readouterr().err
    main(["--set", "width=2", "--batch", "1", "--runs", "1", "--cache", str(tmp_path), "--torch", "--autocast",
          "bfloat16"])  # fmt: skip
    title = " ".join(capsys.readouterr().out.split())  # the title wraps where a CPU's name is long
    assert "autocast to bfloat16" in title and len(list(tmp_path.glob("*.json"))) == 12
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(SystemExit):
            main(["--tensorrt", "--cache", str(tmp_path)])
        assert "--tensorrt: TensorRT is not installed" in capsys.readouterr().err


def test_the_step_pressure_pushes_the_weakest_live_channels_above_the_step_below():
    bits = torch.tensor([3.0, 0.0, 1.0, 2.5, 0.5, 2.0, -1.0, 4.0])  # 6 live channels

    def pressure(steps, strength=0.5):
        return stream_pressure({"a": bits}, {"a": torch.arange(8)}, {"a": steps}, strength).get("a")

    assert pressure([2, 4, 8]).tolist() == [0, 0, 0.5, 0, 0.5, 0, 0, 0], "6 live, step below 4: the 2 weakest"
    assert pressure([6, 8]) is None, "on a step"
    assert pressure([8]) is None, "no step below: a layer is never pushed to nothing"


def test_with_step_pressure_a_real_run_reaches_the_steps(tiny_fmnist, tmp_path):
    """Steps {4, 8} for every layer of a width-4/8 network with 3 and 6 live channels: the pressure pushes the
    weakest to 0 bits and the surgeon cuts to the step, keeping no dead channel."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=4), optimizer="adam", lr=0.003)
    surgeon = ChannelSurgeon(every_n_steps=5, widths="onnxruntime-cpu", width_pressure=1.0)

    class Setup(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == 0:  # after the surgeon traced the model: fixed steps, one channel dead
                surgeon.step_widths = {name: [2, 4, 8] for name in surgeon.step_widths}
                surgeon.surgeon.widths = {name: set(steps) for name, steps in surgeon.step_widths.items()}
                for name in surgeon.step_widths:
                    pl_module.get_submodule(name).weight_quantizer.bits.data[0] = -1.0

    callbacks = [SelfCompression(gamma=0.0, init_bits=2.0, quantizer_lr=0.1), surgeon, Setup()]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=40)).fit(module, tiny_fmnist)
    for name in surgeon.step_widths:
        layer = module.get_submodule(name)
        assert layer.out_channels in (2, 4) and bool((layer.weight_quantizer.bits > 0).all()), name


def test_a_stream_is_pushed_by_its_groups_in_every_producer_together():
    """The stream's layer a and a branch b (its channels in another order) write the same 4 groups: a group is live
    while a writer's channel of it is, and the groups that some writer let go are pushed first, in the others."""
    groups = {"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([3, 2, 1, 0])}
    bits = {"a": torch.tensor([3.0, 0.0, 1.0, 2.0]), "b": torch.tensor([0.0, 0.5, 2.5, 0.0])}
    # groups 0, 1 and 3 let go by a writer (strongest 3, 2.5, 2), group 2 live in both: 4 live, to the step 2
    grads = stream_pressure(bits, groups, {"a": [2, 8]}, 0.5)
    assert grads["a"].tolist() == [0, 0, 0, 0.5] and grads["b"].tolist() == [0, 0, 0.5, 0], "groups 3 and 1"
    assert stream_pressure(bits, groups, {"a": [4, 8]}, 0.5) == {}, "4 groups live, no step below"
    unquantized = {**groups, "c": torch.tensor([3])}  # a float layer writes group 3 too: it never dies
    grads = stream_pressure({**bits, "c": None}, unquantized, {"a": [2, 8]}, 0.5)
    assert grads["a"].tolist() == [0.5, 0, 0, 0] and grads["b"].tolist() == [0, 0, 0.5, 0], "groups 1 and 0"
    # on its full width, a step: groups 1 and 2 let go by one writer each; the step at or below the 2 groups live
    # in both is 2, so those two go, where still live; without them, nothing pushes the stream below its width
    bits = {"a": torch.tensor([3.0, 0.0, 1.0, 2.0]), "b": torch.tensor([1.0, 0.0, 1.0, 1.0])}  # b: groups 3 2 1 0
    grads = stream_pressure(bits, groups, {"a": [2, 4]}, 0.5)
    assert grads["a"].tolist() == [0, 0, 0.5, 0] and grads["b"].tolist() == [0, 0, 0.5, 0]
    # the same, with a float layer writing group 1 too: it never dies, so it neither takes a push slot nor counts as
    # let go; 3 groups live everywhere, to the step 2: group 2 (let go by a) and the weakest mortal one, group 3
    grads = stream_pressure({**bits, "c": None}, {**groups, "c": torch.tensor([1])}, {"a": [2, 4]}, 0.5)
    assert grads["a"].tolist() == [0, 0, 0.5, 0.5] and grads["b"].tolist() == [0.5, 0, 0, 0]
    # float layers write 3 of the 4 groups: the step 2 is out of reach, so the one group that could die is not pushed
    bits = {"a": torch.tensor([0.0, 1.0, 1.0, 2.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0]), "c": None}
    assert stream_pressure(bits, {**groups, "c": torch.tensor([1, 2, 3])}, {"a": [2, 4]}, 0.5) == {}


def test_with_stream_pressure_a_real_residual_stream_reaches_its_step(tiny_fmnist, tmp_path):
    """ResNet-9's first stream (8 channels: layer1.0 and the residual branch's res2 write it) with steps {4, 8}:
    the two layers let different channels go, so all 8 groups are live, on a step; pushed group by group, those let
    go first, the stream goes to 4."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(ResNet9(1, 10, width=4), optimizer="adam", lr=0.003)
    stream, branch = "net.layer1.0.0", "net.layer1.2.res2.0"
    surgeon = ChannelSurgeon(every_n_steps=5, widths="any", constant_pull=0.02)

    class Setup(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == 0:  # traced: steps for the stream alone, dead channels that do not line up
                surgeon.width_pressure, surgeon.step_widths = 1.0, {stream: [4, 8]}
                surgeon.surgeon.widths = {stream: {4, 8}}
                pl_module.get_submodule(stream).weight_quantizer.bits.data[:3] = -1.0
                pl_module.get_submodule(branch).weight_quantizer.bits.data[[3, 4, 5]] = -1.0

    callbacks = [SelfCompression(gamma=0.0, init_bits=2.0, quantizer_lr=0.1), surgeon, Setup()]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=40)).fit(module, tiny_fmnist)
    assert module.get_submodule(stream).out_channels == 4
    assert module.get_submodule("net.layer1.2.res1.0").in_channels == 4, "the branch reads the narrower stream"


def test_pressure_without_latency_steps_is_refused():
    with pytest.raises(ValueError, match="width_pressure=0.1 must be >= 0 and needs latency steps"):
        ChannelSurgeon(width_pressure=0.1)


def test_latency_weights_pull_each_layer_by_the_time_its_channels_cost():
    tables = {  # a: 10 ms over 4 channels of 8 weights each; b: flat (its slope is noise: keeps 1); c: 1 ms/channel
        "a": LatencyTable("a", [1, 2, 3, 4], [1.0, 4.0, 7.0, 10.0], "cpu", 1),
        "b": LatencyTable("b", [1, 2], [5.0, 5.0], "cpu", 1),
        "c": LatencyTable("c", [1, 2], [1.0, 2.0], "cpu", 1),
    }
    original = {"a": (4, 32), "b": (2, 100), "c": (2, 4), "untimed": (3, 9)}
    weights = latency_weights(tables, original)
    assert set(weights) == {"a", "c"}
    assert weights["a"] / weights["c"] == pytest.approx((3.0 / 8) / (1.0 / 2)), "ms per channel over weights per channel"
    timed = ("a", "c")
    assert sum(weights[n] * original[n][1] for n in timed) == pytest.approx(sum(original[n][1] for n in timed))
    assert latency_weights({"b": tables["b"]}, original) == {}, "no measurable time: no weighting"


def test_weighted_bits_scale_each_layers_size_gradient():
    net = BaselineCNN(1, 10, width=4)
    attach_quantizers(net)
    size = SizeModel(net, torch.randn(2, 1, 28, 28))
    factors = {"features.2": 3.0, "classifier": 0.5}
    grads = torch.autograd.grad(size.bits(factors), [m.weight_quantizer.bits for m in quantized_layers(net).values()])
    plain = torch.autograd.grad(size.bits(), [m.weight_quantizer.bits for m in quantized_layers(net).values()])
    for name, g, p in zip(quantized_layers(net), grads, plain):
        assert torch.allclose(g, factors.get(name, 1.0) * p), name


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
def test_a_latency_weighted_size_term_in_a_real_run(tiny_fmnist, tmp_path, monkeypatch, backend):
    """In a mixed-precision run PyTorch's tables are timed in its half type; ONNX Runtime's time the file's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # ONNX Runtime's tables time multiples of its channel block (8 or 16): at width 32 every layer has several widths;
    # PyTorch's time every width, in bf16 on this CPU (slow): width 8
    width = 8 if backend == "torch" else 32
    module = ImageClassifier(BaselineCNN(1, 10, width=width), optimizer="adam", lr=0.003)
    compression = SelfCompression(gamma=0.5, init_bits=4.0, latency_weight=1.0, latency_backend=backend)
    trainer = pl.Trainer(callbacks=[compression], **trainer_kwargs(tmp_path, max_steps=3, precision="bf16-mixed"))
    trainer.fit(module, tiny_fmnist)
    weights = compression.compressor.layer_weights
    tables = [json.loads(t.read_text()) for t in (tmp_path / "cache").rglob("*.json")]
    assert tables, "measured through the surgeon's cached tables"
    flat = {t["layer"] for t in tables if is_flat(t["widths"], t["ms"])}  # its time per channel is noise
    assert set(weights) == {"net.features.0", "net.features.2", "net.features.6", "net.features.8"} - flat
    assert len(weights) >= 2 and all(w >= 0 for w in weights.values()) and len(set(weights.values())) > 1, weights
    assert {t["backend"] for t in tables} == {backend}
    assert {t["device"].endswith(", autocast to bfloat16") for t in tables} == {backend == "torch"}
    for bad in (-0.1, 1.5, "fast"):
        with pytest.raises(ValueError, match="latency_weight=.* must be a number in \\[0, 1\\]"):
            SelfCompression(latency_weight=bad)
    with pytest.raises(ValueError, match="latency_backend='tensorrt' is not one of"):
        SelfCompression(latency_weight=1.0, latency_backend="tensorrt")
