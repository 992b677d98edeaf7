"""What incseg adds to a training step and to inference, as ratios to the bare network.

(a) One CAF training step (teacher forward under no_grad + student forward with CAF + CAFLoss + backward) against
    its lower bound: the teacher's forward plus the bare student's forward and backward with a plain CE.
(d) Inference with the ``skip`` strategy against the bare network's forward.

Paper setting on a GPU:
    python benchmarks/bench_step.py --device cuda --model deeplabv3_resnet101 --size 512 --batch 12 --amp bf16
Quick CPU run:
    python benchmarks/bench_step.py
Targets (issue 5): (a) <= 1.15, (d) <= 1.05. Also prints peak memory on CUDA. Each run adds its row to
benchmarks/results/bench_step.json (docs/figures/make_figures.py plots them).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _results import save_rows

from incseg.engine import autocast_context
from incseg.learner import IncrementalLearner, freeze
from incseg.models import deeplabv3_resnet101, small_segmenter
from incseg.scenarios import get_scenario


def _timeit(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def _peak(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


@torch.no_grad()
def _calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``x`` (one cumulative pass)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(x)
    for m in norms:
        m.momentum = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["small", "deeplabv3_resnet101"], default="small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--caf-inner", type=int, help="inner channels of CAF's projections (default C/2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    scenario = get_scenario("voc", "15-5", mode="overlapped")
    build = (lambda k: small_segmenter(k)) if args.model == "small" else (lambda k: deeplabv3_resnet101(k))
    learner = IncrementalLearner(build(16).to(device), scenario, "caf", caf_inner_channels=args.caf_inner)
    learner.begin_step(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    _calibrate_batchnorm(learner.model, x)  # an untrained network in eval mode overflows: give it real statistics
    learner.end_step()
    learner.begin_step(1)
    learner.model.to(device)
    learner.module.to(device)
    # A tiny learning rate: timing does not depend on it, and repeated steps on one batch must not diverge.
    opt = torch.optim.SGD(learner.param_groups(1e-8), lr=1e-8, momentum=0.9)

    # The bare network: same architecture, no CAF, plain CE; its teacher is a frozen copy.
    bare = copy.deepcopy(learner.model)
    bare.fusion = None
    bare_teacher = freeze(copy.deepcopy(bare))
    bare_opt = torch.optim.SGD(bare.parameters(), lr=1e-8, momentum=0.9)

    y = torch.randint(0, 21, (args.batch, args.size, args.size), device=device)
    y[y < 16] = 0

    def caf_step() -> None:
        with autocast_context(device, args.amp):
            out = learner.training_step(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def bound_step() -> None:
        with autocast_context(device, args.amp):
            with torch.no_grad():
                bare_teacher(x)
            logits = bare(x)
            loss = F.cross_entropy(
                F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False),
                y,
                ignore_index=255,
            )
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    @torch.no_grad()
    def infer_skip() -> None:
        with autocast_context(device, args.amp):
            learner.predict(x, strategy="skip")

    @torch.no_grad()
    def infer_bare() -> None:
        bare.eval()
        with autocast_context(device, args.amp):
            F.interpolate(bare(x).float(), size=x.shape[-2:], mode="bilinear", align_corners=False)

    learner.module.train()
    bare.train()
    t_caf = _timeit(caf_step, device, args.iters, args.warmup)
    t_bound = _timeit(bound_step, device, args.iters, args.warmup)
    t_skip = _timeit(infer_skip, device, args.iters, args.warmup)
    t_bare = _timeit(infer_bare, device, args.iters, args.warmup)
    m_caf, m_bound = _peak(caf_step, device), _peak(bound_step, device)

    inner = args.caf_inner or "C/2"
    print(f"device={device} model={args.model} batch={args.batch} size={args.size} amp={args.amp} caf_inner={inner}")
    print(f"(a) CAF training step        {1e3 * t_caf:9.1f} ms")
    print(
        f"    lower bound (T fwd + S fwd/bwd) {1e3 * t_bound:9.1f} ms   ratio {t_caf / t_bound:.3f}  (target <= 1.15)"
    )
    if device.type == "cuda":
        print(f"    peak memory {m_caf:.0f} MiB vs {m_bound:.0f} MiB   ratio {m_caf / m_bound:.3f}")
    print(f"(d) inference, skip strategy {1e3 * t_skip:9.1f} ms")
    print(f"    bare network             {1e3 * t_bare:9.1f} ms   ratio {t_skip / t_bare:.3f}  (target <= 1.05)")
    row = {
        "device": device.type,
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "amp": args.amp,
        "caf_inner": args.caf_inner,
        "step_ratio": round(t_caf / t_bound, 3),
        "skip_ratio": round(t_skip / t_bare, 3),
        "step_ms": round(1e3 * t_caf, 2),
        "bound_ms": round(1e3 * t_bound, 2),
        "skip_ms": round(1e3 * t_skip, 2),
        "bare_ms": round(1e3 * t_bare, 2),
    }
    save_rows("bench_step", [row], key=("device", "model", "batch", "size", "amp", "caf_inner"))


if __name__ == "__main__":
    main()
