"""Non-local projection of the CAF module (embedded Gaussian non-local block, paper Section III-A, Fig. 3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int

__all__ = ["NonLocalProjection", "non_local_attention"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution ``(B, C, H, W) -> (B, O, H, W)`` with weight ``(O, C, 1, 1)``, as one matrix product.

    The same numbers as :func:`torch.nn.functional.conv2d`. On the CPU PyTorch sends float32 1x1 convolutions
    with a batch below 16 on one thread to its generic im2col kernel instead of oneDNN; the matmul (MKL) ran
    about 1.3x faster there (``benchmarks/bench_step.py`` reports the CAF module's FLOP rate). On GPUs both are
    one GEMM.
    """
    if torch.compiler.is_compiling():  # compilers pick their own GEMM; AOT autograd trips on the reshapes
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    batch, _, height, width = x.shape
    out = torch.matmul(weight.flatten(1).to(x.dtype), x.flatten(2))
    if bias is not None:
        out = out + bias.to(out.dtype)[:, None]
    return out.reshape(batch, weight.shape[0], height, width)  # not -1: a batch of 0 images has no size to infer


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution with weight ``(O, C, 1, 1)`` applied to positions-major features ``(B, N, C) -> (B, N, O)``.

    The same numbers as :func:`torch.nn.functional.conv2d` up to float rounding, as one matrix product: on the
    CPU PyTorch sends float32 1x1 convolutions with a batch below 16 on one thread to its generic im2col kernel
    instead of oneDNN; the matmul (MKL) ran about 1.3x faster there (``benchmarks/bench_step.py`` reports the
    CAF module's FLOP rate). On GPUs both are one GEMM.
    """
    return F.linear(x, weight.flatten(1).to(x.dtype), None if bias is None else bias.to(x.dtype))


def non_local_attention(query: Tensor, key: Tensor, value: Tensor, *, use_sdpa: bool = True) -> Tensor:
    """Unscaled softmax attention ``softmax(Q K^T) V`` (the embedded Gaussian affinity of non-local networks).

    There is no ``1/sqrt(d)`` factor: the softmax runs on the raw dot products, as in the embedded Gaussian
    non-local block. With ``use_sdpa=True`` the product goes through
    :func:`torch.nn.functional.scaled_dot_product_attention` with ``scale=1.0``, which dispatches to the fused
    flash / memory-efficient kernels (GPU, and the flash kernel on CPU) whose memory is linear in the number
    of positions; ``use_sdpa=False`` computes the ``(N, M)`` affinity matrix explicitly (exact reference).

    Key and value are cast to the query's dtype, so mixed inputs (e.g. produced under autocast) are accepted.

    Args:
        query: queries.
        key: keys.
        value: values.
        use_sdpa: route through ``scaled_dot_product_attention`` (default) or the explicit formula.

    Shape:
        - query: ``(..., N, D)``
        - key: ``(..., M, D)``
        - value: ``(..., M, Dv)``
        - output: ``(..., N, Dv)``

    Returns:
        The attended values, in the query's dtype.

    Example:
        >>> q, k, v = torch.randn(2, 1, 6, 4), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
        >>> non_local_attention(q, k, v).shape
        torch.Size([2, 1, 6, 4])
    """
    key = key.to(query.dtype)
    value = value.to(query.dtype)
    if use_sdpa:
        return F.scaled_dot_product_attention(query, key, value, scale=1.0)
    scores = torch.matmul(query, key.transpose(-2, -1))
    # Half-precision softmax is inaccurate: normalise in float32, as the fused kernels do.
    weights = scores.softmax(dim=-1, dtype=torch.float32 if scores.dtype in _LOW_PRECISION else None)
    return torch.matmul(weights.to(value.dtype), value)


class NonLocalProjection(nn.Module):
    """Embedded Gaussian non-local block: the projection ``z -> v`` of CAF (paper Section III-A, Fig. 3).

    ``theta``, ``phi`` and ``g`` are 1x1 convolutions to ``inner_channels``; the affinity
    ``softmax_j(theta(z)_i . phi(z)_j)`` (no ``1/sqrt(d)`` scaling) weights ``g(z)`` into ``y``, which a 1x1
    convolution ``W`` (``out_proj``) and a normalisation bring back to ``C`` channels:
    ``v = z + norm(W y)`` (``residual=True``) or ``v = norm(W y)``.

    With ``subsample=True`` the keys and values (``phi(z)`` and ``g(z)``) are 2x2 max-pooled with stride 2 as in
    Wang et al.; odd sizes round **up** (``ceil_mode``), so the last row/column is pooled on its own and no
    position is dropped: ``M = ceil(H/2) * ceil(W/2)`` key positions.

    Initialisation: convolutions keep PyTorch's default init, and the last affine parameter of the output
    branch is zeroed so that the block is the identity at init when ``residual=True``: the norm's ``weight``
    and ``bias`` when the norm layer has an affine weight (as timm's ``NonLocalAttn``), otherwise the weight
    and bias of ``out_proj``. At the very first step only those zeroed parameters (and the ones after them)
    receive non-zero gradients; ``theta``, ``phi``, ``g`` start learning once they move away from zero.

    Args:
        in_channels: number of channels ``C`` of ``z``.
        inner_channels: channels of ``theta``, ``phi``, ``g`` (default ``max(C // 2, 1)``).
        subsample: 2x2 max-pool keys and values (4x fewer key positions).
        residual: return ``z + W y`` (default) instead of ``W y``.
        norm_layer: normalisation after ``W``, called as ``norm_layer(C)``; ``None`` for none (``W`` then has a
            bias).
        use_sdpa: attention through ``scaled_dot_product_attention`` (memory linear in positions on fused
            kernels); ``False`` computes the ``(HW, M)`` affinity explicitly. Both give the same numbers.

    Shape:
        - z: ``(B, C, H, W)``
        - output: ``(B, C, H, W)``

    Raises:
        ValueError: non-positive channel counts; ``z`` with the wrong number of channels or rank.
        TypeError: ``z`` is not a floating-point tensor.

    Example:
        >>> block = NonLocalProjection(8)
        >>> z = torch.randn(2, 8, 7, 5)
        >>> torch.equal(block(z), z)  # identity at init
        True
    """

    def __init__(
        self,
        in_channels: int,
        *,
        inner_channels: int | None = None,
        subsample: bool = True,
        residual: bool = True,
        norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels")
        if inner_channels is None:
            inner_channels = max(in_channels // 2, 1)
        self.inner_channels = check_int(inner_channels, "inner_channels")
        self.subsample = bool(subsample)
        self.residual = bool(residual)
        self.use_sdpa = bool(use_sdpa)
        self.theta = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.g = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.out_proj = nn.Conv2d(inner_channels, in_channels, kernel_size=1, bias=norm_layer is None)
        self.norm: nn.Module = norm_layer(in_channels) if norm_layer is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for the convolutions, then zero the output branch so the block starts as identity."""
        for conv in (self.theta, self.phi, self.g, self.out_proj):
            conv.reset_parameters()
        reset_norm = getattr(self.norm, "reset_parameters", None)
        if callable(reset_norm):
            reset_norm()
        norm_weight = getattr(self.norm, "weight", None)
        if isinstance(norm_weight, nn.Parameter):
            nn.init.zeros_(norm_weight)
            norm_bias = getattr(self.norm, "bias", None)
            if isinstance(norm_bias, nn.Parameter):
                nn.init.zeros_(norm_bias)
        else:
            nn.init.zeros_(self.out_proj.weight)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True) if self.subsample else x

    def forward(self, z: Tensor) -> Tensor:
        """Project ``z`` to ``v = z + norm(W y)`` (or ``norm(W y)`` without the residual).

        Args:
            z: encoder features, ``(B, C, H, W)``.

        Returns:
            ``v``, ``(B, C, H, W)``.

        Raises:
            ValueError: ``z`` is not ``(B, C, H, W)`` with ``C == in_channels``.
            TypeError: ``z`` is not a floating-point tensor.
        """
        check_feature_map(z, "z", channels=self.in_channels)
        batch, channels, height, width = z.shape
        inner = self.inner_channels
        # theta, phi and g as one GEMM over the concatenated weights (the input is read once; a matmul also runs
        # at a higher FLOP rate than a 1x1 convolution on the CPU, where those take PyTorch's slow im2col path),
        # positions-major: (B, HW, 3 inner), so that the attention reads q, k and v in place (the fused SDPA
        # kernels need a unit stride on the last dimension, else they fall back to the math kernel, which
        # materialises the (N, M) affinity) and the key/value pooling runs on a channels-last map (PyTorch's
        # CPU max pooling is about 15x faster channels-last than on a (B, C, H, W) slice at these sizes).
        weight = torch.cat([self.theta.weight, self.phi.weight, self.g.weight])
        bias = torch.cat([conv.bias for conv in (self.theta, self.phi, self.g) if conv.bias is not None])
        projected = _linear(z.flatten(2).transpose(1, 2), weight, bias)  # (B, HW, 3 inner)
        query, key_value = projected[..., :inner], projected[..., inner:]
        if self.subsample:
            grid = key_value.unflatten(1, (height, width)).permute(0, 3, 1, 2)  # (B, 2 inner, H, W) view
            pooled = self._pool(grid.contiguous(memory_format=torch.channels_last))
            key_value = pooled.permute(0, 2, 3, 1).flatten(1, 2)  # (B, M, 2 inner), a view
        key, value = key_value[..., :inner], key_value[..., inner:]
        y = non_local_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), use_sdpa=self.use_sdpa)
        out = _linear(y.squeeze(1), self.out_proj.weight, self.out_proj.bias)  # (B, HW, C)
        # back to (B, C, H, W), contiguous: a channels-last view would make the norm and everything after it
        # take PyTorch's channels-last kernels (batch norm's backward is several times slower there on the CPU)
        out = self.norm(out.transpose(1, 2).contiguous().view(batch, channels, height, width))
        return z + out if self.residual else out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inner_channels={self.inner_channels}, subsample={self.subsample}, "
            f"residual={self.residual}, use_sdpa={self.use_sdpa}"
        )
