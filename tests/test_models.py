import pytest
import torch

from negbatch.models import ContrastiveModel, ConvEncoder, MLPEncoder, ProjectionHead, build_encoder


@pytest.mark.parametrize("size", [8, 28])
def test_encoders_shapes(size):
    x = torch.rand(6, 1, size, size)
    assert MLPEncoder((1, size, size), (32, 16))(x).shape == (6, 16)
    assert ConvEncoder(1, (8, 16, 24))(x).shape == (6, 24)


def test_model_representation_is_encoder_output_and_head_widths():
    enc = build_encoder("conv", (1, 28, 28), (8, 16))
    head = ProjectionHead(enc.out_dim, (64, 32, 8))
    model = ContrastiveModel(enc, head).eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.representation(x), enc(x))
    assert model(x).shape == (3, 8)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [l.out_features for l in linears] == [64, 32, 8]


def test_gradients_reach_every_parameter():
    model = ContrastiveModel(ConvEncoder(1, (4, 8)), ProjectionHead(8, (8, 4)))
    model(torch.rand(4, 1, 8, 8)).pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_widths():
    with pytest.raises(ValueError, match="widths"):
        MLPEncoder((1, 8, 8), ())
    with pytest.raises(ValueError, match="head widths"):
        ProjectionHead(8, (0,))
    with pytest.raises(ValueError, match="encoder must be"):
        build_encoder("vit", (1, 8, 8), (8,))
