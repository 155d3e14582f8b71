"""SimCLRAugment against per-image references written here: torchvision's crop rule,
bilinear sampling by formula, torchvision's colour formulas (hue through colorsys),
a direct Gaussian blur; and reproducibility from an explicit generator."""

import colorsys
import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("kornia")

from negbatch.data import CHANNEL_STATS, SimCLRAugment, channel_stats, normalize_images  # noqa: E402
from negbatch.data.simclr_augment import resized_crop  # noqa: E402


def reference_box(h, w, u_area, u_ratio, u_pos, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, fed the given uniforms."""
    area = h * w
    for t in range(len(u_area)):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u_area[t]))
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(u_ratio[t]))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(float(u_pos[0]) * (h - ch + 1)), int(float(u_pos[1]) * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@pytest.mark.parametrize("h,w,scale", [(32, 32, (0.08, 1.0)), (7, 9, (0.08, 1.0)), (4, 40, (0.9, 1.0)), (40, 4, (0.9, 1.0))])
def test_crop_boxes_match_torchvision_rule(h, w, scale):
    aug = SimCLRAugment(scale=scale)
    g = torch.Generator().manual_seed(3)
    n = 200
    u_area, u_ratio = torch.rand(n, 10, generator=g, dtype=torch.float64), torch.rand(n, 10, generator=g, dtype=torch.float64)
    u_pos = torch.rand(n, 2, generator=g, dtype=torch.float64)
    boxes = aug.crop_boxes(h, w, u_area, u_ratio, u_pos)
    for i in range(n):
        assert tuple(boxes[i].tolist()) == reference_box(h, w, u_area[i], u_ratio[i], u_pos[i], scale)
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()


def bilinear_reference(img, top, left, ch, cw, oh, ow, flip):
    """Bilinear resize of img[:, top:top+ch, left:left+cw] to (oh, ow) by the
    align_corners=False formula, reading neighbours from the whole image and
    clamping at its border."""
    c, h, w = img.shape
    out = np.zeros((c, oh, ow))
    for r in range(oh):
        for k in range(ow):
            y = top + (r + 0.5) * ch / oh - 0.5
            kk = ow - 1 - k if flip else k
            x = left + (kk + 0.5) * cw / ow - 0.5
            y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[:, r, k] = ((1 - dy) * (1 - dx) * img[:, y0, x0] + (1 - dy) * dx * img[:, y0, x1]
                            + dy * (1 - dx) * img[:, y1, x0] + dy * dx * img[:, y1, x1])
    return out


def test_resized_crop_by_formula_slicing_and_interpolate():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 9, 11, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[1, 2, 5, 6], [0, 0, 9, 11], [3, 4, 2, 7], [4, 0, 5, 11]])
    flip = torch.tensor([False, True, False, True])
    got = resized_crop(x, boxes, (5, 4), flip)
    for i in range(4):
        ref = bilinear_reference(x[i].numpy(), *boxes[i].tolist(), 5, 4, bool(flip[i]))
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-12)
    # a crop as large as the output is the slice itself; the whole image matches F.interpolate
    same = resized_crop(x, torch.tensor([[2, 3, 4, 5]] * 4), (4, 5), torch.tensor([False, True, False, False]))
    assert torch.allclose(same[0], x[0, :, 2:6, 3:8], atol=1e-12)
    assert torch.allclose(same[1], x[1, :, 2:6, 3:8].flip(-1), atol=1e-12)
    whole = resized_crop(x, torch.tensor([[0, 0, 9, 11]] * 4), (13, 6))
    assert torch.allclose(whole, F.interpolate(x, size=(13, 6), mode="bilinear", align_corners=False), atol=1e-12)


GRAY = np.array([0.299, 0.587, 0.114])


def reference_view(img, p, i, blur_k):
    """torchvision's formulas for one image, in float64."""
    x = img.astype(np.float64)
    if bool(p.jitter[i]):
        for position in range(4):
            op = int(p.order[i, position])
            f = float(p.factors[i, op])
            gray = np.tensordot(GRAY, x, axes=1)
            if op == 0:
                x = np.clip(x * f, 0, 1)
            elif op == 1:
                x = np.clip(f * x + (1 - f) * gray.mean(), 0, 1)
            elif op == 2:
                x = np.clip(f * x + (1 - f) * gray[None], 0, 1)
            else:
                flat = x.reshape(3, -1).T
                out = []
                for r, g_, b in flat:
                    hh, s, v = colorsys.rgb_to_hsv(r, g_, b)
                    out.append(colorsys.hsv_to_rgb((hh + f) % 1.0, s, v))
                x = np.array(out).T.reshape(x.shape)
    if bool(p.gray[i]):
        x = np.repeat(np.tensordot(GRAY, x, axes=1)[None], 3, axis=0)
    if bool(p.blur[i]):
        sigma = float(p.sigma[i])
        r = blur_k // 2
        kern = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
        kern /= kern.sum()
        padded = np.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")
        h, w = x.shape[1:]
        out = np.zeros_like(x)
        for dy in range(blur_k):
            for dx in range(blur_k):
                out += kern[dy] * kern[dx] * padded[:, dy : dy + h, dx : dx + w]
        x = out
    return x


def test_colour_greyscale_and_blur_match_torchvision_formulas():
    aug = SimCLRAugment(strength=1.0, blur_p=0.7)
    g = torch.Generator().manual_seed(7)
    n, side = 12, 40  # larger than 32: blurred, kernel 2 * (4 // 2) + 1 = 5
    x = torch.rand(n, 3, side, side, generator=g)
    p = aug.draw(n, side, side, torch.Generator().manual_seed(11))
    # take the whole image, unflipped, so that only the photometric part acts
    p = dataclasses.replace(p, boxes=torch.tensor([[0, 0, side, side]] * n), flip=torch.zeros(n, dtype=torch.bool))
    got = aug.apply(x, p)
    assert bool(p.jitter.any() and p.gray.any() and p.blur.any() and (~p.jitter).any())
    for i in range(n):
        np.testing.assert_allclose(got[i].numpy(), reference_view(x[i].numpy(), p, i, 5), atol=2e-5)


def test_same_generator_state_same_views_and_global_rng_untouched():
    aug = SimCLRAugment()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    first = aug(x, g)
    state = g.get_state()
    second = aug(x, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(aug(x, resumed), second)  # a resumed run gets the same views
    assert not torch.equal(first, second)
    assert torch.equal(aug(x, torch.Generator().manual_seed(5)), first)
    assert not torch.equal(aug(x, torch.Generator().manual_seed(6)), first)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)  # nothing drew from the global RNG
    # the draw does not depend on the images: the generator advances the same for any batch of 16
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    aug(x, g1)
    aug(torch.zeros(16, 3, 32, 32), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_uint8_and_float_inputs_agree_and_output_is_float_in_range():
    aug = SimCLRAugment()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x.float() / 255, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    normed = SimCLRAugment(normalize="cifar10")(x, torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v)[:, None, None] for v in CHANNEL_STATS["cifar10"])
    assert torch.allclose(normed, (a - mean) / std, atol=1e-6)
    assert torch.allclose(normalize_images(a, CHANNEL_STATS["cifar10"]), normed)
    grey = SimCLRAugment(size=20)(x[:, :1], torch.Generator().manual_seed(0))
    assert grey.shape == (8, 1, 20, 20)


def test_probabilities_and_ranges_of_the_draws():
    aug = SimCLRAugment()
    n = 4000
    p = aug.draw(n, 96, 96, torch.Generator().manual_seed(0))
    for name, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert abs(float(getattr(p, name).double().mean()) - rate) < 0.03, name
    area = (p.boxes[:, 2] * p.boxes[:, 3]).double() / 96**2
    assert 0.07 < float(area.min()) and float(area.max()) <= 1.0
    assert float(p.factors[:, :3].min()) >= 0.6 and float(p.factors[:, :3].max()) <= 1.4  # 1 +- 0.8 * 0.5
    assert float(p.factors[:, 3].abs().max()) <= 0.1
    assert sorted(p.order[0].tolist()) == [0, 1, 2, 3]
    assert float(p.sigma.min()) >= 0.1 and float(p.sigma.max()) <= 2.0
    assert not SimCLRAugment().draw(50, 32, 32).blur.any()  # no blur at 32x32 (SimCLR's CIFAR setting)
    assert SimCLRAugment(blur=True).draw(50, 32, 32).blur.any()


def test_channel_stats_streams():
    x = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(x, batch_size=7)
    f = x.double() / 255
    assert np.allclose(mean, f.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(std, f.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).numpy(), atol=1e-6)


def test_bad_arguments_are_named(monkeypatch):
    for kwargs, match in [({"scale": (0.5, 0.1)}, "scale"), ({"ratio": (0, 1)}, "ratio"), ({"hflip": 2}, "hflip"),
                          ({"strength": -1}, "strength"), ({"blur": "yes"}, "blur"), ({"size": 0}, "size"),
                          ({"normalize": "svhn"}, "normalize"), ({"normalize": ((0.5,), (0.0,))}, "positive std"),
                          ({"blur_sigma": (2, 1)}, "blur_sigma")]:
        with pytest.raises(ValueError, match=match):
            SimCLRAugment(**kwargs)
    aug = SimCLRAugment()
    with pytest.raises(ValueError, match="C = 3 or 1"):
        aug(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="normalize has 3 channels but the images have 1"):
        SimCLRAugment(normalize="cifar10")(torch.zeros(2, 1, 8, 8), torch.Generator())
    monkeypatch.setitem(sys.modules, "kornia", None)
    with pytest.raises(ImportError, match=r"negbatch\[vision\]"):
        SimCLRAugment()


def test_float_images_on_a_0_255_scale_are_refused():
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(2)).float()
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
        SimCLRAugment()(x, torch.Generator().manual_seed(0))
