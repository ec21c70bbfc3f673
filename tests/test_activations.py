"""int8 activations learned in training (LSQ): the quantizer is ONNX's Q/DQ pair bit for bit, its gradients are LSQ's,
and a real run (with surgery) exports a file whose layers run as integer kernels; its checkpoint keeps the steps."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import optimized_graph, sgd_steps, trainer_kwargs
from lightning_selfcompress import ChannelSurgeon, CompressedExport, SelfCompression
from lightning_selfcompress.core.latency import ort_kernels, ort_node_ms
from lightning_selfcompress.core.quant import ActivationQuantizer, quantized_layers
from lightning_selfcompress.core.surgery import load_compressed
from lightning_selfcompress.models import BaselineCNN, ImageClassifier, ResNet9


def onnx_qdq(x: np.ndarray, scale: float, zero_type: type = np.int8) -> np.ndarray:
    """What a QuantizeLinear -> DequantizeLinear pair (int8 or uint8, zero point 0) computes in ONNX Runtime."""
    args = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, zero_type), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], args)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_activation_quantizer_is_onnxs_quantize_dequantize_pair_bit_for_bit():
    quantizer = ActivationQuantizer()
    quantizer.log2_scale.data.fill_(-4.3)
    scale = quantizer.scale
    ties = (torch.arange(-140, 140, dtype=torch.float32) + 0.5) * scale  # half-way values, and past both ends
    x = torch.cat([ties, torch.randn(1000) * 3]).view(1, -1)
    quantizer.initialized.fill_(True)
    assert torch.equal(quantizer(x), torch.from_numpy(onnx_qdq(x.numpy(), scale)))


def test_its_gradients_are_lsqs():
    """Against autograd on LSQ's composite form (step gradient scaled by 1/sqrt(features * 127)), in float64."""
    from lightning_selfcompress.core.quant import _QuantizeInt8

    x = (torch.randn(4, 8, 5, 5, dtype=torch.float64) * 4).requires_grad_()
    a = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    got = torch.autograd.grad(_QuantizeInt8.apply(x, a), (x, a), g)
    step = torch.exp2(a)
    shrink = step / math.sqrt(8 * 5 * 5 * 127)
    step = (step - shrink).detach() + shrink  # LSQ's gradient scale
    clamped = (x / step).clamp(-128, 127)
    expected = torch.autograd.grad(((clamped.round() - clamped).detach() + clamped) * step, (x, a), g)
    assert torch.equal(got[0], expected[0])
    assert torch.allclose(got[1], expected[1], rtol=1e-5)
    assert 0 < (got[0] == 0).float().mean() < 0.5, "values past the ends get no gradient, the rest pass through"


def test_a_run_with_int8_activations_exports_integer_kernels_and_keeps_its_steps(tiny_fmnist, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=8), optimizer="adam", lr=0.003)
    compression = SelfCompression(gamma=0.5, init_bits=3.0, quantizer_lr=0.1, int8_activations=True)
    surgeon = ChannelSurgeon(every_n_steps=4)
    export = CompressedExport(tmp_path / "model.onnx", latency_batches=(1,), latency_runs=1, engine="never")
    saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    initial = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # some channels at 0 bits, for the surgeon to cut
            for m in quantized_layers(pl_module).values():
                m.weight_quantizer.bits.data[:2] = -1.0

        def on_train_batch_end(self, trainer, pl_module, *args):
            if not initial:  # after the first step: each step started at max|x| / 127 of its first batch
                layers = quantized_layers(pl_module).items()
                initial.update({n: m.input_quantizer.scale for n, m in layers if "input_quantizer" in m._modules})

    kwargs = trainer_kwargs(tmp_path, max_steps=12, enable_checkpointing=True)
    pl.Trainer(callbacks=[compression, surgeon, Spy(), saver, export], **kwargs).fit(module, tiny_fmnist)
    layers = quantized_layers(module)
    assert surgeon.surgeon.history, "channels were cut while the input steps trained"
    assert "input_quantizer" not in layers["net.features.0"]._modules, "the first layer reads the image in float"
    stepped = {n: m for n, m in layers.items() if "input_quantizer" in m._modules}
    assert set(initial) == set(stepped) == set(layers) - {"net.features.0"}
    assert all(m.input_quantizer.scale != initial[n] for n, m in stepped.items()), "every step is learned"
    report = export.report
    assert report["activation_quantized"] and report["parity"]["max_rel"] <= 1e-2, "the graph as ONNX defines it"
    assert report["parity"]["kernels_max_rel"] >= 0, "ONNX Runtime's integer kernels measured beside it"
    kernels = ort_kernels(tmp_path / "model.onnx")
    # the image's layer float, and the logits'; the layers before a BatchNorm after a ReLU too until their readers'
    # steps quantized around its shift (`folded_steps`), so that it folds away
    assert [name for name, kernel in kernels.items() if kernel == "QLinearConv"] == [
        "/net/features/features.2/Conv", "/net/features/features.6/Conv", "/net/features/features.8/Conv"], kernels
    assert len(report["folded_batchnorm"]) == 2, report["folded_batchnorm"]
    profiled = ort_node_ms(tmp_path / "model.onnx", (1, 28, 28), batch=4, runs=3)  # where its time goes, per node
    assert [op for op, _ in profiled.values()].count("QLinearConv") == list(kernels.values()).count("QLinearConv")
    assert all(ms >= 0 for _, ms in profiled.values()), profiled

    restored = load_compressed(ImageClassifier(BaselineCNN(1, 10, width=8)), saver.last_model_path)
    for name, m in quantized_layers(restored).items():
        if name in stepped:
            assert m.input_quantizer.initialized and m.input_quantizer.scale == stepped[name].input_quantizer.scale
    x = next(iter(tiny_fmnist.train_dataloader()))[0]
    assert torch.equal(restored(x), module.eval()(x)), "the checkpoint holds the trained steps"
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    written = {float(numpy_helper.to_array(i)) for i in graph.initializer if i.name.endswith(".scale")}
    assert written == {float(np.float32(m.input_quantizer.scale)) for m in stepped.values()}, "the trained steps"


def test_resnet9_with_int8_activations_learns_after_a_sanity_check(tiny_fmnist, tmp_path):
    """Its steps start on the first training batch. Started on the size trace or the sanity check (eval mode, where
    BatchNorm's initial statistics leave activations up to 100x smaller), they were 2^-6 to 2^-12, every later batch
    saturated, the clamp passed no gradient and the loss stayed at ln 10."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(ResNet9(1, 10, width=8), optimizer="adam", lr=0.003)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(float(outputs["loss"]))

    compression = SelfCompression(gamma=0.0, init_bits=4.0, int8_activations=True)
    kwargs = trainer_kwargs(tmp_path, max_steps=32, limit_val_batches=1, num_sanity_val_steps=1)
    pl.Trainer(callbacks=[compression, Losses()], **kwargs).fit(module, tiny_fmnist)
    assert sum(losses[-4:]) / 4 < 0.7 * math.log(10), losses


def test_the_step_starts_from_the_first_batch_and_a_loaded_state_decides_again():
    quantizer = ActivationQuantizer().eval()
    x = torch.full((2, 3), 0.3)
    assert quantizer(x) is x and not quantizer.initialized, "eval mode before training: unchanged, not started"
    quantizer.train()(torch.full((2, 3), 127.0))
    assert quantizer.initialized and quantizer.scale == 1.0, "max|x| / 127 of the first batch"
    quantizer(torch.full((2, 3), 254.0))
    assert quantizer.scale == 1.0, "later batches do not restart it"
    quantizer.load_state_dict(ActivationQuantizer().state_dict())  # a state from before any batch
    quantizer(torch.full((2, 3), 254.0))
    assert quantizer.scale == 2.0, "started again from the batch after the load"


def test_a_non_negative_input_learns_the_uint8_grid_where_asked():
    """ONNX Runtime's layout: a ReLU's output on [0, 255] steps, the uint8 pair bit for bit; the grid travels in the
    state_dict, and a state written before it existed is int8."""
    quantizer = ActivationQuantizer(unsigned=True).train()
    quantizer(torch.rand(4, 8) * 51.0)
    assert quantizer.unsigned and quantizer.scale == pytest.approx(float(quantizer(torch.tensor(51.0)) / 255), rel=0.01)
    x = torch.cat([torch.arange(-3, 260, dtype=torch.float32) + 0.5, torch.rand(500) * 60]).view(1, -1) * quantizer.scale
    assert torch.equal(quantizer(x), torch.from_numpy(onnx_qdq(x.numpy(), quantizer.scale, np.uint8))), "negatives to 0"
    signed = ActivationQuantizer(unsigned=True).train()
    signed(torch.randn(4, 8))
    assert not signed.unsigned, "an input with negative values keeps the int8 grid"
    assert not ActivationQuantizer().train()(torch.rand(4, 8)).lt(0).any() and not ActivationQuantizer().unsigned

    loaded = ActivationQuantizer()
    loaded.load_state_dict(quantizer.state_dict())
    assert loaded.unsigned and torch.equal(loaded(x), quantizer(x)), "the grid comes back with the step"
    old = {k: v for k, v in quantizer.state_dict().items() if k != "unsigned"}
    loaded.load_state_dict(old)
    assert not loaded.unsigned and loaded(x).min() < 0, "a state from before the uint8 grid: int8"


def test_steps_trained_for_onnx_runtime_fuse_the_relus_and_refuse_tensorrt(tiny_fmnist, tmp_path, monkeypatch):
    """ResNet-9 trained with `activation_runtime="onnxruntime"`: its file drops the ReLUs before uint8 steps (the
    integer kernel before does them), matches PyTorch, and ONNX Runtime runs fewer float ReLUs than in the same run
    trained for TensorRT, as many integer kernels (the ReLUs whose outputs also reach a residual Add, read float,
    stay). Asked for a TensorRT layout, fit stops before training, not after it."""
    from lightning_selfcompress.core.export import ExportError
    from lightning_selfcompress.core.parity import ParityError

    kernels, relus = {}, {}
    for runtime in ("onnxruntime", "tensorrt"):
        pl.seed_everything(0, verbose=False)
        module = ImageClassifier(ResNet9(1, 10, width=8), optimizer="adam", lr=0.003)
        compression = SelfCompression(gamma=0.0, init_bits=4.0, int8_activations=True, activation_runtime=runtime)
        export = CompressedExport(tmp_path / f"{runtime}.onnx", latency_batches=(1,), latency_runs=1, engine="never",
                                  runtime="onnxruntime")  # fmt: skip
        pl.Trainer(callbacks=[compression, export], **trainer_kwargs(tmp_path, max_steps=8)).fit(module, tiny_fmnist)
        assert export.report["parity"]["max_rel"] <= 5e-2, export.report["parity"]
        layers = quantized_layers(module)
        unsigned = [n for n, m in layers.items() if "input_quantizer" in m._modules and m.input_quantizer.unsigned]
        assert len(unsigned) == (len(layers) - 1 if runtime == "onnxruntime" else 0), unsigned  # all after a ReLU
        kernels[runtime] = list(ort_kernels(tmp_path / f"{runtime}.onnx").values()).count("QLinearConv")
        ran = ort_node_ms(tmp_path / f"{runtime}.onnx", (1, 28, 28), batch=2, runs=1).values()
        relus[runtime] = [op for op, _ in ran].count("Relu")
    assert relus["onnxruntime"] < relus["tensorrt"], relus
    assert kernels["onnxruntime"] == kernels["tensorrt"] >= 3, kernels
    parity = export.report["parity"]
    assert parity["codes_changed"] <= 0.02 and parity["codes_max_levels"] <= 2, parity

    # one layer's step 19% off in the file: the logits may stay within any tolerance, its codes do not
    import lightning_selfcompress.core.export as export_module

    real = export_module._quantize_activations

    def off(onnx_model, layers, trained, *args):
        node = next(name for name in trained if "layer2" in name)
        return real(onnx_model, layers, {**trained, node: (trained[node][0] * 1.19, trained[node][1])}, *args)

    monkeypatch.setattr(export_module, "_quantize_activations", off)
    x = next(iter(tiny_fmnist.train_dataloader()))[0]
    with pytest.raises(ParityError, match=r"int8 input codes of net\.layer2\.0\.0 differ"):
        export_module.export_onnx(module, x, tmp_path / "off.onnx", tolerance=1.0, runtime="onnxruntime")
    monkeypatch.undo()
    export_module.export_onnx(module, x, tmp_path / "right.onnx", tolerance=1.0, runtime="onnxruntime")

    module = ImageClassifier(ResNet9(1, 10, width=8), optimizer="adam", lr=0.003)
    compression = SelfCompression(gamma=0.0, int8_activations=True, activation_runtime="onnxruntime")
    export = CompressedExport(tmp_path / "engine.onnx", engine="never", runtime="tensorrt")
    trainer = pl.Trainer(callbacks=[compression, export], **trainer_kwargs(tmp_path))
    with pytest.raises(ExportError, match="TensorRT takes symmetric int8 only"):
        trainer.fit(module, tiny_fmnist)
    assert trainer.global_step == 0 and not (tmp_path / "engine.onnx").exists()


def test_a_wrong_activation_runtime_is_named():
    with pytest.raises(ValueError, match="activation_runtime"):
        SelfCompression(int8_activations=True, activation_runtime="tflite")


def test_a_deep_torchvision_network_exports_its_trained_steps_layer_for_layer(tmp_path):
    """ResNet-50 two SGD steps after its steps started. The code check computes each layer from the file's codes
    upstream: compared along the whole network, codes a level apart on rounding boundaries compounded to 71% of the
    classifier's, and the export refused a correct file. A layer whose weight stays float (more than 8 bits: no size
    term pulled them down) still reads its input through its trained step, as it trained (it read the float tensor,
    and every layer after it moved)."""
    import torchvision

    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.onnx_fold import producers_of
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    attach_quantizers(model, QuantizationConfig(int8_activations=True))
    sgd_steps(model, (3, 64, 64))
    with pytest.warns(UserWarning, match=r"'layer1\.0\.conv1': .* more than 8 bits"):
        result = export_onnx(model.eval(), torch.randn(2, 3, 64, 64), tmp_path / "r50.onnx")
    assert result.parity.codes_changed <= 0.02, result.parity
    graph = onnx.load(str(tmp_path / "r50.onnx")).graph
    conv = next(n for n in graph.node if n.name == "/layer1/layer1.0/conv1/Conv")
    assert producers_of(graph)[conv.input[0]].op_type == "DequantizeLinear"


def test_a_linear_on_tokens_keeps_its_trained_step_in_the_file(tmp_path):
    """A Linear on (batch, tokens, features) exports as MatMul, whose weight stays behind Mul(Cast) (an integer
    MatMul would want its scales on the other axis): the file still reads its input through the trained step, as it
    trained (the step was dropped: Swin-T's file 1.6% off, inside the 5% tolerance, its MLPs' codes not compared)."""
    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.onnx_fold import producers_of
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    attach_quantizers(model, QuantizationConfig(int8_activations=True))
    model.train()(torch.randn(4, 5, 8))  # the steps start
    result = export_onnx(model.eval(), torch.randn(2, 5, 8), tmp_path / "tokens.onnx")
    graph = onnx.load(str(tmp_path / "tokens.onnx")).graph
    producer = producers_of(graph)
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and all(producer[n.input[0]].op_type == "DequantizeLinear" for n in matmuls)
    assert result.parity.codes_changed == 0 and result.parity.max_rel < 1e-5, result.parity


class Fork(torch.nn.Module):
    """Two layers reading one tensor (an Inception block's branches, a ResNet's downsampling pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.narrow, self.wide = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(torch.cat([self.narrow(x), self.wide(x)], 1))
        return self.fc(torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1))


def test_layers_reading_one_tensor_share_its_step_and_the_file_quantizes_it_once(tmp_path, monkeypatch):
    """With a step each, the tensor had two QuantizeLinears and the layer making it could fuse neither (ONNX Runtime's
    QLinearConv and QLinearAdd take one output step): torchvision's ResNets left the Add before each downsampling
    block float. Shared, it is quantized once, and its maker runs as an integer kernel with that output step. A layer
    whose output is a Concat's second input gets the step after the Concat too (only the first did: SqueezeNet's
    3x3 expands ran float)."""
    import lightning_selfcompress.core.export as export_module
    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.onnx_fold import producers_of
    from lightning_selfcompress.core.parity import ParityError
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, input_steps

    torch.manual_seed(0)
    model = Fork()
    attach_quantizers(model, QuantizationConfig(int8_activations=True, activation_runtime="onnxruntime"))
    steps = input_steps(model)
    assert steps["narrow"] is steps["wide"] and steps["stem"] is not steps["narrow"]
    sgd_steps(model, (4, 12, 12), steps=3, lr=0.1)
    x = torch.randn(2, 4, 12, 12)
    result = export_onnx(model.eval(), x, tmp_path / "fork.onnx", runtime="onnxruntime")
    assert result.parity.codes_changed == 0 and result.parity.max_rel < 1e-5, result.parity
    graph = onnx.load(str(tmp_path / "fork.onnx")).graph
    producer = producers_of(graph)
    pair = [producer[n.input[0]] for n in graph.node if n.name in ("/narrow/Conv", "/wide/Conv")]
    assert [dq.op_type for dq in pair] == ["DequantizeLinear"] * 2 and pair[0].input[0] == pair[1].input[0]
    kernels = ort_kernels(tmp_path / "fork.onnx")  # and the pair's outputs, through the Concat, take the fc's step
    assert kernels == {"/stem/Conv": "QLinearConv", "/narrow/Conv": "QLinearConv", "/wide/Conv": "QLinearConv",
                       "/fc/Gemm": "Gemm"}, kernels  # fmt: skip

    real = export_module._quantize_activations  # one reader's step off in the file: the code check names that reader

    def off(onnx_model, layers, trained, *args):
        node = next(name for name in trained if "narrow" in name)
        return real(onnx_model, layers, {**trained, node: (trained[node][0] * 1.19, trained[node][1])}, *args)

    with monkeypatch.context() as patched:
        patched.setattr(export_module, "_quantize_activations", off)
        with pytest.raises(ParityError, match="int8 input codes of narrow differ"):
            export_onnx(model, x, tmp_path / "off.onnx", tolerance=1.0, runtime="onnxruntime")

    state = model.state_dict()
    restored = load_compressed(Fork(), state)
    assert input_steps(restored)["narrow"] is input_steps(restored)["wide"]
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    # a state written before steps were shared holds two: each layer keeps its own, as it trained
    state["wide.input_quantizer.log2_scale"] = state["wide.input_quantizer.log2_scale"] + 0.25
    separate = load_compressed(Fork(), state)
    assert input_steps(separate)["narrow"] is not input_steps(separate)["wide"]
    assert float(input_steps(separate)["wide"].log2_scale) == float(state["wide.input_quantizer.log2_scale"])


def test_the_outputs_are_held_to_the_tolerance_computed_from_the_files_codes(tmp_path, monkeypatch):
    """Inception-v3 two SGD steps in: its file's free run moved 7.8% off PyTorch's logits, one-level moves in at most
    0.13% of a layer's codes compounding over 94 layers, and the export refused a correct file even at 5e-2. Computed
    from the file's codes at every step, the outputs agree to 1e-6, so the tolerance (1e-4 by default) holds them,
    with the codes layer by layer; and an error after the last step is still caught."""
    import torchvision

    import lightning_selfcompress.core.export as export_module
    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.parity import ParityError
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers

    torch.manual_seed(0)
    model = torchvision.models.inception_v3(num_classes=10, aux_logits=False, init_weights=True)
    attach_quantizers(model, QuantizationConfig(int8_activations=True, activation_runtime="onnxruntime"))
    sgd_steps(model, (3, 96, 96))
    result = export_onnx(model.eval(), torch.randn(2, 3, 96, 96), tmp_path / "v3.onnx", runtime="onnxruntime")
    parity = result.parity
    assert parity.tolerance == 1e-4 and parity.forced_max_rel < 1e-5 < parity.max_rel, parity
    assert parity.codes_changed <= 0.02, parity

    torch.manual_seed(0)
    model = Fork()
    attach_quantizers(model, QuantizationConfig(int8_activations=True))
    sgd_steps(model, (4, 12, 12), steps=3, lr=0.1)
    real = export_module._quantize_activations

    def wrong_bias(onnx_model, *args):  # the logits' bias off by one in the file, after every step
        scales = real(onnx_model, *args)
        bias = next(i for i in onnx_model.graph.initializer if i.name == "fc.bias")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1, "fc.bias"))
        return scales

    monkeypatch.setattr(export_module, "_quantize_activations", wrong_bias)
    with pytest.raises(ParityError, match="computing from the file's codes"):
        export_onnx(model.eval(), torch.randn(2, 4, 12, 12), tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()


def test_a_max_pool_on_the_float_first_layer_stays_float_and_concatenated_layers_run_integer(tmp_path):
    """SqueezeNet: the image's convolution stays float in ONNX Runtime's layout, and ONNX Runtime moved the
    QuantizeLinear after its max pool before it, pooling uint8 in NCHW (2.8 of 6.6 ms at 224x224, batch 1); a ReLU
    between them keeps the pool float. Each fire module's 3x3 expand, the Concat's second input, ran float too."""
    import torchvision

    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.onnx_fold import producers_of
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=10)
    attach_quantizers(model, QuantizationConfig(int8_activations=True, activation_runtime="onnxruntime"))
    sgd_steps(model, (3, 64, 64), batch=4)
    result = export_onnx(model.eval(), torch.randn(2, 3, 64, 64), tmp_path / "squeeze.onnx", runtime="onnxruntime")
    assert result.parity.max_rel <= 5e-2 and result.parity.codes_changed <= 0.02, result.parity
    graph = optimized_graph(tmp_path / "squeeze.onnx", tmp_path)
    first_pool = next(n for n in graph.node if "MaxPool" in n.op_type)
    assert producers_of(graph)[first_pool.input[0]].op_type != "QuantizeLinear", first_pool
    kernels = ort_kernels(tmp_path / "squeeze.onnx")
    floats = [layer for layer, kernel in kernels.items() if kernel != "QLinearConv"]
    assert floats == ["/features/features.0/Conv", "/classifier/classifier.1/Conv"], floats  # the image's; the logits'


@pytest.mark.parametrize("trained", [True, False], ids=["trained steps", "calibrated"])
def test_an_inception_block_pools_its_quantized_input_so_that_every_branch_runs_integer(tmp_path, trained):
    """GoogLeNet: each block's pool branch read the concatenated input through a max pool with a step of its own, so
    the tensor had two readers, its makers (every branch of the block before) ran float in ONNX Runtime: 19 of 57
    convolutions integer. Max pooling commutes with the rounding, so the pool branch shares its siblings' step (or,
    calibrated, their range) and the file pools the one quantized tensor."""
    import torchvision

    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.onnx_fold import producers_of
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, input_steps

    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)
    attach_quantizers(model, QuantizationConfig(int8_activations=trained, activation_runtime="onnxruntime"))
    x, calibration = torch.randn(2, 3, 64, 64), None
    if trained:
        steps = input_steps(model)
        assert steps["inception3a.branch4.1.conv"] is steps["inception3a.branch1.conv"]  # through its pool
        assert steps["inception4a.branch4.1.conv"] is steps["inception4a.branch2.0.conv"]  # and the stage's pool first
        assert steps["inception3a.branch1.conv"] is not steps["conv3.conv"]
        sgd_steps(model, (3, 64, 64), batch=4)
    else:
        calibration = [torch.randn(4, 3, 64, 64)]
    result = export_onnx(model.eval(), x, tmp_path / "g.onnx", calibration=calibration, runtime="onnxruntime",
                         tolerance=None if calibration else 1e-4)  # fmt: skip
    if trained:
        assert result.parity.max_rel < 1e-5 and result.parity.codes_changed == 0, result.parity
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    producer = producers_of(graph)
    branch_pool = next(n for n in graph.node if n.name == "/inception3a/branch4/branch4.0/MaxPool")
    assert producer[branch_pool.input[0]].op_type == "DequantizeLinear", branch_pool
    kernels = ort_kernels(tmp_path / "g.onnx")
    floats = [layer for layer, kernel in kernels.items() if kernel != "QLinearConv"]
    # the image's; the last block's, which meet an average pool; the logits'
    assert floats == ["/conv1/conv/Conv"] + [f"/inception5b/{b}/conv/Conv" for b in
                     ("branch1", "branch2/branch2.1", "branch3/branch3.1", "branch4/branch4.1")] + ["/fc/Gemm"], floats


def test_steps_after_a_batchnorm_after_a_relu_quantize_around_its_shift_so_that_it_folds(tmp_path):
    """The main job's blocks: Conv -> ReLU -> BatchNorm -> MaxPool -> Conv. The export folds that BatchNorm away (its
    scale into the first convolution, its shift into the second's bias), so the file can quantize only the pooled
    ReLU output, less the shift; a step trained on the BatchNorm's output kept it as a node and the first convolution
    float. A state written before such steps loads as it trained, and its file keeps the BatchNorm."""
    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, input_steps

    torch.manual_seed(0)
    model = BaselineCNN(1, 10, width=8)
    attach_quantizers(model, QuantizationConfig(int8_activations=True))
    assert {name: bool(step.shifted) for name, step in input_steps(model).items()} == {
        "features.2": False, "features.6": True, "features.8": False, "classifier": True}  # fmt: skip
    sgd_steps(model, (1, 28, 28), steps=3, lr=0.05, batch=16)
    x = torch.randn(4, 1, 28, 28)
    result = export_onnx(model.eval(), x, tmp_path / "cnn.onnx")
    assert len(result.folded_batchnorm) == 2 and result.parity.max_rel < 1e-5, result
    assert result.parity.codes_changed == 0, result.parity

    restored = load_compressed(BaselineCNN(1, 10, width=8), model.state_dict())
    assert torch.equal(restored(x), model(x)), "the checkpoint says which steps are shifted"
    before = {k: v for k, v in model.state_dict().items() if not k.endswith(".shifted")}  # as written before them
    old = load_compressed(BaselineCNN(1, 10, width=8), before)
    assert not any(step.shifted for step in input_steps(old).values())
    result = export_onnx(old, x, tmp_path / "old.onnx")
    assert result.folded_batchnorm == [] and result.parity.max_rel < 1e-5, result
