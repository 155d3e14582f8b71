"""ResNet-18/50 against torchvision's published parameter counts; stems, shapes,
channels_last; the papers' projection heads."""

import pytest
import torch
from torch import nn

from negbatch.models import HEAD_PRESETS, ProjectionHead, ResNet, build_encoder, resnet18, resnet50
from negbatch.models.resnet import BasicBlock, Bottleneck

# torchvision.models.resnet18/50 with their 1000-class fc: 11,689,512 and 25,557,032 parameters.
TORCHVISION = {"resnet18": (11_689_512, 512), "resnet50": (25_557_032, 2048)}
CIFAR_STEM_SAVES = 3 * 64 * 7 * 7 - 3 * 64 * 3 * 3  # the 7x7 stem conv replaced by a 3x3 one


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_counts_match_torchvision_without_fc(name):
    total, feat = TORCHVISION[name]
    fc = feat * 1000 + 1000
    build = resnet18 if name == "resnet18" else resnet50
    net = build()
    assert net.out_dim == feat
    assert count(net) == total - fc
    if name == "resnet18":  # the stems are shared code: checked once, on the cheaper network
        assert count(build(stem="cifar")) == total - fc - CIFAR_STEM_SAVES
        assert count(build(in_channels=1)) == total - fc - 2 * 64 * 7 * 7


def test_standard_stem_downsamples_by_32_and_cifar_stem_by_8():
    small = (8, 16, 32, 64)
    std = resnet18(widths=small).eval()
    cif = resnet18(stem="cifar", widths=small).eval()
    x = torch.rand(2, 3, 64, 64)
    assert std.stages(std.stem(x)).shape == (2, 64, 2, 2)
    assert cif.stages(cif.stem(torch.rand(2, 3, 32, 32))).shape == (2, 64, 4, 4)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cif.modules())
    assert [m.kernel_size for m in std.stem if isinstance(m, nn.Conv2d)] == [(7, 7)]
    r50 = resnet50(widths=small, stem="cifar")
    assert r50(torch.rand(2, 3, 16, 16)).shape == (2, 256)
    blocks = [type(m) for m in r50.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks == [Bottleneck] * 16
    strides = [m.conv2.stride for m in r50.modules() if isinstance(m, Bottleneck)]
    assert strides.count((2, 2)) == 3  # the stride sits on the 3x3 convolution of each stage's first block


def test_build_encoder_picks_the_stem_by_size_and_allows_override():
    assert build_encoder("resnet18", (3, 32, 32), None).stem_kind == "cifar"
    assert build_encoder("resnet18", (1, 28, 28), (8, 16, 32, 64)).stem_kind == "cifar"
    assert build_encoder("resnet18", (3, 64, 64), (8, 16, 32, 64)).stem_kind == "standard"
    assert build_encoder("resnet50", (3, 96, 96), (8, 16, 32, 64), stem="cifar").stem_kind == "cifar"
    enc = build_encoder("resnet18", (1, 28, 28), (8, 16, 32, 64))
    assert enc(torch.rand(3, 1, 28, 28)).shape == (3, 64)
    with pytest.raises(ValueError, match="4 stage widths"):
        build_encoder("resnet18", (3, 32, 32), (256, 128))
    with pytest.raises(ValueError, match="stem applies to the ResNets only"):
        build_encoder("mlp", (1, 8, 8), (16,), stem="cifar")
    with pytest.raises(ValueError, match="encoder must be one of mlp, conv, resnet18, resnet50"):
        build_encoder("vit", (3, 32, 32), None)
    with pytest.raises(ValueError, match="stem must be 'standard'"):
        resnet18(stem="tiny")
    with pytest.raises(ValueError, match="widths must be 4 positive ints"):
        resnet18(widths=(8, 16, 32))
    assert build_encoder("mlp", (1, 8, 8), None).out_dim == 128  # the MLP's defaults


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_gives_the_same_output(train):
    torch.manual_seed(0)
    net = resnet18(stem="cifar", widths=(8, 16, 32, 64))
    net.train(train)
    x = torch.rand(4, 3, 16, 16)
    ref = net(x)
    cl = net.to(memory_format=torch.channels_last)
    out = cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_zero_init_residual_makes_blocks_start_as_identity():
    net = ResNet("basic", (1, 1, 1, 1), (4, 4, 4, 4), stem="cifar", zero_init_residual=True).eval()
    block = net.stages[0][0]
    x = torch.rand(2, 4, 5, 5)
    assert torch.equal(block(x), torch.relu(x))
    assert all(float(m.last_bn().weight.detach().abs().sum()) == 0 for m in net.modules() if isinstance(m, BasicBlock))


def test_gradients_reach_every_parameter():
    net = resnet50(widths=(4, 8, 8, 8), stem="cifar")
    net(torch.rand(3, 3, 8, 8)).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_projection_heads_of_the_papers():
    assert HEAD_PRESETS["simclr"] == (2048, 128)
    relic = ProjectionHead(2048, "relic")
    linears = [m for m in relic.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 4092), (4092, 2048), (2048, 1024),
                                                                  (1024, 512), (512, 128)]
    kinds = [type(m).__name__ for m in relic.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 4 + ["Linear"]
    plain = ProjectionHead(2048, (2048, 128), batch_norm=False)
    assert [type(m).__name__ for m in plain.net] == ["Linear", "ReLU", "Linear"]
    assert ProjectionHead(64, "simclr")(torch.rand(3, 64)).shape == (3, 128)
    with pytest.raises(ValueError, match="one of \\['relic', 'simclr'\\]"):
        ProjectionHead(64, "byol")
    with pytest.raises(ValueError, match="in_dim must be a positive int"):
        ProjectionHead(0, (8,))
