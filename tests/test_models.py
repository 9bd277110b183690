"""Tests for dist_icm.models: shapes, sizes, seeding, lookup errors, and that small_cnn learns."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_icm.models import MODEL_NAMES, build_model, classifier
from dist_icm.norm import convert_ghost_bn

# Parameter counts for num_classes=10 (published: ResNet-18 11.2M, ResNet-34 21.3M, WRN-16-8 11.0M).
EXPECTED_PARAMS = {
    "cifar_resnet18": 11.2e6,
    "cifar_resnet34": 21.3e6,
    "cifar_resnet20": 0.27e6,
    "preact_resnet18": 11.2e6,
    "wrn16_8": 11.0e6,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_cifar(name: str) -> None:
    model = build_model(name, num_classes=7)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_small_cnn_digits_shape() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert n_params(model) < 100_000


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_param_counts(name: str) -> None:
    count = n_params(build_model(name, num_classes=10))
    assert abs(count - EXPECTED_PARAMS[name]) / EXPECTED_PARAMS[name] < 0.05, count


def test_small_cnn_has_no_batchnorm() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reproducible_under_seed(name: str) -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(build_model(name, num_classes=5).state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    torch.manual_seed(124)
    other = build_model(name, num_classes=5).state_dict()
    assert not torch.equal(other["fc.weight"], states[0]["fc.weight"])


def test_torchvision_resnet50() -> None:
    model = build_model("resnet50", num_classes=10)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert classifier(model) is model.fc


def test_torchvision_non_resnet_classifier() -> None:
    model = build_model("mobilenet_v3_small", num_classes=4)
    head = classifier(model)
    assert head.out_features == 4
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_torchvision_rejects_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="in_channels=1"):
        build_model("resnet18", num_classes=10, in_channels=1)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'foo'") as info:
        build_model("foo", num_classes=10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(("num_classes", "in_channels"), [(1, 3), (0, 3), (10, 0)])
def test_bad_sizes(num_classes: int, in_channels: int) -> None:
    with pytest.raises(ValueError, match="must be >= "):
        build_model("small_cnn", num_classes=num_classes, in_channels=in_channels)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_classifier_is_last_linear(name: str) -> None:
    model = build_model(name, num_classes=6)
    head = classifier(model)
    assert head is model.fc
    assert head.out_features == 6
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is head


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dropout_drops_the_features_before_the_classifier(name: str) -> None:
    torch.manual_seed(0)
    plain = build_model(name, num_classes=5)
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, dropout=0.5)
    assert model.state_dict().keys() == plain.state_dict().keys()  # one checkpoint format
    seen = []
    model.fc.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    plain.fc.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(4, 3, 32, 32)
    for mode in ("eval", "train"):  # training mode: BatchNorm uses the batch's statistics
        for m in (model, plain):
            getattr(m, mode)()
            with torch.no_grad():
                m(x)
    assert torch.equal(seen[0], seen[1])  # evaluation: no dropout
    dropped, features = seen[2], seen[3]
    kept = dropped != 0
    assert 0.3 < kept.float().mean() < 0.7  # about half of the features dropped ...
    assert torch.allclose(dropped[kept], 2 * features[kept], rtol=1e-4, atol=1e-6)  # ... rest x2


def test_dropout_out_of_range_or_on_a_library_model() -> None:
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got 1"):
        build_model("small_cnn", num_classes=10, dropout=1)
    with pytest.raises(ValueError, match="dropout applies to the built-in models"):
        build_model("resnet18", num_classes=10, dropout=0.1)


def test_classifier_without_linear_raises() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        classifier(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_small_cnn_learns_digits() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)

    # One intra-op thread: with 2 threads on 2 busy cores this tiny loop ran 20-30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build_model("small_cnn", num_classes=10, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(8):
            perm = torch.randperm(len(x_tr))
            for i in range(0, len(x_tr), 64):
                idx = perm[i : i + 64]
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    print(f"small_cnn digits: test accuracy {acc:.3f}, training {elapsed:.1f} s")
    assert acc > 0.9, acc


def test_a_model_that_cannot_take_the_images_is_refused_at_start(cifar10_jpeg_root):
    # AlexNet's five downsamplings leave nothing of a 32 px image: said at start, naming the
    # model, instead of a traceback from the first training step
    from cli import setup_job

    from dist_icm.config import ConfigError
    from dist_icm.models import check_input

    alexnet = build_model("alexnet", 10, 3)
    with pytest.raises(ValueError, match=r"model.name=alexnet cannot take the data's 32x32 "
                       r"images \(Given input size"):  # fmt: skip
        check_input(alexnet, "alexnet", 3, 32)
    resnet = build_model("cifar_resnet18", 10, 3).train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    check_input(resnet, "cifar_resnet18", 3, 32)  # fits: nothing changes, not even BN's stats
    after = resnet.state_dict()
    assert resnet.training and all(torch.equal(before[k], v) for k, v in after.items())
    with pytest.raises(ConfigError, match="model.name=alexnet cannot take the data's 32x32"):
        setup_job(["experiment=quickstart", "data=imagefolder", f"data.root={cifar10_jpeg_root}",
                   "data.num_workers=0", "data.global_batch=8", "loss.group_size=null",
                   "data.fraction=0.01", "model.name=alexnet"])  # fmt: skip


@pytest.mark.parametrize("ghost", [False, True], ids=["batchnorm", "ghost batchnorm"])
def test_a_batchnorm_with_one_value_per_channel_stops_at_start(ghost):
    # ResNet-18 on 8x8 digits ends in 1x1 maps: a per-device batch (or bn_group) of 1 gave the
    # last BatchNorm layers one value per channel, and a traceback in the first training step
    from cli import setup_job

    from dist_icm.config import ConfigError
    from dist_icm.models import check_input

    resnet = build_model("cifar_resnet18", 10, 1)
    resnet = convert_ghost_bn(resnet, 1) if ghost else resnet
    line = r"a BatchNorm layer would normalise 1 image of one value per channel \(the data's 8x8"
    with pytest.raises(ValueError, match=line):
        check_input(resnet, "cifar_resnet18", 1, 8, bn_batch=1)
    with pytest.raises((ValueError, RuntimeError)):  # what the first step met (the control)
        resnet.train()(torch.zeros(1, 1, 8, 8))
    check_input(resnet, "cifar_resnet18", 1, 8, bn_batch=2)  # two images: statistics to take
    check_input(resnet, "cifar_resnet18", 1, 32, bn_batch=1)  # 32x32: 4x4 values at the end
    setting = "model.bn_group=1" if ghost else "data.global_batch=1,loss.group_size=null"
    with pytest.raises(ConfigError, match=line):
        setup_job(["experiment=quickstart", "model=cifar_resnet18", *setting.split(","), "loss=ce"])
