"""PyTorch models with arcface_torch's architecture and state-dict keys, for the convert tests.

IResNet (iresnet18/34/50/100) and MobileFaceNet (`mbf`, scale 2) as insightface's
recognition/arcface_torch/backbones define them: the same modules under the same attribute names,
so `state_dict()` has the keys a released `backbone.pth` has. `randomize` gives every parameter and
every BatchNorm running statistic random values from a seed, so a conversion that drops or
misplaces one changes the embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
          "iresnet100": (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3 (stride) - BN, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """[n, 3, 112, 112] -> [n, num_features]."""

    def __init__(self, layers, num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stage = [IBasicBlock(inplanes, planes, 2)]
            stage += [IBasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c))

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 to `groups` channels, 3x3 depthwise (stride), 1x1 linear to out_c (+ input)."""

    def __init__(self, in_c, out_c, residual=False, stride=2, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups),
                                    ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    LinearBlock(groups, out_c))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, 1, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(LinearBlock(512, 512, 7, 1, 0, groups=512), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False),
                                    nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch's `mbf`: blocks (1, 4, 6, 2), scale 2; [n, 3, 112, 112] -> [n, 512]."""

    def __init__(self, num_features: int = 512, blocks=(1, 4, 6, 2), scale: int = 2):
        super().__init__()
        c = 64 * scale
        self.layers = nn.ModuleList([
            ConvBlock(3, c, 3, 2, 1),
            ConvBlock(c, c, 3, 1, 1, groups=64),
            DepthWise(c, c, stride=2, groups=128),
            Residual(c, blocks[1], groups=128),
            DepthWise(c, 2 * c, stride=2, groups=256),
            Residual(2 * c, blocks[2], groups=256),
            DepthWise(2 * c, 2 * c, stride=2, groups=512),
            Residual(2 * c, blocks[3], groups=256)])
        self.conv_sep = ConvBlock(2 * c, 512)
        self.features = GDC(num_features)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def get_model(name: str) -> nn.Module:
    """arcface_torch's backbone `name` ("iresnet18" ... "iresnet100", "mobilefacenet")."""
    if name == "mobilefacenet":
        return MobileFaceNet()
    return IResNet(BLOCKS[name])


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic drawn from `seed`, at scales that keep activations
    of order one through the depth (weights ~ N(0, 1/fan_in), BN scales near 1, variances > 0);
    returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.rand(t.shape, generator=gen)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                    / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(rand(module.bias) * 0.2 - 0.1)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.copy_(0.5 + rand(module.weight))
                module.bias.copy_(rand(module.bias) * 0.2 - 0.1)
                module.running_mean.copy_(rand(module.running_mean) * 0.2 - 0.1)
                module.running_var.copy_(0.5 + rand(module.running_var))
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(rand(module.weight) * 0.5)
    return model.eval()
