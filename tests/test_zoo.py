"""Channel surgery on every classifier of `torchvision.models` (issue 13), one test each: 30% of the removable channel
groups and 30% of each residual branch's channels (from that branch alone) killed and cut. The outputs stay within
1e-5 (relative) in train and in eval mode, the history replays bit for bit on a fresh copy, and the cut model's ONNX
file is within 1e-4 of it in ONNX Runtime, or torch.onnx refuses the uncut model as well. `bench/zoo.py` runs the
same survey over the whole list and writes docs/pages/zoo.md."""

from __future__ import annotations

import os

import pytest
import torchvision

from lightning_selfcompress.testing import survey_torchvision

MODELS = torchvision.models.list_models(module=torchvision.models)
# The 17 models past 100 M parameters (VGG, Wide-ResNet-101, EfficientNet-v2-L, RegNet-X/Y-32GF, RegNet-Y-128GF,
# ConvNeXt-L, ViT-L, ViT-H): together about 10 minutes on 2 cores, which would take CI past its 30. Their families
# run here through smaller members (vgg11_bn also in test_export and test_permute).
HUGE = {
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet101_2",
    "efficientnet_v2_l", "regnet_x_32gf", "regnet_y_32gf", "regnet_y_128gf", "convnext_large", "vit_l_16", "vit_l_32",
    "vit_h_14",
}  # fmt: skip
# `-m "not slow"` keeps one quick member of most families; the rest of the list is marked slow (CI runs it)
QUICK = {
    "resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "efficientnet_b0", "convnext_tiny",
    "swin_t", "densenet121", "regnet_x_400mf", "mnasnet0_5", "googlenet",
}  # fmt: skip
RUN_HUGE = bool(os.environ.get("LSC_ZOO_HUGE"))


def marks(name: str) -> list:
    if name in HUGE:
        reason = "past 100 M parameters: LSC_ZOO_HUGE=1 runs it (about 10 minutes for all 17), as bench/zoo.py does"
        return [pytest.mark.slow, pytest.mark.skipif(not RUN_HUGE, reason=reason)]
    return [] if name in QUICK else [pytest.mark.slow]


def test_the_list_is_torchvisions_whole_classification_list():
    assert len(MODELS) >= 80
    assert {"resnet50", "convnext_tiny", "shufflenet_v2_x1_0", "swin_t", "vit_b_16"} <= set(MODELS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks(n)) for n in MODELS])
def test_surgery_is_exact_replays_and_exports_on_every_torchvision_classifier(name):
    row = survey_torchvision(name)
    assert row.status == "exact", f"{row.status}: {row.detail} | export: {row.export}"
    assert row.groups_removed > 0, "something was cut"
    assert row.export.startswith(("parity", "not exportable before the cut either")), row.export
