# mypy: disable-error-code="index,operator,union-attr"
# (dynamic nn.Module attribute access, e.g. model.refiner[0], is typed Tensor | Module by torch)
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from incseg.models import IncrementalSegmenter, small_segmenter


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (65, 47)])
def test_shapes(batch: int, height: int, width: int) -> None:
    model = small_segmenter(5, width=8)
    assert isinstance(model, IncrementalSegmenter)
    out = model.forward_features(torch.randn(batch, 3, height, width))
    h, w = -(-height // 8), -(-width // 8)  # output stride 8
    assert out["z"].shape == (batch, 32, h, w)
    assert out["z_bar"].shape == (batch, 32, h, w)
    assert out["h"].shape == (batch, 16, h, w)
    assert out["logits"].shape == (batch, 5, h, w)
    assert (model.z_channels, model.h_channels, model.num_classes) == (32, 16, 5)


def test_default_size_and_determinism() -> None:
    torch.manual_seed(3)
    a = small_segmenter(21)
    torch.manual_seed(3)
    b = small_segmenter(21)
    n_params = sum(p.numel() for p in a.parameters())
    assert 100_000 <= n_params <= 300_000
    assert (a.z_channels, a.h_channels) == (128, 64)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_in_channels_and_argument_errors() -> None:
    model = small_segmenter(2, width=4, in_channels=1)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="1 channels"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="width"):
        small_segmenter(2, width=0)
    with pytest.raises(TypeError, match="num_classes"):
        small_segmenter(2.0)  # type: ignore[arg-type]


def test_every_parameter_gets_gradient() -> None:
    model = small_segmenter(3, width=4)
    model.classifier.add_classes(2)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_overfits_one_batch() -> None:
    model = small_segmenter(3, width=8)
    coarse = torch.randint(0, 3, (4, 4, 4))
    y = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # 8x8 blocks of one class
    x = F.one_hot(y, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(4, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        logits = F.interpolate(model(x), size=(32, 32), mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y)

    first = loss_fn().detach()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().detach() < 0.5 * first


def test_bf16_autocast_finite() -> None:
    model = small_segmenter(4, width=8)
    model.classifier.add_classes(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(torch.randn(2, 3, 33, 40))
    assert out["logits"].shape == (2, 6, 5, 5)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    out["logits"].float().sum().backward()


def test_torch_compile_smoke() -> None:
    torch._dynamo.reset()
    model = small_segmenter(4, width=4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 24)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x))
    assert model.encoder.stem[0].weight.grad is not None
