"""An independent check through the public API: a plain conv network, data of its own, a plain PyTorch loop.

Nothing here comes from the library but the API a user calls: the network is by default ``plain`` of
``benchmarks/_networks.py``, a single-scale conv net (6 conv-BN-ReLU encoder blocks to 128 channels at output
stride 8, a 2-block refiner, a 1x1 classifier, no skip connections) adapted with ``from_named_submodules``
(``--network`` picks another network of that file); the scenes come from a generator of this file (ellipses and
rectangles of a class colour with class-dependent stripes, unlike the built-in synthetic benchmark); the loop
calls ``begin_step`` and ``end_step`` with the step's batches, ``param_groups``, ``training_step``, an SGD step
and ``predict``. Step 0 is trained with the method itself (at step 0 every CAF-family method is cross-entropy),
on the same random stream (the generator state is restored after the learner is built), so every run of a seed
starts step 1 from the same weights. Each run prints and appends to ``--out`` the mIoU (%)
after the last step: old = classes of step 0, new = the later ones, background excluded.

    python benchmarks/plain_check.py --methods mib caf --seeds 0 1                 # 15-5 disjoint
    python benchmarks/plain_check.py --methods caf:ad_on_new=False,ad_balance=0.1 --task 15-1
    python benchmarks/plain_check.py --methods mib --seeds 0 --perturb 1e-7 --perturb-seeds 1 2 3

``--perturb`` multiplies every initial weight by ``1 + eps * N(0, 1)``: the spread it gives is what float32
rounding alone does to a result (docs/protocol.md, "Baseline reproducibility").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from incseg.learner import IncrementalLearner
from incseg.metrics import MeanIoU
from incseg.scenarios import Scenario, get_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _networks import NETWORKS
from robustness import parse_method

NUM_CLASSES = 21  # background + 20, as Pascal VOC


def scenes(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` images with 1-3 objects each; a class's colour and stripes are the same in every split."""
    g = torch.Generator().manual_seed(7)
    palette = torch.rand(NUM_CLASSES, 3, generator=g)
    freq = torch.randint(1, 5, (NUM_CLASSES,), generator=g)
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.empty(n, 3, size, size), torch.zeros(n, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        img = 0.3 + 0.2 * torch.rand(3, 1, 1, generator=g) + 0.1 * torch.randn(3, size, size, generator=g)
        lab = torch.zeros(size, size, dtype=torch.long)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            c = int(torch.randint(1, NUM_CLASSES, (1,), generator=g))
            cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
            ry, rx = torch.randint(6, size // 3, (2,), generator=g).tolist()
            if c % 2:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            stripes = torch.sin((xx + yy) * math.pi * int(freq[c]) / 8)
            texture = palette[c][:, None, None] * (0.8 + 0.2 * stripes) + 0.05 * torch.randn(3, size, size, generator=g)
            img = torch.where(mask, texture, img)
            lab[mask] = c
        images[i], labels[i] = img, lab
    return images, labels


def step_data(images: Tensor, labels: Tensor, scenario: Scenario, step: int, train: bool) -> tuple[Tensor, Tensor]:
    """The scenario's selection and labels of a step, in dataset ids (the scenario's class order is the identity)."""
    seen, current = set(scenario.seen_at(step)), set(scenario.classes_at(step))
    keep, out = [], []
    for i in range(len(images)):
        present = set(labels[i].unique().tolist()) - {0}
        lab = labels[i].clone()
        if train:
            future = not present <= seen
            if not present & current or (future and scenario.mode == "disjoint"):
                continue
            lab[~torch.isin(lab, torch.tensor(sorted(current | {0})))] = 0
        else:
            lab[~torch.isin(lab, torch.tensor(sorted(seen | {0})))] = 255
        keep.append(i)
        out.append(lab)
    return images[keep], torch.stack(out)


def evaluate(learner: IncrementalLearner, images: Tensor, labels: Tensor, scenario: Scenario, **kw: Any) -> dict:
    metric = MeanIoU(scenario.num_classes_at(scenario.num_steps - 1), num_old_classes=scenario.num_classes_at(0))
    with torch.no_grad():
        for b in range(0, len(images), 64):
            metric.update(learner.predict(images[b : b + 64], **kw), labels[b : b + 64])
    groups = metric.compute().groups
    return {k: round(100 * groups[k], 2) for k in ("old", "new", "all")}


def run(args: argparse.Namespace, text: str, seed: int, perturb_seed: int | None) -> dict[str, Any]:
    method, overrides = parse_method(text)
    torch.manual_seed(seed)
    scenario = get_scenario("voc", args.task, mode=args.mode)  # VOC's class ids and order, our own images
    train_x, train_y = scenes(args.images, args.size, 1000 + seed)
    test_x, test_y = scenes(args.images // 4, args.size, 2000 + seed)
    model = NETWORKS[args.network](scenario.num_classes_at(0))
    if perturb_seed is not None:
        g = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + args.perturb * torch.randn(p.shape, generator=g))
    # The learner may draw random numbers (the SE blocks of attentive distillation): step 0 must see the same random
    # stream (dropout) with every method, so that every run of a seed starts step 1 from the same weights.
    state = torch.get_rng_state()
    learner = IncrementalLearner(model, scenario, method, **overrides)
    torch.set_rng_state(state)
    t0 = time.monotonic()
    stats: dict[str, list[float]] = {}
    for step in range(scenario.num_steps):
        x, y = step_data(train_x, train_y, scenario, step, train=True)
        batches = [(x[b : b + args.batch_size], y[b : b + args.batch_size]) for b in range(0, len(x), args.batch_size)]
        learner.begin_step(step, data=batches)  # methods that calibrate on the step's data (PLOP) get it
        lr = args.lr0 if step == 0 else args.lr_next
        optimizer = torch.optim.SGD(learner.param_groups(lr), lr=lr, momentum=0.9)
        g = torch.Generator().manual_seed(1000 * seed + step)
        for _ in range(args.epochs0 if step == 0 else args.epochs_next):
            order = torch.randperm(len(x), generator=g)
            for b in range(len(x) // args.batch_size):
                idx = order[b * args.batch_size : (b + 1) * args.batch_size]
                out = learner.training_step(x[idx], y[idx])
                for key, value in out.stats.items():
                    stats.setdefault(key, []).append(float(value))
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
        learner.end_step(data=batches)  # methods that consolidate on the step's data (STAR's prototypes) get it
    last = scenario.num_steps - 1
    x, y = step_data(test_x, test_y, scenario, last, train=False)
    row: dict[str, Any] = {"network": args.network, "method": text, "task": args.task, "mode": args.mode, "seed": seed}
    if perturb_seed is not None:
        row.update(perturb=args.perturb, perturb_seed=perturb_seed)
    row.update(evaluate(learner, x, y, scenario))
    if learner.model.fusion is not None:
        row["concat_all"] = evaluate(learner, x, y, scenario, strategy="concat")["all"]
    row.update({key: round(sum(v) / len(v), 4) for key, v in stats.items()})  # means over the steps > 0
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def table(paths: list[Path]) -> str:
    """Markdown table of rows from ``--out`` files: per network, task and method, old / new / all mIoU per seed,
    and against MiB of the same seed: the new-class ratio and the old- and all-class differences."""
    unique: dict[tuple[Any, ...], dict[str, Any]] = {}  # one row per run (files may repeat runs)
    for p in paths:
        for r in json.loads(p.read_text()):
            if "perturb" not in r:
                unique.setdefault((r["network"], r["task"], r["mode"], r["method"], r["seed"]), r)
    rows = list(unique.values())
    mib = {(r["network"], r["task"], r["mode"], r["seed"]): r for r in rows if r["method"] == "mib"}
    lines = [
        "| network | task | method | old / new / all (per seed) | new / MiB's | old - MiB's | all - MiB's "
        "| skip - concat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["network"], r["task"], r["mode"], r["method"]) for r in rows))
    for network, task, mode, method in keys:
        runs = [r for r in rows if (r["network"], r["task"], r["mode"], r["method"]) == (network, task, mode, method)]
        runs.sort(key=lambda r: r["seed"])
        cells = "; ".join(f"{r['old']:.1f} / {r['new']:.1f} / {r['all']:.1f}" for r in runs)
        ref = [mib.get((network, task, mode, r["seed"])) for r in runs]
        pairs = [(r, m) for r, m in zip(runs, ref) if m is not None and method != "mib"]
        ratio = ", ".join(f"{r['new'] / m['new']:.2f}" if m["new"] else "-" for r, m in pairs)
        old = ", ".join(f"{r['old'] - m['old']:+.1f}" for r, m in pairs)
        all_ = ", ".join(f"{r['all'] - m['all']:+.1f}" for r, m in pairs)
        skip = ", ".join(f"{r['all'] - r['concat_all']:+.1f}" for r in runs if "concat_all" in r)
        task_name = task if mode == "disjoint" else f"{task} ov."
        lines.append(f"| {network} | {task_name} | `{method}` | {cells} | {ratio} | {old} | {all_} | {skip} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="plain", choices=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", default=["mib", "caf"], help="method[:field=value,...]")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--task", default="15-5")
    parser.add_argument("--mode", default="disjoint", choices=["disjoint", "overlapped"])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs0", type=int, default=6)
    parser.add_argument("--epochs-next", type=int, default=12)
    parser.add_argument("--lr0", type=float, default=0.05)
    parser.add_argument("--lr-next", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--perturb", type=float, default=0.0, help="relative noise on the initial weights")
    parser.add_argument("--perturb-seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="append the rows to this JSON file")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="print the markdown table of JSON files")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    perturbations: list[int | None] = list(args.perturb_seeds) if args.perturb else [None]
    for seed in args.seeds:
        for text in args.methods:
            for ps in perturbations:
                row = run(args, text, seed, ps)
                print(json.dumps(row), flush=True)
                if args.out is not None:
                    rows = json.loads(args.out.read_text()) if args.out.exists() else []
                    args.out.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
