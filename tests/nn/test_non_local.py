"""Tests for the embedded Gaussian non-local projection of CAF."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from incseg.nn.non_local import NonLocalProjection, non_local_attention

SIZES = [(1, 7, 5), (2, 7, 5), (1, 8, 12), (2, 8, 12)]


def _perturb_zero_init(module: nn.Module) -> None:
    """Give every all-zero parameter random values (what a few optimizer steps would do)."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)


def _random_loss(out: Tensor) -> Tensor:
    # A random projection: ``out.sum()`` would have zero gradient through train-mode BN and softmax.
    return (out * torch.randn_like(out)).sum()


# ---------------------------------------------------------------- float64 reference, straight from the definition


def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def _max_pool_2x2_ceil(x: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    out = torch.empty(batch, channels, math.ceil(height / 2), math.ceil(width / 2), dtype=x.dtype)
    for p in range(out.shape[2]):
        for q in range(out.shape[3]):
            window = x[:, :, 2 * p : min(2 * p + 2, height), 2 * q : min(2 * q + 2, width)]
            out[:, :, p, q] = window.amax(dim=(2, 3))
    return out


def _reference(block: NonLocalProjection, z: Tensor) -> Tensor:
    """v = z + norm(W y), y_i = sum_j exp(theta_i.phi_j) g_j / sum_j exp(theta_i.phi_j) (eval-mode norm)."""
    theta, phi, g = _conv1x1(block.theta, z), _conv1x1(block.phi, z), _conv1x1(block.g, z)
    if block.subsample:
        phi, g = _max_pool_2x2_ceil(phi), _max_pool_2x2_ceil(g)
    batch, _, height, width = z.shape
    keys, values = phi.flatten(2), g.flatten(2)  # (B, D, M)
    y = torch.empty(batch, block.inner_channels, height, width, dtype=z.dtype)
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                scores = (theta[b, :, h, w, None] * keys[b]).sum(dim=0)  # (M,), no 1/sqrt(d)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                y[b, :, h, w] = (values[b] * weights).sum(dim=1)
    out = _conv1x1(block.out_proj, y)
    if isinstance(block.norm, nn.BatchNorm2d):
        norm = block.norm
        assert norm.running_mean is not None and norm.running_var is not None
        out = (out - norm.running_mean[None, :, None, None]) / torch.sqrt(norm.running_var + norm.eps)[
            None, :, None, None
        ] * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return z + out if block.residual else out


@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("norm", ["bn", "none"])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_float64_reference(subsample: bool, use_sdpa: bool, norm: str, residual: bool) -> None:
    block = NonLocalProjection(
        6,
        inner_channels=3,
        subsample=subsample,
        residual=residual,
        norm_layer=nn.BatchNorm2d if norm == "bn" else None,
        use_sdpa=use_sdpa,
    ).double()
    _perturb_zero_init(block)
    if isinstance(block.norm, nn.BatchNorm2d):
        with torch.no_grad():
            assert block.norm.running_mean is not None and block.norm.running_var is not None
            block.norm.running_mean.normal_()
            block.norm.running_var.uniform_(0.5, 2.0)
    block.eval()
    z = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(block(z), _reference(block, z), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- shapes, init, gradients


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_output_shape(batch: int, height: int, width: int, subsample: bool, residual: bool) -> None:
    block = NonLocalProjection(8, subsample=subsample, residual=residual)
    _perturb_zero_init(block)
    out = block(torch.randn(batch, 8, height, width))
    assert out.shape == (batch, 8, height, width)
    assert torch.isfinite(out).all()


def test_inner_channels_default_and_minimum() -> None:
    assert NonLocalProjection(8).inner_channels == 4
    assert NonLocalProjection(1).inner_channels == 1
    assert NonLocalProjection(8, inner_channels=5).theta.out_channels == 5


@pytest.mark.parametrize(
    "norm_layer",
    [nn.BatchNorm2d, None, functools.partial(nn.BatchNorm2d, affine=False), functools.partial(nn.GroupNorm, 2)],
    ids=["bn", "none", "bn-no-affine", "groupnorm"],
)
@pytest.mark.parametrize("train", [True, False])
def test_identity_at_init(norm_layer: type[nn.Module] | None, train: bool) -> None:
    block = NonLocalProjection(8, norm_layer=norm_layer).train(train)
    z = torch.randn(2, 8, 7, 5)
    torch.testing.assert_close(block(z), z, rtol=0, atol=0)
    block.residual = False
    assert not block(z).any()


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, None], ids=["bn", "none"])
def test_zeroed_output_branch(norm_layer: type[nn.Module] | None) -> None:
    block = NonLocalProjection(8, norm_layer=norm_layer)
    if norm_layer is None:
        assert not block.out_proj.weight.any() and block.out_proj.bias is not None and not block.out_proj.bias.any()
        assert block.theta.weight.any()
    else:
        assert isinstance(block.norm, nn.BatchNorm2d) and not block.norm.weight.any()
        assert block.out_proj.bias is None and block.out_proj.weight.any()


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_every_parameter_gets_gradient(use_sdpa: bool, batch: int, height: int, width: int) -> None:
    block = NonLocalProjection(8, use_sdpa=use_sdpa)
    z = torch.randn(batch, 8, height, width, requires_grad=True)
    _random_loss(block(z)).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The zero-initialised norm weight learns from the first step (the branch is not dead) ...
    assert isinstance(block.norm, nn.BatchNorm2d)
    assert block.norm.weight.grad is not None and block.norm.weight.grad.abs().sum() > 0
    # ... and once it moved, every parameter receives a non-zero gradient.
    block.zero_grad()
    _perturb_zero_init(block)
    _random_loss(block(z)).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- SDPA == explicit formula


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize(("height", "width"), [(7, 5), (8, 12)])
def test_sdpa_equals_plain(dtype: torch.dtype, tol: float, subsample: bool, height: int, width: int) -> None:
    block = NonLocalProjection(8, subsample=subsample).to(dtype)
    _perturb_zero_init(block)
    z = torch.randn(2, 8, height, width, dtype=dtype, requires_grad=True)
    weights = torch.randn(2, 8, height, width, dtype=dtype)

    outputs, grads = [], []
    for use_sdpa in (True, False):
        block.use_sdpa = use_sdpa
        block.zero_grad()
        out = block(z)
        (grad_z,) = torch.autograd.grad((out * weights).sum(), z)
        outputs.append(out)
        grads.append(grad_z)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol * 10, atol=tol * 10)


@pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"), reason="no CPU flash attention kernel"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("subsample", [True, False])
def test_sdpa_path_runs_on_fused_kernel(dtype: torch.dtype, subsample: bool) -> None:
    """Only the flash kernel allowed: no silent fallback to the math kernel that materialises (N, M)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = NonLocalProjection(8, subsample=subsample).to(dtype)
    _perturb_zero_init(block)
    z = torch.randn(2, 8, 7, 5, dtype=dtype, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = block(z)
        _random_loss(out).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    d=st.integers(1, 6),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_attention_properties(n: int, m: int, d: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, n, d, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(2, 1, m, d, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(2, 1, m, 3, generator=gen, dtype=torch.float64)
    out = non_local_attention(q, k, v)
    # SDPA with scale=1 is the unscaled softmax(QK^T)V.
    explicit = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    torch.testing.assert_close(out, explicit, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(non_local_attention(q, k, v, use_sdpa=False), explicit, rtol=1e-12, atol=1e-12)
    # Convex combination of the values: inside their range.
    assert (out >= v.amin(dim=2, keepdim=True) - 1e-12).all() and (out <= v.amax(dim=2, keepdim=True) + 1e-12).all()
    # Invariant to a joint permutation of key/value positions.
    perm = torch.randperm(m, generator=gen)
    torch.testing.assert_close(non_local_attention(q, k[:, :, perm], v[:, :, perm]), out, rtol=1e-10, atol=1e-10)


def test_attention_casts_key_value_to_query_dtype() -> None:
    q = torch.randn(1, 1, 5, 4)
    k, v = torch.randn(1, 1, 3, 4, dtype=torch.float64), torch.randn(1, 1, 3, 4, dtype=torch.bfloat16)
    for use_sdpa in (True, False):
        assert non_local_attention(q, k, v, use_sdpa=use_sdpa).dtype == torch.float32


def test_plain_attention_low_precision_close_to_float32() -> None:
    q, k, v = (torch.randn(1, 1, 20, 8) for _ in range(3))
    out = non_local_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), use_sdpa=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), non_local_attention(q, k, v), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- precision, compile, validation


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_bf16_autocast_finite(use_sdpa: bool) -> None:
    block = NonLocalProjection(8, use_sdpa=use_sdpa)
    _perturb_zero_init(block)
    z = torch.randn(2, 8, 7, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(z)
    assert out.shape == z.shape and torch.isfinite(out).all()
    _random_loss(out.float()).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_bf16_module_finite() -> None:
    block = NonLocalProjection(8).to(torch.bfloat16)
    _perturb_zero_init(block)
    out = block(torch.randn(2, 8, 7, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_torch_compile_smoke() -> None:
    block = NonLocalProjection(8)
    _perturb_zero_init(block)
    z = torch.randn(2, 8, 7, 5, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(z)
    torch.testing.assert_close(out, block(z))
    _random_loss(out).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_rejects_bad_input() -> None:
    block = NonLocalProjection(8)
    with pytest.raises(ValueError, match="8 channels"):
        block(torch.randn(2, 4, 7, 5))
    with pytest.raises(ValueError, match="4 dims"):
        block(torch.randn(8, 7, 5))
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(2, 8, 7, 5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        block([1.0])


@pytest.mark.parametrize("kwargs", [{"in_channels": 0}, {"in_channels": 2.5}, {"in_channels": 8, "inner_channels": 0}])
def test_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be an int >= 1"):
        NonLocalProjection(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_output_and_input_gradient_are_contiguous_nchw(subsample: bool, residual: bool) -> None:
    # The projection runs positions-major inside; what leaves it must be a plain (B, C, H, W) tensor, so that
    # the layers after it keep their usual (not channels-last) kernels.
    block = NonLocalProjection(8, subsample=subsample, residual=residual)
    _perturb_zero_init(block)
    z = torch.randn(2, 8, 7, 5, requires_grad=True)
    out = block(z)
    assert out.shape == z.shape and out.is_contiguous()
    _random_loss(out).backward()
    assert z.grad is not None and z.grad.is_contiguous()
