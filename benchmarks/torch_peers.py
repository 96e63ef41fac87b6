"""The PyTorch peers of benchmarks/train_step.py: each backbone written as an nn.Module with the
same layers, widths, strides, norms, embedding head and classifier as jfacerec's, its optimizer,
and its train step. Imported only when the torch side runs, so that the JAX side needs no torch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jfacerec.losses.objectives import Objective
from jfacerec.models import layers, scaled_widths


def torch_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """jfacerec.models.layers.Norm for NCHW tensors (flax momentum 0.9 = torch momentum 0.1)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    n = {"group": layers._divisor_at_most(channels, groups), "layer": 1,
         "instance": channels}[kind]
    return nn.GroupNorm(n, channels, eps=1e-5)


def embedding_norm(kind: str, dim: int) -> nn.Module:
    """jfacerec.models.heads.embedding_norm: BatchNorm1d for "batch", else LayerNorm."""
    return nn.BatchNorm1d(dim, eps=1e-5, momentum=0.1) if kind == "batch" else nn.LayerNorm(dim)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free k x k conv padded by k // 2 (flax "SAME" at stride 1; at stride 2 flax pads
    (0, 1) and torch (1, 1): the same output size and work, shifted by a pixel)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """jfacerec.models.resnet.BasicBlock: conv3x3-norm-relu-conv3x3-norm + shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1, self.norm1 = conv(cin, cout, 3, stride), norm(cout)
        self.conv2, self.norm2 = conv(cout, cout, 3), norm(cout)
        self.proj = (None if cin == cout and stride == 1 else
                     nn.Sequential(conv(cin, cout, 1, stride), norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class ResNetTiny(nn.Module):
    """jfacerec's `resnet_tiny`: a stride-2 3x3 stem, four one-block stages, the pool (mean, or
    flatten in jfacerec's [H, W, C] order), dropout, a linear embedding and its norm ("": none;
    EmbeddingHead) and a linear classifier. [batch, 3, size, size] -> [batch, classes]."""

    def __init__(self, widths: list[int], embedding_dim: int, classes: int, norm_kind: str,
                 groups: int, pool: str = "mean", image_size: int = 0, dropout: float = 0.0,
                 features: str = ""):
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        # the stem and three stages halve the side: 48 px -> 3 x 3 positions
        positions = (-(-image_size // 16)) ** 2 if pool == "flatten" else 1
        norm = lambda c: torch_norm(norm_kind, c, groups)  # noqa: E731
        self.stem, self.stem_norm = conv(3, widths[0], 3, 2), norm(widths[0])
        cins = [widths[0], *widths[:-1]]
        self.blocks = nn.Sequential(*[BasicBlock(cin, w, 1 if i == 0 else 2, norm)
                                      for i, (cin, w) in enumerate(zip(cins, widths))])
        self.proj = nn.Linear(widths[-1] * positions, embedding_dim)
        self.features = embedding_norm(features, embedding_dim) if features else nn.Identity()
        self.classifier = nn.Linear(embedding_dim, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] -> embeddings [batch, embedding_dim]."""
        x = self.blocks(F.relu(self.stem_norm(self.stem(x))))
        pooled = x.permute(0, 2, 3, 1).flatten(1) if self.pool == "flatten" else x.mean((2, 3))
        return self.features(self.proj(self.dropout(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class IBasicBlock(nn.Module):
    """jfacerec.models.iresnet.IBasicBlock: norm-conv3x3-norm-PReLU-conv3x3(stride)-norm +
    (projected) shortcut, no activation after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.bn1, self.conv1, self.bn2 = norm(cin), conv(cin, cout, 3), norm(cout)
        self.prelu = nn.PReLU(cout, 0.25)
        self.conv2, self.bn3 = conv(cout, cout, 3, stride), norm(cout)
        self.downsample = (None if cin == cout and stride == 1 else
                           nn.Sequential(conv(cin, cout, 1, stride), norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.bn1(x))
        y = self.bn3(self.conv2(self.prelu(self.bn2(y))))
        return (x if self.downsample is None else self.downsample(x)) + y


class IResNet(nn.Module):
    """jfacerec's iresnet: 3x3 stem, stages whose first block has stride 2, norm, flatten, fc,
    embedding norm, linear classifier. [batch, 3, 112, 112] -> [batch, classes]."""

    def __init__(self, stage_sizes: list[int], widths: list[int], embedding_dim: int,
                 classes: int, image_size: int, norm_kind: str, groups: int):
        super().__init__()
        norm = lambda c: torch_norm(norm_kind, c, groups)  # noqa: E731
        self.conv1, self.bn1 = conv(3, widths[0], 3), norm(widths[0])
        self.prelu = nn.PReLU(widths[0], 0.25)
        blocks, cin = [], widths[0]
        for size, width in zip(stage_sizes, widths):
            for j in range(size):
                blocks.append(IBasicBlock(cin, width, 2 if j == 0 else 1, norm))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn2 = norm(cin)
        side = image_size // 2 ** len(widths)
        self.fc = nn.Linear(cin * side * side, embedding_dim)
        self.features = embedding_norm(norm_kind, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] -> embeddings [batch, embedding_dim]."""
        x = self.blocks(self.prelu(self.bn1(self.conv1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNorm(nn.Sequential):
    """jfacerec.models.mobilenet.ConvNorm: (grouped) conv, norm, PReLU unless `act` is False."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int,
                 norm: Callable[[int], nn.Module], act: bool = True):
        layers = [conv(cin, cout, kernel, stride, groups), norm(cout)]
        super().__init__(*layers, *([nn.PReLU(cout, 0.25)] if act else []))


class DepthWise(nn.Module):
    """jfacerec.models.mobilenet.DepthWise: 1x1 expand, 3x3 depthwise, 1x1 linear (+ input)."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int, residual: bool,
                 norm: Callable[[int], nn.Module]):
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(ConvNorm(cin, groups, 1, 1, 1, norm),
                                  ConvNorm(groups, groups, 3, stride, groups, norm),
                                  ConvNorm(groups, cout, 1, 1, 1, norm, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    """jfacerec's mobilefacenet (arcface_torch `mbf`): depthwise blocks, a 7x7 global depthwise
    conv, norm, fc, embedding norm, classifier. [batch, 3, 112, 112] -> [batch, classes]."""

    def __init__(self, blocks: list[int], embedding_dim: int, classes: int, image_size: int,
                 norm_kind: str, groups: int):
        super().__init__()
        norm = lambda c: torch_norm(norm_kind, c, groups)  # noqa: E731
        layers = [ConvNorm(3, 128, 3, 2, 1, norm), ConvNorm(128, 128, 3, 1, 64, norm)]
        cin = 128
        for out, n, expand, down in [(128, blocks[1], 128, 128), (256, blocks[2], 256, 256),
                                     (256, blocks[3], 256, 512)]:
            layers.append(DepthWise(cin, out, down, 2, False, norm))
            layers += [DepthWise(out, out, expand, 1, True, norm) for _ in range(n)]
            cin = out
        layers.append(ConvNorm(cin, 512, 1, 1, 1, norm))
        side = image_size // 16
        layers += [nn.Conv2d(512, 512, side, groups=512, bias=False), norm(512)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(512, embedding_dim, bias=False)
        self.features = embedding_norm(norm_kind, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] -> embeddings [batch, embedding_dim]."""
        return self.features(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """flax's lecun_normal on a torch [out, in] weight: a normal truncated at 2 std, rescaled
    to variance 1 / in."""
    std = 1.0 / math.sqrt(weight.shape[1]) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def init_as_jfacerec(model: nn.Module) -> nn.Module:
    """Starts a peer where jfacerec's backbone starts, not at torch's defaults: He-normal
    fan-out convs (models.layers.conv_kernel_init), lecun-normal linear weights with zero biases
    (flax's Dense), unit norm scales except the zero last scale of each BasicBlock
    (models.resnet). torch's default convs (variance 1 / (3 fan_in)) are 6x smaller in
    variance for a 3x3 conv, which under BatchNorm makes each SGD step 6x larger in effect: a
    different training, not a different framework."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            lecun_normal_(m.weight.data)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.norm2.weight)
    return model


class CosineClassifier(nn.Module):
    """jfacerec.models.heads.CosineClassifier before its scale: cos(theta) [batch, classes]
    between the embeddings [batch, dim] and the class weights [classes, dim], both normalised; no
    bias. The weights start as jfacerec's (lecun normal, rows of about unit norm): the step on a
    normalised weight scales with 1 / |w|, so torch's default Linear start (|w| about 0.58) would
    train the head faster than jfacerec's."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(lecun_normal_(torch.empty(classes, dim)))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T


def torch_model(config, classes: int) -> nn.Module:
    """The peer of `models.from_config(config, classes)`: its backbone and embedding, and the head
    its loss needs (a linear classifier for softmax, a CosineClassifier for a margin loss),
    initialised as jfacerec's (`init_as_jfacerec`)."""
    m = config.model
    if m.get("dropblock", 0.0):
        raise ValueError("the torch peers are written without DropBlock; set model.dropblock=0")
    if m.name != "resnet_tiny" and (m.dropout or m.width_multiplier != 1.0):
        raise ValueError(f"the torch peer of {m.name!r} is written for width 1 without dropout; "
                         f"set model.width_multiplier=1.0, model.dropout=0")
    if m.name == "resnet_tiny":
        model = ResNetTiny(scaled_widths((24, 48, 96, 192), m.width_multiplier),
                           m.embedding_dim, classes, m.norm, m.norm_groups, m.pool,
                           config.image_size, m.dropout, m.embedding_norm)
    elif m.name == "iresnet18":
        model = IResNet([2, 2, 2, 2], [64, 128, 256, 512], m.embedding_dim, classes,
                        config.image_size, m.norm, m.norm_groups)
    elif m.name == "mobilefacenet":
        model = MobileFaceNet([1, 4, 6, 2], m.embedding_dim, classes, config.image_size, m.norm,
                              m.norm_groups)
    else:
        raise ValueError(f"no torch peer for {m.name!r}")
    init_as_jfacerec(model)
    if Objective.from_config(config).head[0] == "cosine":
        model.classifier = CosineClassifier(m.embedding_dim, classes)
    return model


# jfacerec.losses.functions' clip of cos away from +-1 before arccos (a finite gradient).
_ARCCOS_EPS = 1e-6


def arcface_target(cos_y: torch.Tensor, margin: float) -> torch.Tensor:
    """jfacerec.losses.functions.arcface_target: cos(theta + m) while theta + m <= pi, else
    cos(theta) - m sin(m); differentiated through arccos, as jfacerec does. [batch] -> [batch]."""
    c = cos_y.clamp(-1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS)
    theta = torch.acos(c)
    return torch.where(theta + margin <= math.pi, torch.cos(theta + margin),
                       c - margin * math.sin(margin))


def cosface_target(cos_y: torch.Tensor, margin: float) -> torch.Tensor:
    """jfacerec.losses.functions.cosface_target: cos(theta_y) - m. [batch] -> [batch]."""
    return cos_y - margin


MARGIN_TARGETS = {"arcface": arcface_target, "cosface": cosface_target}
LOSSES = ("softmax", *MARGIN_TARGETS)


def torch_loss(config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(the model's output [batch, classes], labels int64 [batch]) -> the batch's mean loss, as
    jfacerec.losses.objectives computes the config's loss: softmax cross-entropy of the logits,
    or a margin loss on the cosines (the label's cosine replaced by its margin target, all times
    the scale); both with the term's label smoothing (1 - eps on the label, eps / classes
    everywhere: optax.smooth_labels and torch's label_smoothing alike)."""
    terms = Objective.from_config(config).terms
    if len(terms) != 1 or terms[0][0] != 1.0 or terms[0][1] not in LOSSES:
        raise ValueError(f"the torch peer trains one unweighted loss of {', '.join(LOSSES)}; "
                         f"loss.name is {config.loss.name!r}")
    if config.loss.sample_rate != 1.0:
        raise ValueError("the torch peer computes every class's logit; set loss.sample_rate=1.0")
    _, name, options = terms[0]
    smoothing = options["label_smoothing"]
    if name == "softmax":
        return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=smoothing)
    target, scale, margin = MARGIN_TARGETS[name], options["scale"], options["margin"]

    def margin_loss(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = labels[:, None]
        logits = cos.scatter(1, rows, target(cos.gather(1, rows)[:, 0], margin)[:, None])
        return F.cross_entropy(scale * logits, labels, label_smoothing=smoothing)

    return margin_loss


def torch_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """training.make_optimizer's SGD: weight decay added to the gradient of kernels (ndim > 1)
    only, then Nesterov momentum. The learning rate is the schedule's peak: a caller that follows
    the schedule sets each group's "lr" before each step."""
    o = config.optimizer
    if o.name != "sgd" or o.grad_clip_norm or o.backbone_multiplier != 1.0:
        raise ValueError("the torch peer mirrors SGD without gradient clipping or a backbone "
                         "multiplier; set optimizer.name=sgd, grad_clip_norm=0, "
                         "backbone_multiplier=1")
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum, nesterov=o.nesterov)


def torch_step(config, classes: int, channels_last: bool, gpu: bool
               ) -> tuple[Callable[[], None], int]:
    """(run one step and wait for it, parameter count)."""
    torch.manual_seed(0)
    device = "cuda" if gpu else "cpu"
    model = torch_model(config, classes).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch_optimizer(model, config)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    batch, size = config.batch_size, config.image_size
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    labels = torch.randint(0, classes, (batch,), device=device)
    smoothing = config.loss.label_smoothing
    forward = torch.compile(model) if gpu else model

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=gpu):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize()

    return run, params
