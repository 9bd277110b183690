"""Network architectures: CIFAR-style ResNets, WideResNet, a tiny CNN, and torchvision/timm models.

Every model maps images (N, C, H, W) to logits (N, num_classes), and the logits are the output of
the model's last ``nn.Linear`` (named ``fc`` for the built-in models), so :func:`classifier`
can find the class weight matrix W.

Weights are initialised from the global torch RNG: call ``torch.manual_seed(s)`` before
:func:`build_model` to get the same weights every time.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = (
    "cifar_resnet18",
    "cifar_resnet34",
    "cifar_resnet20",
    "preact_resnet18",
    "wrn16_8",
    "small_cnn",
    "tiny_cnn",
)

# torchvision models that return auxiliary outputs in training mode unless told not to.
_NO_AUX = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _dropout(p: float) -> nn.Module:
    """Dropout on the pooled features before the classifier (none at p = 0): a module without
    parameters, so a model's state dict is the same with and without it."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation ResNet block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016): BN-ReLU-conv-BN-ReLU-(dropout)-conv, plus shortcut.

    A projection shortcut (1x1 conv) takes the pre-activated input, as in the paper.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + skip


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem (3x3 conv, stride 1, no max-pool) and global average pooling.

    ``preact=True`` builds the pre-activation variant, which ends with BN-ReLU before pooling.
    ``widths`` holds the stem width followed by one width per stage (stage strides 1, 2, 2, ...).
    """

    def __init__(
        self,
        blocks: list[int],
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 64, 128, 256, 512),
        preact: bool = False,
        block_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for i, (n, out_ch) in enumerate(zip(blocks, widths[1:], strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                if preact:
                    layers.append(PreActBlock(in_ch, out_ch, stride, block_dropout))
                else:
                    layers.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.final_bn: nn.Module = nn.BatchNorm2d(in_ch) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = _dropout(dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        self.preact = preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        if not self.preact:
            out = torch.relu(out)
        out = self.layers(out)
        if self.preact:
            out = torch.relu(self.final_bn(out))
        return self.fc(self.drop(torch.flatten(self.pool(out), 1)))


class SmallCNN(nn.Module):
    """Three 3x3 conv layers with GroupNorm (no BatchNorm: results do not depend on world size).

    A 2x2 max-pool after the second conv and a 2x2 adaptive average pool before ``fc`` make it
    work on any input of at least 2x2 pixels (e.g. 1x8x8 digits or 3x32x32 CIFAR).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.GroupNorm(8, o), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64)
        )
        self.pool = nn.AdaptiveAvgPool2d(2)  # keep a little spatial layout: 64 x 2 x 2 features
        self.drop = _dropout(dropout)
        self.fc = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(self.features(x)), 1)))


class TinyCNN(nn.Module):
    """A fast 32 px net for CPU studies: a stride-2 3x3 stem, two 3x3 conv layers (a 2x2
    max-pool between them), 16/32/64 channels, BatchNorm, global average pooling. About 2.5 M
    multiply-adds per 32 x 32 image, a tenth of :class:`SmallCNN`'s (which works at full
    resolution)."""

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1) -> list[nn.Module]:
            conv = nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, 16, stride=2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = _dropout(dropout)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(self.features(x)), 1)))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, norm layers weight 1 / bias 0, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _build_builtin(name: str, num_classes: int, in_channels: int, dropout: float) -> nn.Module:
    resnet = {"num_classes": num_classes, "in_channels": in_channels, "dropout": dropout}
    if name == "cifar_resnet18":
        return CifarResNet([2, 2, 2, 2], **resnet)
    if name == "cifar_resnet34":
        return CifarResNet([3, 4, 6, 3], **resnet)
    if name == "cifar_resnet20":  # He et al. (2016)'s CIFAR ResNet-20: 3 x 3 blocks, 16/32/64
        return CifarResNet([3, 3, 3], widths=(16, 16, 32, 64), **resnet)
    if name == "preact_resnet18":
        return CifarResNet([2, 2, 2, 2], preact=True, **resnet)
    if name == "wrn16_8":  # depth 16 -> (16 - 4) / 6 = 2 blocks per stage, widths 16k/32k/64k
        k = 8
        return CifarResNet([2, 2, 2], widths=(16, 16 * k, 32 * k, 64 * k), preact=True, **resnet)
    if name == "tiny_cnn":
        return TinyCNN(num_classes, in_channels, dropout)
    return SmallCNN(num_classes, in_channels, dropout)


def build_model(
    name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.0
) -> nn.Module:
    """Build a freshly initialised model (never downloads weights) that returns logits.

    ``name`` is one of :data:`MODEL_NAMES`, a torchvision classification model name (3-channel
    input only), or, when ``timm`` is installed, a timm model name. Seed with
    ``torch.manual_seed`` beforehand for reproducible weights. ``dropout`` (built-in models
    only; torchvision's and timm's carry their own) drops the pooled features before ``fc``
    with that probability in training mode.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if name in MODEL_NAMES:
        model = _build_builtin(name, num_classes, in_channels, dropout)
        _init_weights(model)
        return model
    if dropout:
        raise ValueError(
            f"dropout applies to the built-in models ({', '.join(MODEL_NAMES)}); "
            f"{name!r} carries its own"
        )
    import torchvision  # only for its own models: it costs a fresh process ~2 s to import

    if name in torchvision.models.list_models(module=torchvision.models):
        if in_channels != 3:
            raise ValueError(
                f"torchvision model {name!r} takes 3-channel input, got in_channels={in_channels}"
            )
        kwargs = _NO_AUX.get(name, {})
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} "
        "or a torchvision/timm model name"
    )


def check_input(
    model: nn.Module, name: str, channels: int, size: int, bn_batch: int | None = None
) -> None:
    """Raise ValueError (naming ``model.name``) where ``model`` cannot take ``size`` x ``size``
    images (more downsampling than the image has pixels, e.g. AlexNet at 32 px), or where a
    BatchNorm layer would have one value per channel to normalise in training: ``bn_batch``
    images (the per-device batch, or the ghost group) of one value per channel each, as at the
    end of a network on small images. One forward of a blank image in eval mode and without
    gradients, so that nothing in the model changes and the run stops at start, not in its
    first step."""
    positions: list[int] = []  # a BatchNorm layer's values per channel in one image
    hooks = [
        m.register_forward_pre_hook(lambda _, args: positions.append(args[0][0, 0].numel()))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError, AssertionError) as e:  # timm's fixed sizes: assertions
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"model.name={name} cannot take the data's {size}x{size} images ({why})"
        ) from None
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if bn_batch is not None and positions and bn_batch * min(positions) == 1:
        raise ValueError(
            f"model.name={name}: a BatchNorm layer would normalise {bn_batch} image of one "
            f"value per channel (the data's {size}x{size} images, downsampled), so nothing: "
            "it needs at least 2 images per device, or per model.bn_group"
        )


def classifier(model: nn.Module) -> nn.Linear:
    """Return the final linear layer (the class weights W) of a model from :func:`build_model`."""
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc
    get_classifier = getattr(model, "get_classifier", None)  # timm models
    if callable(get_classifier) and isinstance(head := get_classifier(), nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as classifier")
    return linears[-1]
