"""Channel surgery on every classifier of `torchvision.models` (issue 13), one test each: 30% of the removable channel
groups and 30% of each residual branch's channels (from that branch alone) killed and cut, in float64. The outputs
stay within 1e-5 (relative) in train and in eval mode, the history replays bit for bit on a fresh copy, and the cut
model's ONNX file (float32) is within 1e-4 of it in ONNX Runtime, or torch.onnx refuses the uncut model as well.
`bench/zoo.py` runs the same survey and writes docs/pages/zoo.md."""

from __future__ import annotations

import pytest
import torchvision

from lightning_selfcompress.testing import survey_torchvision

MODELS = torchvision.models.list_models(module=torchvision.models)
# past 100 M parameters (float64: 0.8 GB and more per copy), and the slowest of the rest by measured duration
SLOW = {
    "convnext_large", "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "vit_h_14", "vit_l_16", "vit_l_32",
    "efficientnet_v2_l", "wide_resnet101_2", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "maxvit_t",
}  # fmt: skip


def test_the_list_is_torchvisions_whole_classification_list():
    assert len(MODELS) >= 80
    assert {"resnet50", "convnext_tiny", "shufflenet_v2_x1_0", "swin_t", "vit_b_16"} <= set(MODELS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_surgery_is_exact_replays_and_exports_on_every_torchvision_classifier(name):
    row = survey_torchvision(name)
    assert row.status == "exact", f"{row.status}: {row.detail} | export: {row.export}"
    assert row.groups_removed > 0, "something was cut"
    assert row.export.startswith(("parity", "not exportable before the cut either")), row.export
