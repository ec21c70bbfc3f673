"""Residual Adds' inputs trained with int8 steps: hooked where they are made, through surgery and checkpoints, and
exported as Q/DQ that ONNX Runtime runs as integer Adds between integer convolutions."""

from __future__ import annotations

import collections

import lightning.pytorch as pl
import onnx
import pytest
import torch
import torchvision
from conftest import optimized_graph, sgd_steps, trainer_kwargs

from lightning_selfcompress import ChannelSurgeon, CompressedExport, SelfCompression
from lightning_selfcompress.core.export import export_onnx
from lightning_selfcompress.core.latency import ort_kernels
from lightning_selfcompress.core.onnx_fold import producers_of
from lightning_selfcompress.core.parity import ParityError
from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, quantized_layers
from lightning_selfcompress.core.residual_steps import OutputStep, attach_residual_steps
from lightning_selfcompress.core.surgery import load_compressed
from lightning_selfcompress.models import ImageClassifier, ResNet9


def optimized_ops(path, tmp_path) -> collections.Counter:
    return collections.Counter(n.op_type for n in optimized_graph(path, tmp_path).node)


def adds_reading_steps(path) -> list[bool]:
    """Per Add of the file, whether both its inputs come through a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    producer = producers_of(graph)
    dequantized = [[getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in n.input] for n in graph.node
                   if n.op_type == "Add"]  # fmt: skip
    return [all(inputs) for inputs in dequantized]


def test_resnet9_trains_its_residual_adds_in_int8_through_surgery_and_a_checkpoint(tiny_fmnist, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(ResNet9(1, 10, width=8), optimizer="adam", lr=0.003)
    compression = SelfCompression(gamma=0.0, init_bits=4.0, int8_activations=True, activation_runtime="onnxruntime")
    surgeon = ChannelSurgeon(every_n_steps=4)
    export = CompressedExport(tmp_path / "model.onnx", latency_batches=(1,), latency_runs=1, engine="never",
                              runtime="onnxruntime")  # fmt: skip
    saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True)

    class Cut(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # some channels at 0 bits, for the surgeon to cut
            for m in quantized_layers(pl_module).values():
                m.weight_quantizer.bits.data[:2] = -1.0

    kwargs = trainer_kwargs(tmp_path, max_steps=8, enable_checkpointing=True)
    pl.Trainer(callbacks=[compression, surgeon, Cut(), saver, export], **kwargs).fit(module, tiny_fmnist)
    assert surgeon.surgeon.history, "channels were cut while the steps trained"
    net = module.net
    hooked = {n: m.output_quantizer for n, m in net.named_modules() if "output_quantizer" in m._modules}
    assert set(hooked) == {"layer1.1", "layer1.2.res2.2", "layer3.1", "layer3.2.res2.2"}, "each Add's two inputs"
    assert hooked["layer1.1"] is net.layer1[2].res1[0].input_quantizer, "the skip takes its reader's step"
    assert all(q.initialized and q.unsigned for q in hooked.values()), "ReLU outputs, pooled: the uint8 grid"

    assert export.report["parity"]["max_rel"] <= 5e-2 and export.report["parity"]["codes_changed"] <= 0.02
    assert adds_reading_steps(tmp_path / "model.onnx") == [True, True]
    ops = optimized_ops(tmp_path / "model.onnx", tmp_path)
    assert ops["QLinearAdd"] == 2, ops
    kernels = ort_kernels(tmp_path / "model.onnx")
    assert list(kernels.values()).count("QLinearConv") == 7, kernels  # all but the image's first layer

    # the skip's reader's codes are compared too: its step 19% off in the file fails the export, naming it
    import lightning_selfcompress.core.export as export_module

    real = export_module._quantize_activations

    def off(onnx_model, layers, trained, *args):
        node = next(name for name in trained if "layer1.2/res1" in name)
        return real(onnx_model, layers, {**trained, node: (trained[node][0] * 1.19, trained[node][1])}, *args)

    x = next(iter(tiny_fmnist.train_dataloader()))[0]
    with monkeypatch.context() as patched:
        patched.setattr(export_module, "_quantize_activations", off)
        with pytest.raises(ParityError, match=r"int8 input codes of net\.layer1\.2\.res1\.0 differ"):
            export_onnx(module, x, tmp_path / "off.onnx", tolerance=1.0, runtime="onnxruntime")

    restored = load_compressed(ImageClassifier(ResNet9(1, 10, width=8)), saver.last_model_path)
    assert restored.net.layer1[1].output_quantizer is restored.net.layer1[2].res1[0].input_quantizer
    assert torch.equal(restored(x), module.eval()(x)), "the checkpoint holds the Adds' steps and where they act"


def test_a_state_from_before_the_adds_steps_loads_and_they_start_on_the_next_batch():
    config = QuantizationConfig(int8_activations=True)
    before = ResNet9(1, 10, width=4)
    attach_quantizers(before, config)
    before.train()(torch.rand(4, 1, 28, 28))
    after = ResNet9(1, 10, width=4)
    attach_quantizers(after, config)
    old = {k: v for k, v in before.state_dict().items() if ".output_quantizer." not in k}  # as written before them
    after.load_state_dict(old)  # strict
    skip, branch = after.layer1[1].output_quantizer, after.layer1[2].res2[2].output_quantizer
    assert skip.initialized and skip.scale == before.layer1[2].res1[0].input_quantizer.scale, "its reader's, loaded"
    assert not branch.initialized
    after.train()(torch.rand(4, 1, 28, 28))
    assert branch.initialized


def hooked_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if any(isinstance(h, OutputStep) for h in
            [*m._forward_hooks.values(), *m._forward_pre_hooks.values()])]  # fmt: skip


def test_torchvision_resnet_steps_every_add_that_feeds_a_stepped_layer(tmp_path):
    """torchvision's blocks apply one ReLU module twice, so a block's skip (the previous block's second ReLU call) has
    no module of its own to hook: it is stepped where it enters the block (a pre-hook on the block, with the step of
    the block's first convolution). Every Add trains and exports both inputs' steps, for TensorRT; the last one's sum
    reaches the classifier through an average pool, so it stays float, and its inputs' steps end the convolutions
    before it in integer kernels."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    attach_quantizers(model, QuantizationConfig(int8_activations=True))
    assert attach_residual_steps(model) == [], "once only"
    assert hooked_modules(model) == ["maxpool", "layer1.0.bn2", "layer1.1", "layer1.1.bn2", "layer2.0.bn2",
                                     "layer2.0.downsample.1", "layer2.1", "layer2.1.bn2", "layer3.0.bn2",
                                     "layer3.0.downsample.1", "layer3.1", "layer3.1.bn2", "layer4.0.bn2",
                                     "layer4.0.downsample.1", "layer4.1", "layer4.1.bn2"]  # fmt: skip
    (hook,) = model.layer2[1]._forward_pre_hooks.values()
    assert hook.quantizer is model.layer2[1].conv1.input_quantizer, "the skip shares its reader's step"
    assert model.layer2[0].downsample[0].input_quantizer is model.layer2[0].conv1.input_quantizer, "one step a tensor"
    sgd_steps(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    result = export_onnx(model.eval(), x, tmp_path / "r18.onnx", runtime="tensorrt")
    assert result.parity.max_rel <= 5e-2, result.parity  # and TensorRT's rules held, else the export raised
    assert result.parity.codes_changed <= 0.02, result.parity
    assert adds_reading_steps(tmp_path / "r18.onnx") == [True] * 8
    # in ONNX Runtime's layout every Add but the last runs in int8, and every convolution but the image's
    export_onnx(model, x, tmp_path / "r18_ort.onnx", runtime="onnxruntime")
    graph = optimized_graph(tmp_path / "r18_ort.onnx", tmp_path)
    assert collections.Counter(n.op_type for n in graph.node)["QLinearAdd"] == 7
    # the stem's pool reads the float convolution, not a QuantizeLinear ONNX Runtime moved before it (a uint8 pool)
    (pool,) = [n for n in graph.node if n.op_type == "MaxPool"]
    assert producers_of(graph)[pool.input[0]].op_type != "QuantizeLinear"
    kernels = ort_kernels(tmp_path / "r18_ort.onnx")
    assert [layer for layer, kernel in kernels.items() if kernel != "QLinearConv"] == ["/conv1/Conv", "/fc/Gemm"]


class FunctionalBlock(torch.nn.Module):
    """The block as people write it: functional ReLUs, the skip the block's own input, the branch through stochastic
    depth (EfficientNet's and ConvNeXt's: a module whose output a function makes)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.BatchNorm2d(channels)
        self.drop = torchvision.ops.StochasticDepth(0.2, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.bn2(self.conv2(torch.nn.functional.relu(self.bn1(self.conv1(x))))))
        return torch.nn.functional.relu(out + x)


class FunctionalNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(FunctionalBlock(8), FunctionalBlock(8))
        self.shared = FunctionalBlock(8)  # applied twice: nothing in it runs once per forward
        self.head = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.blocks(torch.nn.functional.relu(self.stem(x)))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.relu(self.head(x)), 1).flatten(1))


def test_tensors_made_by_functions_are_stepped_at_the_boundary_of_a_block_called_once(tmp_path):
    torch.manual_seed(0)
    model = FunctionalNet()
    attach_quantizers(model, QuantizationConfig(int8_activations=True))
    # the first block's skip is a function's at the top: it is stepped where it enters the Sequential around both
    # blocks (which reads that ReLU alone from outside); the second's leaves the first block (its output); each
    # branch ends in its stochastic depth; the shared block's Adds stay float (its int8 export crashed: one weight,
    # two layer nodes)
    assert hooked_modules(model) == ["blocks", "blocks.0", "blocks.0.drop", "blocks.1.drop"]
    sgd_steps(model, (1, 12, 12))
    x = torch.randn(2, 1, 12, 12)
    result = export_onnx(model.eval(), x, tmp_path / "net.onnx", runtime="tensorrt")
    assert result.parity.max_rel <= 5e-2 and result.parity.codes_changed <= 0.02, result.parity
    assert adds_reading_steps(tmp_path / "net.onnx") == [True, True, False, False]
    again = FunctionalNet()
    attach_quantizers(again, QuantizationConfig(int8_activations=True))
    again.load_state_dict(model.state_dict())  # strict: the blocks' steps are their first layers'
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)
