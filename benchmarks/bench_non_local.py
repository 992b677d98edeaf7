"""Time and peak memory of :class:`incseg.nn.non_local.NonLocalProjection`: SDPA path vs explicit softmax(QK^T)V.

Not a test: a script that prints one table. For 1k, 4k and 16k query positions (32x32, 64x64, 128x128 feature
maps, ``C = 256``, inner channels 128), with and without 2x2 subsampling of keys/values, it runs the block with
``use_sdpa=True`` and ``use_sdpa=False`` and reports the median time of a training step (forward + backward of a
random projection of the output; ``--mode inference``: forward under ``no_grad``), as the best of ``--repeats``
timed runs after a warm-up (the minimum is the least noisy estimate on a shared machine), the peak memory of one
such step and the ratios plain / SDPA.

What "peak memory" measures:

- ``--device cuda``: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated before it
  (tensors only, not the caching allocator's reserve).
- ``--device cpu``: the peak, during the step, of the bytes held by tensors allocated through PyTorch's CPU
  allocator, above what was held before the step, read from the allocation events of
  ``torch.profiler.profile(profile_memory=True)`` (each event carries the allocator's running total). It is not
  the process RSS: memory allocated outside PyTorch's allocator (e.g. scratch buffers of oneDNN/BLAS) is not
  counted. The profiled step is a separate run from the timed ones.

The explicit path materialises the ``(N, M)`` affinity (several copies in training), so it is skipped when that
would exceed ``--max-plain-gib`` (CPU default 8 GiB: the Linux OOM killer, not an exception, is what usually
answers an oversized CPU allocation); a real out-of-memory error prints ``OOM``.

Usage::

    python benchmarks/bench_non_local.py                 # CPU, all sizes (about 1-2 minutes on 2 cores)
    python benchmarks/bench_non_local.py --quick         # 1k and 4k positions, one timed repeat
    python benchmarks/bench_non_local.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from incseg.nn.non_local import NonLocalProjection

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MiB = 2**20


@dataclass
class Result:
    time_s: float | None
    peak_bytes: int | None
    kernel: str
    status: str = "ok"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_and_kernel(fn: Callable[[], None]) -> tuple[int | None, str]:
    """Run ``fn`` once under the profiler; return the peak of live CPU-allocator bytes and the attention op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    kernel = _attention_kernel(prof)
    try:  # Allocation events carry the allocator's running total: peak = max(total) - total before the step.
        from torch._C._profiler import _EventType

        events: list[tuple[int, int, int]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
        while stack:
            node = stack.pop()
            if node.typed[0] == _EventType.Allocation and str(node.typed[1].device) == "cpu":
                fields = node.typed[1]
                events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
            stack.extend(node.children)
    except (ImportError, AttributeError):  # private API: report nothing rather than a wrong number
        return None, kernel
    if not events:
        return 0, kernel
    events.sort()
    baseline = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - baseline, kernel


def _attention_kernel(prof: torch.profiler.profile) -> str:
    names = {event.key for event in prof.key_averages()}
    for name in sorted(names):
        if name.startswith(("aten::_scaled_dot_product_", "aten::_flash_attention", "aten::_efficient_attention")):
            return name.removeprefix("aten::")
    return "matmul+softmax" if "aten::_softmax" in names else "?"


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return "out of memory" in message or "can't allocate" in message or "cannot allocate" in message


def run_case(
    *,
    size: int,
    subsample: bool,
    use_sdpa: bool,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> Result:
    positions = size * size
    keys = ((size + 1) // 2) ** 2 if subsample else positions
    if not use_sdpa:
        copies = 4 if args.mode == "train" else 2
        needed = copies * args.batch * positions * keys * torch.finfo(dtype).bits // 8
        if device.type == "cpu" and needed > args.max_plain_gib * 2**30:
            return Result(None, None, "", f"skipped (~{needed / 2**30:.0f} GiB)")
    block = NonLocalProjection(args.channels, subsample=subsample, use_sdpa=use_sdpa).to(device, dtype)
    with torch.no_grad():  # the zero-initialised norm would make the branch's output vanish
        block.norm.weight.fill_(1.0)  # type: ignore[operator]
    z = torch.randn(args.batch, args.channels, size, size, device=device, dtype=dtype)
    weights = torch.randn_like(z)

    def step() -> None:
        if args.mode == "train":
            block.zero_grad(set_to_none=True)
            (block(z) * weights).sum().backward()
        else:
            with torch.no_grad():
                block(z)

    try:
        step()  # warm-up
        _sync(device)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
                _sync(device)
            kernel = _attention_kernel(prof)
            block.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            _sync(device)
            peak: int | None = torch.cuda.max_memory_allocated(device) - before
        else:
            block.zero_grad(set_to_none=True)
            peak, kernel = _cpu_peak_and_kernel(step)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        return Result(None, None, "", "OOM")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Result(min(times), peak, kernel)


def _fmt_time(result: Result) -> str:
    return f"{result.time_s * 1e3:10.1f}" if result.time_s is not None else f"{result.status:>10}"


def _fmt_mem(result: Result) -> str:
    if result.status != "ok":
        return f"{'-':>10}"
    return f"{result.peak_bytes / _MiB:10.1f}" if result.peak_bytes is not None else f"{'n/a':>10}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:7.1f}x" if a is not None and b else f"{'-':>8}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--mode", default="train", choices=["train", "inference"])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="feature map side lengths")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (best reported)")
    parser.add_argument("--quick", action="store_true", help="sizes 32 and 64 only, one timed repeat")
    parser.add_argument("--max-plain-gib", type=float, default=8.0, help="CPU: skip the plain path above this")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 64]
        args.repeats = 1
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(0)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"NonLocalProjection, torch {torch.__version__}, {where}, {args.dtype}, mode={args.mode}, "
        f"B={args.batch}, C={args.channels}, inner={max(args.channels // 2, 1)}, best of {args.repeats}"
    )
    print(
        f"{'HxW':>8} {'N':>6} {'M':>6} {'sub':>4} | {'sdpa ms':>10} {'plain ms':>10} {'t ratio':>8} | "
        f"{'sdpa MiB':>10} {'plain MiB':>10} {'m ratio':>8} | sdpa kernel"
    )
    for size in args.sizes:
        for subsample in (False, True):
            sdpa = run_case(size=size, subsample=subsample, use_sdpa=True, args=args, device=device, dtype=dtype)
            plain = run_case(size=size, subsample=subsample, use_sdpa=False, args=args, device=device, dtype=dtype)
            positions = size * size
            keys = ((size + 1) // 2) ** 2 if subsample else positions
            mem_sdpa = sdpa.peak_bytes if sdpa.status == "ok" else None
            mem_plain = plain.peak_bytes if plain.status == "ok" else None
            print(
                f"{f'{size}x{size}':>8} {positions:>6} {keys:>6} {'on' if subsample else 'off':>4} | "
                f"{_fmt_time(sdpa)} {_fmt_time(plain)} {_ratio(plain.time_s, sdpa.time_s)} | "
                f"{_fmt_mem(sdpa)} {_fmt_mem(plain)} {_ratio(mem_plain, mem_sdpa)} | {sdpa.kernel}",
                flush=True,
            )


if __name__ == "__main__":
    main()
