"""ResNet-18/34/50/101 and VGG-16-BN from torchvision, in their CIFAR form for small images.

The CIFAR form (used up to `SMALL_MAX` pixels, e.g. 32x32 CIFAR or 64x64 Tiny-ImageNet) replaces
the 7x7 stride-2 stem and max-pool of the ImageNet ResNet with one 3x3 stride-1 conv, so a 32x32
image still has 4x4 features in the last stage (the layout of the authors' `models/resnet.py`).
`dim` (train.py's --dimhead) narrows a ResNet: stage widths dim x (1, 2, 4, 8) instead of 64 x (1, 2, 4, 8).
The CIFAR VGG drops the 7x7 adaptive pool and the 4096-wide classifier: after five max-pools a
32x32 image is a 512-vector, classified by one linear layer. Larger images get the unmodified
torchvision networks (the finetuning form, e.g. 224x224).
"""
from torch import nn
from torchvision import models as tvm

SMALL_MAX = 64


RESNET_LAYOUTS = {18: (tvm.resnet.BasicBlock, [2, 2, 2, 2]), 34: (tvm.resnet.BasicBlock, [3, 4, 6, 3]),
                  50: (tvm.resnet.Bottleneck, [3, 4, 6, 3]), 101: (tvm.resnet.Bottleneck, [3, 4, 23, 3])}


class WidthResNet(tvm.ResNet):
    """torchvision's ResNet with stage widths `width` x (1, 2, 4, 8) instead of 64 x (1, 2, 4, 8)."""

    def __init__(self, depth, num_classes, width):
        self.width = width
        block, layers = RESNET_LAYOUTS[depth]
        super().__init__(block, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage reads the stem's `width` channels
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def resnet(depth):
    ctor = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101}[depth]

    def build(num_classes, img_size, dim=None, **_):
        """`dim`: the width of the first stage (None: torchvision's network, 64)."""
        net = ctor(weights=None, num_classes=num_classes) if dim is None else WidthResNet(depth, num_classes, dim)
        if img_size <= SMALL_MAX:
            net.conv1 = nn.Conv2d(3, dim or 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        return net

    return build


def vgg16_bn(num_classes, img_size, **_):
    net = tvm.vgg16_bn(weights=None, num_classes=num_classes)
    if img_size <= SMALL_MAX:
        # Five 2x2 max-pools take 32x32 to 1x1; pool whatever is left so 64x64 works too.
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Linear(512, num_classes)
    return net
