"""Time incseg's losses against naive references written from the equations (a script, not a test).

Each pair runs forward + backward on the same inputs. The naive references do what the paper writes:
probabilities with ``softmax``, aggregated sums of probabilities, then ``log`` (no shared ``logsumexp``).

Memory: on CUDA the peak is ``torch.cuda.max_memory_allocated`` over one forward + backward; on every device
the script also reports the bytes of the tensors autograd saves for backward (collected with
``torch.autograd.graph.saved_tensors_hooks``, counted once per storage), a device-independent estimate of
the activation memory a loss adds to a training step. CPU peak memory is not measured.

Usage::

    python benchmarks/bench_losses.py                     # B=4, K=21, H=W=128 on CPU
    python benchmarks/bench_losses.py --device cuda --size 4 21 512 512 --old 16

Each run adds its rows to benchmarks/results/bench_losses.json (docs/figures/make_figures.py plots them).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
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

    print(
        f"device={device} B={b} K={k} H={h} W={w} n_old={n_old} features z/h=({cz},{ch},{s},{s}) "
        f"threads={torch.get_num_threads()} torch={torch.__version__}; forward+backward, best and median of "
        f"{args.repeats}"
    )
    header = f"{'loss':28s} {'best ms':>9s} {'naive':>9s} {'ratio':>6s} {'median':>7s} {'naive':>7s} {'ratio':>6s}"
    header += f" {'saved MiB':>9s} {'naive':>9s} {'ratio':>6s}"
    if device.type == "cuda":
        header += f" {'peak MiB':>9s} {'naive pk':>9s} {'peak ratio':>10s}"
    print(header)
    rows = []
    for name, ours, naive in pairs:
        with torch.no_grad():
            torch.testing.assert_close(ours(), naive(), rtol=1e-4, atol=1e-5)  # both compute the same loss
        times_ours, times_naive = time_pair(ours, naive, inputs, device, args.repeats, args.warmup)
        t_ours, t_naive = min(times_ours), min(times_naive)
        med_ours, med_naive = statistics.median(times_ours), statistics.median(times_naive)
        m_ours, m_naive = saved_bytes(ours, inputs), saved_bytes(naive, inputs)
        line = (
            f"{name:28s} {t_ours * 1e3:9.2f} {t_naive * 1e3:9.2f} {t_ours / t_naive:6.2f} "
            f"{med_ours * 1e3:7.2f} {med_naive * 1e3:7.2f} {med_ours / med_naive:6.2f} "
            f"{m_ours / 2**20:9.1f} {m_naive / 2**20:9.1f} {m_ours / m_naive:6.2f}"
        )
        if device.type == "cuda":
            p_ours, p_naive = peak_cuda_bytes(ours, inputs, device), peak_cuda_bytes(naive, inputs, device)
            line += f" {p_ours / 2**20:9.1f} {p_naive / 2**20:9.1f} {p_ours / p_naive:10.2f}"
        print(line)
        rows.append(
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
    save_rows("bench_losses", rows, key=("device", "size", "old", "loss"))
    print("ratios are incseg / naive (below 1: incseg is faster or saves less for backward); 'saved MiB' counts")
    print("the tensors autograd keeps for backward beyond the inputs themselves.")
    if device.type != "cuda":
        print("peak memory: not measured on CPU (no allocator statistics); use 'saved MiB' there.")


if __name__ == "__main__":
    main()
