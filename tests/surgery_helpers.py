"""Shared by the surgery and permutation tests: a small model with every coupling kind, and the zoo of real
architectures that channel surgery and permutation must preserve the function of."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from lightning_selfcompress.models import BaselineCNN, ResNet9
from lightning_selfcompress.testing import randomize_zero_weights



class SmallNet(nn.Module):
    """Conv-BN-ReLU stem, a residual branch (coupled producers), a conv with a bias, pooling and a flatten into a
    Linear. (No bias right before a BatchNorm: its gradient is round-off noise there, which Adam would amplify.)"""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.branch = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.mid = nn.Conv2d(width, 2 * width, 1)
        self.head = nn.Linear(2 * width * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.branch(x)
        x = F.relu(self.mid(x))
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


def freeze_statistics(net: nn.Module) -> None:
    """Train-mode forwards stop updating running statistics, so that eval-mode outputs before and after a surgery
    are those of the same network."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0


ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 32, 32)),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (3, 32, 32)),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 32, 32)),
    "resnet9": (lambda: ResNet9(3, 10, width=16), (3, 32, 32)),
    "baseline_cnn": (lambda: BaselineCNN(1, 10), (1, 28, 28)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 32, 32)),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)),
    # transformers at toy sizes, the same code: attention stays whole (Rule.OPAQUE), the MLP hidden units are cut
    "vit": (lambda: VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
            (3, 32, 32)),
    "swin": (lambda: SwinTransformer([4, 4], 16, [1, 1], [2, 2], [2, 2], stochastic_depth_prob=0.0, num_classes=10),
             (3, 32, 32)),
    "maxvit": (lambda: MaxVit((32, 32), 8, 2, [16, 32], [1, 1], head_dim=8, stochastic_depth_prob=0.0,
                              num_classes=10), (3, 32, 32)),
}  # fmt: skip
TRANSFORMERS = {"vit", "swin", "maxvit"}
LARGE = {"resnet50", "resnext50_32x4d", "densenet121", "vgg11_bn", "efficientnet_b0"}


def zoo_model(name: str, batch: int = 4) -> tuple[nn.Module, Tensor]:
    """A zoo model in float64 with running statistics that are not the initial ones (frozen from then on) and
    dropout off, and an input batch."""
    make, shape = ZOO[name]
    net = make().double()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    randomize_zero_weights(net)
    with torch.no_grad():
        net.train()(x)
    freeze_statistics(net)
    for m in net.modules():
        if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth)):
            m.p = 0.0  # masks are drawn per element or sample: two forwards would not see the same one
    return net, x
