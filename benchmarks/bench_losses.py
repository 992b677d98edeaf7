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

With ``--mib-loss PATH`` a second table times the unbiased CE + unbiased KD pair (the loss of every MiB/CAF
step, ``L_SEG + λ L_D``) against MiB's official losses, imported from the file MiB publishes
(github.com/fcdl94/MiB, ``utils/loss.py``: ``UnbiasedCrossEntropy`` and ``UnbiasedKnowledgeDistillationLoss``,
reduction ``"mean"``), not a copy: its path, SHA-256 and git commit are printed. incseg's side is the separate
modules, the functionals and ``CAFLoss(kd="unbiased", ad=None)``. Each contender runs forward + backward once
per round, in an order that rotates from round to round, after the same warm-up rounds; a run is ``--rounds``
rounds and gives the ratio of the medians; ``--runs`` runs give the median and range of each ratio, at each
``--threads`` setting::

    git clone https://github.com/fcdl94/MiB /tmp/MiB
    python benchmarks/bench_losses.py --mib-only --mib-loss /tmp/MiB/utils/loss.py --size 4 21 256 256 \
        --old 16 --threads 2 16 --runs 5 --rounds 7 --validate
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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
from incseg.losses import CAFLoss, UnbiasedCrossEntropyLoss, UnbiasedKDLoss
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
# MiB's official losses, imported from the user's copy of MiB's code
# ---------------------------------------------------------------------------------------------------------------

MIB_URL = "https://github.com/fcdl94/MiB"


def load_mib_losses(path: str) -> tuple[ModuleType, str]:
    """Import MiB's ``utils/loss.py`` from ``path``; return the module and where it comes from (path, SHA-256,
    git commit and remote when the file is in a git checkout)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SystemExit(
            f"--mib-loss {path}: no such file. It is MiB's utils/loss.py: `git clone {MIB_URL} MiB` and pass "
            "--mib-loss MiB/utils/loss.py (the benchmark times MiB's own code, it does not ship a copy)."
        )
    spec = importlib.util.spec_from_file_location("mib_utils_loss", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # MiB's loss.py imports only torch
    missing = [n for n in ("UnbiasedCrossEntropy", "UnbiasedKnowledgeDistillationLoss") if not hasattr(module, n)]
    if missing:
        raise SystemExit(f"--mib-loss {path}: no {', '.join(missing)} in it; is it MiB's utils/loss.py?")
    provenance = f"{file.resolve()} (sha256 {hashlib.sha256(file.read_bytes()).hexdigest()[:16]}"

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(file.parent), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("log", "-1", "--format=%H", "--", file.name)
    if commit:
        changed = " + local changes" if git("status", "--porcelain", "--", file.name) else ""
        provenance += f", git {commit[:12]}{changed} of {git('remote', 'get-url', 'origin') or 'a local repository'}"
    return module, provenance + ")"


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


def time_rounds(
    fns: dict[str, Callable[[], Tensor]], inputs: dict, device: torch.device, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of one forward + backward of each contender in each of ``rounds`` rounds (after ``warmup``
    rounds, the same for all). Each round runs every contender once; the order rotates by one from round to
    round, so that each contender takes each place as often as the others (none always follows the same one)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(warmup + rounds):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            fns[name]().backward()
            _sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
            _zero_grads(inputs)
    return times


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def mib_section(args: argparse.Namespace, inputs: dict, device: torch.device, threads: int) -> list[dict[str, object]]:
    """The unbiased CE + KD pair against MiB's official losses: median and range of each ratio over the runs."""
    mib, provenance = load_mib_losses(args.mib_loss)
    logits, labels, old_logits = inputs["logits"], inputs["labels"], inputs["old_logits"]
    n_old, lam = old_logits.shape[1], args.lambda_d
    mib_ce = mib.UnbiasedCrossEntropy(old_cl=n_old, ignore_index=255, reduction="mean")
    mib_kd = mib.UnbiasedKnowledgeDistillationLoss(reduction="mean", alpha=1.0)
    ce, kd = UnbiasedCrossEntropyLoss(n_old), UnbiasedKDLoss()
    caf = CAFLoss(None, None, kd="unbiased", ad=None, lambda_d=lam)
    fns: dict[str, Callable[[], Tensor]] = {
        "MiB": lambda: mib_ce(logits, labels) + lam * mib_kd(logits, old_logits),
        "modules": lambda: ce(logits, labels) + lam * kd(logits, old_logits),
        "functionals": lambda: (
            unbiased_cross_entropy(logits, labels, n_old) + lam * unbiased_kd_loss(logits, old_logits)
        ),
        "CAFLoss": lambda: caf(logits, labels, num_old_classes=n_old, old_logits=old_logits).loss,
    }
    with torch.no_grad():
        values = {name: fn() for name, fn in fns.items()}
    tol = 1e-5 if logits.dtype == torch.float32 else 2e-2  # incseg computes in float32, MiB in the input's dtype
    for name, value in values.items():  # every contender computes MiB's loss
        torch.testing.assert_close(value.float(), values["MiB"].float(), rtol=tol, atol=tol, msg=f"{name} != MiB")
    b, k, h, w = logits.shape
    cores = os.cpu_count()
    note = f" (more than the machine's {cores} cores: oversubscribed)" if cores and threads > cores else ""
    print(f"-- the unbiased CE + {lam:g} x unbiased KD pair against MiB's official losses (MiB = 1)")
    print(f"   MiB's code: {provenance}")
    print(
        f"   device={device} B={b} K={k} H={h} W={w} n_old={n_old} threads={threads}{note} value checks "
        f"{'on' if args.validate else 'off'}; loss {values['MiB'].item():.6f} on every side; forward + backward, "
        f"{args.runs} runs of {args.rounds} interleaved rounds (order rotating, {args.warmup} warm-up rounds)"
    )
    ratios: dict[str, list[float]] = {}
    for run in range(args.runs):
        times = time_rounds(fns, inputs, device, args.rounds, args.warmup)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in ("modules", "functionals", "CAFLoss"):
            ratios.setdefault(f"{name} / MiB", []).append(med[name] / med["MiB"])
        for name in ("modules", "functionals"):
            ratios.setdefault(f"{name} / CAFLoss", []).append(med[name] / med["CAFLoss"])
        print(
            f"   run {run + 1}: MiB {med['MiB'] * 1e3:.1f} ms; "
            + ", ".join(f"{name} {values[-1]:.2f}" for name, values in ratios.items()),
            flush=True,
        )
    print(f"   {'ratio of median times':24s} median (range) over {args.runs} runs")
    rows: list[dict[str, object]] = []
    for name, values in ratios.items():
        print(f"   {name:24s} {_spread(values)}")
        rows.append(
            {
                "loss": f"CE + unbiased KD ({name.split(' / ')[0]})",
                "reference": "MiB's official losses" if name.endswith("MiB") else "CAFLoss(kd='unbiased', ad=None)",
                "ratio": statistics.median(values),
                "ratio_min": min(values),
                "ratio_max": max(values),
                "runs": [round(v, 4) for v in values],
                "threads": threads,
                "mib_code": provenance,
            }
        )
    return rows


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
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="torch CPU threads (0: leave as is); several values: the MiB table at each, the naive "
                        "table at the first")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) of each loss")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--mib-loss", metavar="PATH", help=f"MiB's utils/loss.py (from {MIB_URL}): time it too")
    parser.add_argument("--mib-only", action="store_true", help="only the table against MiB's losses")
    parser.add_argument("--lambda-d", type=float, default=10.0, help="weight of the KD term in the MiB table (10)")
    parser.add_argument("--runs", type=int, default=5, help="runs of the MiB table (default 5)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per run of the MiB table (7)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the logits and old logits (as autocast gives them; float32)")  # fmt: skip
    parser.add_argument(
        "--validate",
        action="store_true",
        help="keep incseg's input value checks on (default off, as on GPU; the naive references check nothing)",
    )
    args = parser.parse_args()
    incseg.set_validate_values(True if args.validate else False)
    if args.mib_only and not args.mib_loss:
        parser.error(f"--mib-only needs --mib-loss PATH to MiB's utils/loss.py (git clone {MIB_URL})")

    if args.threads[0]:
        torch.set_num_threads(args.threads[0])
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    b, k, h, w = args.size
    n_old = args.old
    cz, ch, s = args.feat
    logits = torch.randn(b, k, h, w, device=device).to(dtype).requires_grad_(True)
    old_logits = torch.randn(b, n_old, h, w, device=device).to(dtype)
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

    rows: list[dict[str, object]] = []
    if not args.mib_only:
        rows += naive_section(args, pairs, inputs, device, figure_key=[b, k, h, w])
    for threads in args.threads if args.mib_loss else []:
        if threads:
            torch.set_num_threads(threads)
        rows += mib_section(args, inputs, device, torch.get_num_threads())
    if args.json:
        setting = {
            "device": str(device),
            "B": b,
            "K": k,
            "H": h,
            "W": w,
            "n_old": n_old,
            "dtype": args.dtype,
            "threads": args.threads,
            "value_checks": bool(args.validate),
        }
        write_json(args.json, {"benchmark": "losses", "setting": setting, "rows": rows})


def naive_section(
    args: argparse.Namespace,
    pairs: list[tuple[str, Callable[[], Tensor], Callable[[], Tensor]]],
    inputs: dict,
    device: torch.device,
    figure_key: list[int],
) -> list[dict[str, object]]:
    """Each loss against its naive reference: best and median time, memory kept for backward."""
    b, k, h, w = figure_key
    n_old = inputs["old_logits"].shape[1]
    cz, ch, s = args.feat
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
    for section, section_pairs in (("naive reference", pairs),):
        print(f"-- against the {section}")
        print(header)
        for name, ours, naive in section_pairs:
            with torch.no_grad():
                tol = 1e-4 if inputs["logits"].dtype == torch.float32 else 2e-2  # naive: in the input's dtype
                torch.testing.assert_close(ours().float(), naive().float(), rtol=tol, atol=tol)  # the same loss
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
    return rows


def write_json(path: str, payload: dict[str, object]) -> None:
    """Write ``payload`` (plus the torch version) as indented JSON to ``path``."""
    import json
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**payload, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
