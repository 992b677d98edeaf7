"""What incseg adds to a training step and to inference, as ratios to the bare network.

(a) One CAF training step (teacher forward under no_grad + student forward with CAF + CAFLoss + backward) against
    its lower bound: the teacher's forward plus the bare student's forward and backward with a plain CE, and the
    same optimizer step (SGD with momentum and the learner's weight decay 1e-4).
(d) Inference with the ``skip`` strategy against the bare network's forward.
The two sides of (a) and of (d) are timed alternately, so that both see the same machine load.

Paper setting on a GPU:
    python benchmarks/bench_step.py --device cuda --model deeplabv3_resnet101 --size 512 --batch 12 --amp bf16
Quick CPU run:
    python benchmarks/bench_step.py
(e) The CAF module's achieved FLOP rate (forward + backward, FLOPs from ``torch.utils.flop_counter``) against the
    bare network's at the same input.
Targets (issue 5): (a) <= 1.15, (d) <= 1.05; (issue 14): (e) >= 0.9. Also prints peak memory on CUDA. Each run
adds its row to benchmarks/results/bench_step.json (docs/figures/make_figures.py plots them).
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
    return _timeit_pair(fn, None, device, iters, warmup)[0]


def _timeit_pair(
    fn: Callable[[], object],
    other: Callable[[], object] | None,
    device: torch.device,
    iters: int,
    warmup: int,
    *,
    mean: bool = False,
) -> tuple[float, float]:
    """Median (or ``mean``) seconds of ``fn`` and ``other``, run alternately so that both see the same machine
    load."""
    fns = [fn] if other is None else [fn, other]
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for f, record in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                record.append(time.perf_counter() - t0)
    if mean:
        means = [sum(t) / len(t) for t in times]
        return means[0], means[-1]
    medians = [sorted(t)[len(t) // 2] for t in times]
    return medians[0], medians[-1]


def _flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


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
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--caf-inner", type=int, help="inner channels of CAF's projections (default C/2)")
    parser.add_argument(
        "--ad-balance-on", choices=["weights", "features"], default="weights", help="where AD's gradient balance acts"
    )
    parser.add_argument("--ad-balance-every", type=int, default=10, help="iterations between two refreshes")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    scenario = get_scenario("voc", "15-5", mode="overlapped")
    build = (lambda k: small_segmenter(k)) if args.model == "small" else (lambda k: deeplabv3_resnet101(k))
    learner = IncrementalLearner(
        build(16).to(device),
        scenario,
        "caf",
        caf_inner_channels=args.caf_inner,
        ad_balance_on=args.ad_balance_on,
        ad_balance_every=args.ad_balance_every,
    )
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
    # Same optimizer as the learner's groups (weight decay 1e-4): the decay is not CAF's cost.
    bare_opt = torch.optim.SGD(bare.parameters(), lr=1e-8, momentum=0.9, weight_decay=1e-4)

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
    # (a) is a mean: the balance on the weights refreshes every ad_balance_every iterations, and a median would
    # leave those iterations out
    t_caf, t_bound = _timeit_pair(caf_step, bound_step, device, args.iters, args.warmup, mean=True)
    t_skip, t_bare = _timeit_pair(infer_skip, infer_bare, device, args.iters, args.warmup)
    m_caf, m_bound = _peak(caf_step, device), _peak(bound_step, device)

    # (e) FLOP rate of the CAF module against the bare network's, forward + backward at the same input.
    fusion = learner.model.fusion
    assert fusion is not None
    with torch.no_grad(), autocast_context(device, args.amp):
        z_student = learner.model.forward_features(x)["z"].detach()
        z_teacher = learner.teacher_forward(x)["z"].detach()  # type: ignore[index]
    z_student.requires_grad_(True)
    out_grad = torch.randn_like(z_student)

    def caf_module_step() -> None:
        with autocast_context(device, args.amp):
            out = fusion(z_student, z_teacher)
        out.backward(out_grad.to(out.dtype))

    def bare_step() -> None:
        with autocast_context(device, args.amp):
            logits = bare(x)
        logits.float().sum().backward()

    flops_caf, flops_bare = _flops(caf_module_step), _flops(bare_step)
    # The FLOP ratios of (a) and (d): what the time ratios would be if every FLOP ran at the same rate (the share
    # of the ratio that the architecture, not the implementation, sets).
    flop_ratio_step = _flops(caf_step) / _flops(bound_step)
    flop_ratio_skip = _flops(infer_skip) / _flops(infer_bare)
    t_caf_module = _timeit(caf_module_step, device, args.iters, args.warmup)
    t_bare_step = _timeit(bare_step, device, args.iters, args.warmup)
    rate_caf, rate_bare = flops_caf / t_caf_module, flops_bare / t_bare_step

    inner = args.caf_inner or "C/2"
    print(
        f"device={device} model={args.model} batch={args.batch} size={args.size} amp={args.amp} caf_inner={inner} "
        f"ad_balance_on={args.ad_balance_on} ad_balance_every={args.ad_balance_every}"
    )
    print(f"(a) CAF training step        {1e3 * t_caf:9.1f} ms")
    print(
        f"    lower bound (T fwd + S fwd/bwd) {1e3 * t_bound:9.1f} ms   ratio {t_caf / t_bound:.3f}  (target <= 1.15)"
    )
    print(f"    FLOP ratio (the architecture's share) {flop_ratio_step:.3f}")
    if device.type == "cuda":
        print(f"    peak memory {m_caf:.0f} MiB vs {m_bound:.0f} MiB   ratio {m_caf / m_bound:.3f}")
    print(f"(d) inference, skip strategy {1e3 * t_skip:9.1f} ms")
    print(f"    bare network             {1e3 * t_bare:9.1f} ms   ratio {t_skip / t_bare:.3f}  (target <= 1.05)")
    print(f"    FLOP ratio (the architecture's share) {flop_ratio_skip:.3f}")
    print(
        f"(e) CAF module fwd+bwd {flops_caf / 1e9:8.1f} GFLOP {1e3 * t_caf_module:9.1f} ms  "
        f"{rate_caf / 1e9:7.1f} GFLOP/s"
    )
    print(
        f"    bare network fwd+bwd {flops_bare / 1e9:8.1f} GFLOP {1e3 * t_bare_step:9.1f} ms  {rate_bare / 1e9:7.1f} "
        f"GFLOP/s   rate ratio {rate_caf / rate_bare:.3f}  (target >= 0.9)"
    )
    row = {
        "device": device.type,
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "amp": args.amp,
        "caf_inner": args.caf_inner,
        "ad_balance_on": args.ad_balance_on,
        "ad_balance_every": args.ad_balance_every if args.ad_balance_on == "weights" else None,
        "step_ratio": round(t_caf / t_bound, 3),
        "skip_ratio": round(t_skip / t_bare, 3),
        "step_ms": round(1e3 * t_caf, 2),
        "bound_ms": round(1e3 * t_bound, 2),
        "skip_ms": round(1e3 * t_skip, 2),
        "bare_ms": round(1e3 * t_bare, 2),
        "flop_rate_ratio": round(rate_caf / rate_bare, 3),
        "step_flop_ratio": round(flop_ratio_step, 3),
        "skip_flop_ratio": round(flop_ratio_skip, 3),
    }
    save_rows(
        "bench_step",
        [row],
        key=("device", "model", "batch", "size", "amp", "caf_inner", "ad_balance_on", "ad_balance_every"),
    )
    if args.json:
        from bench_losses import write_json

        setting = {"device": str(device), "model": args.model, "batch": args.batch, "size": args.size}
        setting.update({"amp": args.amp, "caf_inner": str(inner), "threads": torch.get_num_threads()})
        results = {"caf_step_ms": 1e3 * t_caf, "lower_bound_ms": 1e3 * t_bound, "step_ratio": t_caf / t_bound}
        results.update({"skip_ms": 1e3 * t_skip, "bare_ms": 1e3 * t_bare, "inference_ratio": t_skip / t_bare})
        results.update({"caf_gflop": flops_caf / 1e9, "caf_gflops_per_s": rate_caf / 1e9})
        results.update({"bare_gflop": flops_bare / 1e9, "bare_gflops_per_s": rate_bare / 1e9})
        results["flop_rate_ratio"] = rate_caf / rate_bare
        results.update({"step_flop_ratio": flop_ratio_step, "skip_flop_ratio": flop_ratio_skip})
        if device.type == "cuda":
            results.update({"caf_peak_mib": m_caf, "bound_peak_mib": m_bound})
        write_json(args.json, {"benchmark": "step", "setting": setting, "results": results})


if __name__ == "__main__":
    main()
