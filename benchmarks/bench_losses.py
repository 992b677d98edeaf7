"""Time incseg's losses against naive references written from the equations (a script, not a test).

Each pair runs forward + backward on the same inputs. The naive references do what the paper writes:
probabilities with ``softmax``, aggregated sums of probabilities, then ``log`` (no shared ``logsumexp``).

Memory: on CUDA the peak is ``torch.cuda.max_memory_allocated`` over one forward + backward; on every device
the script also reports the bytes of the tensors autograd saves for backward (collected with
``torch.autograd.graph.saved_tensors_hooks``, counted once per storage), a device-independent estimate of
the activation memory a loss adds to a training step. CPU peak memory is not measured.

Usage::

    python benchmarks/bench_losses.py                     # B=4, K=21, H=W=128 on CPU
    python benchmarks/bench_losses.py --device cuda --size 4 21 512 512 --old 16 --compile

Each run adds its rows to benchmarks/results/bench_losses.json (docs/figures/make_figures.py plots them).

A second table compares the unbiased CE + unbiased KD pair (the loss of every MiB/CAF step) with a
re-implementation of MiB's official losses (target of issue 14: at most 0.55x their time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _results import save_rows
from torch import Tensor

import incseg
from incseg.functional import (
    attentive_distillation_loss,
    balanced_kd_loss,
    kd_loss,
    unbiased_cross_entropy,
    unbiased_kd_loss,
)
from incseg.losses import CAFLoss
from incseg.nn.squeeze_excitation import SqueezeExcitation

# ---------------------------------------------------------------------------------------------------------------
# Naive references, straight from the equations
# ---------------------------------------------------------------------------------------------------------------


def naive_unbiased_ce(logits: Tensor, labels: Tensor, n_old: int) -> Tensor:
    p = logits.softmax(dim=1)
    phi = torch.cat([p[:, :n_old].sum(dim=1, keepdim=True), p[:, n_old:]], dim=1)  # eq. 15
    target = torch.where(labels < n_old, torch.zeros_like(labels), labels - n_old + 1)
    valid = labels != 255
    target = torch.where(valid, target, torch.zeros_like(target))
    nll = -phi.gather(1, target.unsqueeze(1)).squeeze(1).log()
    return (nll * valid).sum() / valid.sum()


def naive_kd(logits: Tensor, old_logits: Tensor, kind: str) -> Tensor:
    n_old = old_logits.shape[1]
    q = old_logits.softmax(dim=1)
    if kind == "plain":
        phi = logits[:, :n_old].softmax(dim=1)
        return -(q * phi.log()).sum(dim=1).mean() / n_old
    p = logits.softmax(dim=1)
    phi = torch.cat([p[:, :1] + p[:, n_old:].sum(dim=1, keepdim=True), p[:, 1:n_old]], dim=1)  # eq. 10
    terms = q * phi.log()
    if kind == "balanced":  # eq. 11-12
        q_bar = old_logits.detach().mean(dim=(2, 3)).softmax(dim=1)
        gamma = (1 - q_bar[:, 0]) / q_bar[:, 0]
        terms = torch.cat([gamma.view(-1, 1, 1, 1) * terms[:, :1], terms[:, 1:]], dim=1)
    return -terms.sum(dim=1).mean() / n_old


def naive_ad(m: Tensor, m_old: Tensor, se: SqueezeExcitation) -> Tensor:
    def ad(x: Tensor) -> Tensor:
        energy = (x**2).sum(dim=1, keepdim=True)
        spatial = energy / torch.sqrt((energy**2).sum(dim=(2, 3), keepdim=True))
        return (se(x) * spatial + 1) * x

    return ((ad(m) - ad(m_old.detach()).detach()) ** 2).mean()


def naive_caf(inputs: dict, criterion: CAFLoss) -> Tensor:
    n_old = inputs["old_logits"].shape[1]
    assert criterion.ad_loss is not None and criterion.ad_loss.se_z is not None and criterion.ad_loss.se_h is not None
    seg = naive_unbiased_ce(inputs["logits"], inputs["labels"], n_old)
    kd = naive_kd(inputs["logits"], inputs["old_logits"], "balanced")
    ad = naive_ad(inputs["z"], inputs["z_old"], criterion.ad_loss.se_z) + naive_ad(
        inputs["h"], inputs["h_old"], criterion.ad_loss.se_h
    )
    return seg + criterion.lambda_d * kd + criterion.lambda_ad * ad


# ---------------------------------------------------------------------------------------------------------------
# MiB's official losses, re-implemented for comparison (not incseg code)
# ---------------------------------------------------------------------------------------------------------------
# A re-implementation, written for this benchmark, of the computation that MiB's published code performs
# (Cermelli et al., CVPR 2020, github.com/fcdl94/MiB, utils/loss.py: UnbiasedCrossEntropy and
# UnbiasedKnowledgeDistillationLoss with mean reduction): the same tensor operations in the same order, so that
# the timing is that of the official implementation. Used only as a baseline for the CE + KD pair.


def mib_unbiased_ce(logits: Tensor, labels: Tensor, n_old: int) -> Tensor:
    """MiB's UnbiasedCrossEntropy: a zero-filled log-probability tensor, filled slice by slice, then nll_loss."""
    log_probs = torch.zeros_like(logits)
    norm = torch.logsumexp(logits, dim=1)
    log_probs[:, 0] = torch.logsumexp(logits[:, :n_old], dim=1) - norm
    log_probs[:, n_old:] = logits[:, n_old:] - norm.unsqueeze(1)
    target = labels.clone()
    target[labels < n_old] = 0
    return F.nll_loss(log_probs, target, ignore_index=255)


def mib_unbiased_kd(logits: Tensor, old_logits: Tensor) -> Tensor:
    """MiB's UnbiasedKnowledgeDistillationLoss: index_select of the background + new classes, then logsumexp."""
    n_old, k = old_logits.shape[1], logits.shape[1]
    background_new = torch.tensor([0, *range(n_old, k)], device=logits.device)
    norm = torch.logsumexp(logits, dim=1)
    old_foreground = logits[:, 1 : n_old - k] - norm.unsqueeze(1)
    background = torch.logsumexp(torch.index_select(logits, 1, background_new), dim=1) - norm
    q = torch.softmax(old_logits, dim=1)
    per_pixel = (q[:, 0] * background + (q[:, 1:] * old_foreground).sum(dim=1)) / n_old
    return -per_pixel.mean()


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(inputs: dict) -> None:
    for value in inputs.values():
        if isinstance(value, Tensor):
            value.grad = None


def time_pair(
    ours: Callable[[], Tensor],
    naive: Callable[[], Tensor],
    inputs: dict,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[list[float], list[float]]:
    """Seconds of one forward + backward of each, interleaved so that both see the same machine load."""
    times: tuple[list[float], list[float]] = ([], [])
    for step in range(warmup + repeats):
        for fn, record in zip((ours, naive), times):
            _sync(device)
            start = time.perf_counter()
            fn().backward()
            _sync(device)
            if step >= warmup:
                record.append(time.perf_counter() - start)
            _zero_grads(inputs)
    return times


def saved_bytes(fn: Callable[[], Tensor], inputs: dict) -> int:
    """Bytes of the tensors autograd saves for backward in one forward, each storage counted once and the
    inputs' own storages (which exist anyway) left out."""
    exclude = {v.untyped_storage().data_ptr() for v in inputs.values() if isinstance(v, Tensor)}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values())


def peak_cuda_bytes(fn: Callable[[], Tensor], inputs: dict, device: torch.device) -> int:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn().backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    _zero_grads(inputs)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--size", type=int, nargs=4, default=[4, 21, 128, 128], metavar=("B", "K", "H", "W"))
    parser.add_argument("--old", type=int, default=16, help="number of old classes incl. background (default 16)")
    parser.add_argument("--feat", type=int, nargs=3, default=[256, 256, 33], metavar=("CZ", "CH", "S"),
                        help="feature channels of z-bar and h and their spatial size (default 256 256 33)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) of each loss")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--validate",
        action="store_true",
        help="keep incseg's input value checks on (default off, as on GPU; the naive references check nothing)",
    )
    args = parser.parse_args()
    incseg.set_validate_values(True if args.validate else False)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    b, k, h, w = args.size
    n_old = args.old
    cz, ch, s = args.feat
    logits = torch.randn(b, k, h, w, device=device, requires_grad=True)
    old_logits = torch.randn(b, n_old, h, w, device=device)
    labels = torch.randint(0, k, (b, h, w), device=device)
    labels[:, :4] = 255
    z = torch.randn(b, cz, s, s, device=device, requires_grad=True)
    hh = torch.randn(b, ch, s, s, device=device, requires_grad=True)
    z_old, h_old = torch.randn_like(z), torch.randn_like(hh)
    inputs = {"logits": logits, "old_logits": old_logits, "labels": labels, "z": z, "z_old": z_old, "h": hh}
    inputs["h_old"] = h_old
    criterion = CAFLoss(cz, ch).to(device)
    assert criterion.ad_loss is not None and criterion.ad_loss.se_z is not None
    se = criterion.ad_loss.se_z
    feats, old_feats = {"z": z, "h": hh}, {"z": z_old, "h": h_old}

    pairs: list[tuple[str, Callable[[], Tensor], Callable[[], Tensor]]] = [
        (
            "unbiased_cross_entropy",
            lambda: unbiased_cross_entropy(logits, labels, n_old),
            lambda: naive_unbiased_ce(logits, labels, n_old),
        ),
        ("kd_loss", lambda: kd_loss(logits, old_logits), lambda: naive_kd(logits, old_logits, "plain")),
        (
            "unbiased_kd_loss",
            lambda: unbiased_kd_loss(logits, old_logits),
            lambda: naive_kd(logits, old_logits, "unbiased"),
        ),
        (
            "balanced_kd_loss",
            lambda: balanced_kd_loss(logits, old_logits),
            lambda: naive_kd(logits, old_logits, "balanced"),
        ),
        (
            "attentive_distillation_loss",
            lambda: attentive_distillation_loss(z, z_old, se),
            lambda: naive_ad(z, z_old, se),
        ),
        (
            "CAFLoss (seg + kd + ad)",
            lambda: (
                criterion(
                    logits, labels, num_old_classes=n_old, old_logits=old_logits, features=feats, old_features=old_feats
                ).loss
            ),
            lambda: naive_caf(inputs, criterion),
        ),
    ]

    mib_criterion = CAFLoss(None, None, kd="unbiased", ad=None, lambda_d=1.0)
    mib_pairs: list[tuple[str, Callable[[], Tensor], Callable[[], Tensor]]] = [
        (
            "CE + unbiased KD (functionals)",
            lambda: unbiased_cross_entropy(logits, labels, n_old) + unbiased_kd_loss(logits, old_logits),
            lambda: mib_unbiased_ce(logits, labels, n_old) + mib_unbiased_kd(logits, old_logits),
        ),
        (
            "CE + unbiased KD (CAFLoss mib)",
            lambda: mib_criterion(logits, labels, num_old_classes=n_old, old_logits=old_logits).loss,
            lambda: mib_unbiased_ce(logits, labels, n_old) + mib_unbiased_kd(logits, old_logits),
        ),
    ]

    print(
        f"device={device} B={b} K={k} H={h} W={w} n_old={n_old} features z/h=({cz},{ch},{s},{s}) "
        f"threads={torch.get_num_threads()} torch={torch.__version__}; forward+backward, best and median of "
        f"{args.repeats}"
    )
    header = f"{'loss':30s} {'best ms':>9s} {'ref':>9s} {'ratio':>6s} {'median':>7s} {'ref':>7s} {'ratio':>6s}"
    header += f" {'saved MiB':>9s} {'ref':>9s} {'ratio':>6s}"
    if device.type == "cuda":
        header += f" {'peak MiB':>9s} {'ref pk':>9s} {'peak ratio':>10s}"
    if args.compile:
        header += f" {'compiled ms':>11s} {'speed-up':>8s}"
    rows: list[dict[str, object]] = []
    figure_rows: list[dict[str, object]] = []
    for section, section_pairs in (("naive reference", pairs), ("MiB's official losses (re-implemented)", mib_pairs)):
        print(f"-- against the {section}")
        print(header)
        for name, ours, naive in section_pairs:
            with torch.no_grad():
                torch.testing.assert_close(ours(), naive(), rtol=1e-4, atol=1e-5)  # both compute the same loss
            times_ours, times_naive = time_pair(ours, naive, inputs, device, args.repeats, args.warmup)
            t_ours, t_naive = min(times_ours), min(times_naive)
            med_ours, med_naive = statistics.median(times_ours), statistics.median(times_naive)
            m_ours, m_naive = saved_bytes(ours, inputs), saved_bytes(naive, inputs)
            row: dict[str, object] = {
                "loss": name,
                "reference": section,
                "ms": t_ours * 1e3,
                "reference_ms": t_naive * 1e3,
                "ratio": t_ours / t_naive,
                "median_ratio": med_ours / med_naive,
                "saved_ratio": m_ours / m_naive,
            }
            line = (
                f"{name:30s} {t_ours * 1e3:9.2f} {t_naive * 1e3:9.2f} {t_ours / t_naive:6.2f} "
                f"{med_ours * 1e3:7.2f} {med_naive * 1e3:7.2f} {med_ours / med_naive:6.2f} "
                f"{m_ours / 2**20:9.1f} {m_naive / 2**20:9.1f} {m_ours / m_naive:6.2f}"
            )
            if device.type == "cuda":
                p_ours, p_naive = peak_cuda_bytes(ours, inputs, device), peak_cuda_bytes(naive, inputs, device)
                line += f" {p_ours / 2**20:9.1f} {p_naive / 2**20:9.1f} {p_ours / p_naive:10.2f}"
                row["peak_ratio"] = p_ours / p_naive
            if args.compile and section == "naive reference":
                compiled = torch.compile(ours, fullgraph=True)
                with torch.no_grad():
                    torch.testing.assert_close(compiled(), ours(), rtol=1e-4, atol=1e-5)
                times_compiled, times_eager = time_pair(compiled, ours, inputs, device, args.repeats, args.warmup)
                line += f" {min(times_compiled) * 1e3:11.2f} {min(times_eager) / min(times_compiled):8.2f}"
                row["compiled_ms"] = min(times_compiled) * 1e3
                row["compiled_speedup"] = min(times_eager) / min(times_compiled)
            print(line, flush=True)
            rows.append(row)
            if section == "naive reference":
                figure_rows.append(
                    {
                        "device": device.type,
                        "size": [b, k, h, w],
                        "old": n_old,
                        "loss": name,
                        "time_ratio": round(t_ours / t_naive, 3),
                        "memory_ratio": round(m_ours / m_naive, 3),
                        "ms": round(t_ours * 1e3, 3),
                        "naive_ms": round(t_naive * 1e3, 3),
                    }
                )
    save_rows("bench_losses", figure_rows, key=("device", "size", "old", "loss"))
    print("ratios are incseg / reference (below 1: incseg is faster or saves less for backward); 'saved MiB'")
    print("counts the tensors autograd keeps for backward beyond the inputs themselves; 'speed-up' is eager /")
    print("torch.compile(fullgraph=True) of the incseg loss.")
    if device.type != "cuda":
        print("peak memory: not measured on CPU (no allocator statistics); use 'saved MiB' there.")
    if args.json:
        setting = {
            "device": str(device),
            "B": b,
            "K": k,
            "H": h,
            "W": w,
            "n_old": n_old,
            "threads": torch.get_num_threads(),
        }
        write_json(args.json, {"benchmark": "losses", "setting": setting, "rows": rows})


def write_json(path: str, payload: dict[str, object]) -> None:
    """Write ``payload`` (plus the torch version) as indented JSON to ``path``."""
    import json
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**payload, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
