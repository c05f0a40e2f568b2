"""ResNet-18/34/50/101 and VGG-16-BN from torchvision, in their CIFAR form for small images.

The CIFAR form (used up to `SMALL_MAX` pixels, e.g. 32x32 CIFAR or 64x64 Tiny-ImageNet) replaces
the 7x7 stride-2 stem and max-pool of the ImageNet ResNet with one 3x3 stride-1 conv, so a 32x32
image still has 4x4 features in the last stage (the layout of the authors' `models/resnet.py`).
The CIFAR VGG drops the 7x7 adaptive pool and the 4096-wide classifier: after five max-pools a
32x32 image is a 512-vector, classified by one linear layer. Larger images get the unmodified
torchvision networks (the finetuning form, e.g. 224x224).
"""
from torch import nn
from torchvision import models as tvm

SMALL_MAX = 64


def resnet(depth):
    ctor = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101}[depth]

    def build(num_classes, img_size, **_):
        net = ctor(weights=None, num_classes=num_classes)
        if img_size <= SMALL_MAX:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
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
