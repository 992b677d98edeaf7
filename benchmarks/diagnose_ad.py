"""Per-term gradient norms per parameter group over the first iterations of step 1 (a script, not a test).

Trains step 0 of synthetic 15-5 disjoint briefly (cached), then runs the first iterations of step 1 with a
method and prints, per iteration, each weighted loss term and the gradient norm it alone puts on each parameter
group (backbone, head, caf, criterion), plus the AD term's floor at the teacher's weights in train mode:

    python benchmarks/diagnose_ad.py --network small --runs caf-paper caf --iters 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _networks import NETWORKS, build_network

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform, TrainTransform
from incseg.engine import TrainConfig, train_scenario
from incseg.learner import IncrementalLearner
from incseg.scenarios import get_scenario


def _parse_run(text: str) -> tuple[str, dict[str, Any]]:
    method, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = float(value)
        except ValueError:
            overrides[key] = {"True": True, "False": False, "None": None}.get(value, value)
    return method, overrides


def _terms(learner: IncrementalLearner, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each weighted term of the loss with its graph (the criterion run with one term switched on at a time)."""
    teacher = learner.teacher_forward(images)
    assert teacher is not None
    model, crit, n_old = learner.model, learner.criterion, learner.num_old_classes
    out = model.forward_features(images, teacher["z"] if model.fusion is not None else None)
    kd, ad_loss = crit.kd, crit.ad_loss
    feats = {"z": out["z_bar"], "h": out["h"]}, {"z": teacher["z_bar"], "h": teacher["h"]}
    try:
        crit.kd, crit.ad_loss = None, None
        seg = crit(out["logits"], labels, num_old_classes=n_old).loss
        terms = {"seg": seg}
        if kd is not None:
            crit.kd = kd
            terms["kd"] = crit(out["logits"], labels, num_old_classes=n_old, old_logits=teacher["logits"]).loss - seg
            crit.kd = None
        if ad_loss is not None:
            crit.ad_loss = ad_loss
            full = crit(out["logits"], labels, num_old_classes=n_old, features=feats[0], old_features=feats[1])
            terms["ad"] = full.loss - seg
    finally:
        crit.kd, crit.ad_loss = kd, ad_loss
    return terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=list(NETWORKS), default="small")
    parser.add_argument("--runs", nargs="+", default=["caf-paper", "caf"])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of step 1")
    parser.add_argument("--epochs0", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("runs/diagnose"))
    args = parser.parse_args()

    scenario = get_scenario("synthetic", "15-5", mode="disjoint")
    train_src = SyntheticScenes("train", num_images=600, seed=args.seed)
    test_src = SyntheticScenes("val", num_images=50, seed=args.seed)
    tf = TrainTransform(crop_size=train_src.size, scale=(0.75, 1.25))

    def datasets(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        return (
            IncrementalSegmentation(train_src, scenario, step, train=True, transform=tf),
            IncrementalSegmentation(test_src, scenario, step, train=False, transform=TestTransform(size=None)),
        )

    k0 = scenario.num_classes_at(0)
    cached = args.cache / f"{args.network}-seed{args.seed}-step0.pt"
    if not cached.exists():
        base = IncrementalLearner(build_network(args.network, k0, args.seed), scenario, "ft")
        cfg = TrainConfig(epochs=args.epochs0, batch_size=args.batch_size, lr=0.05, seed=args.seed, progress=False)
        train_scenario(base, datasets, cfg, device=torch.device("cpu"), steps=range(1), log=print)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.model.state_dict(), cached)
    state = torch.load(cached, weights_only=True)
    train_set = datasets(1)[0]
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_set), generator=g)[: args.iters * args.batch_size].tolist()
    batches = [
        tuple(torch.stack(t) for t in zip(*[train_set[i] for i in order[b : b + args.batch_size]]))
        for b in range(0, len(order), args.batch_size)
    ]
    for text in args.runs:
        method, overrides = _parse_run(text)
        model = build_network(args.network, k0, args.seed)
        model.load_state_dict(state)
        learner = IncrementalLearner(model, scenario, method, **overrides)
        learner.begin_step(0)
        learner.end_step()
        torch.manual_seed(args.seed)
        learner.begin_step(1)
        groups = learner.param_groups(args.lr)
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
        learner.module.train()
        print(f"\n== {args.network} {text} (lr {args.lr}) ==")
        print(f"{'it':>3} " + " ".join(f"{k:>9}" for k in ("seg", "kd", "ad", "total")) + "  |grad| per group by term")
        for it, (images, labels) in enumerate(batches):
            try:
                out = learner.training_step(images, labels)
            except Exception as err:  # non-finite logits refused by the loss: diverged
                print(f"   {type(err).__name__}: {str(err)[:120]}: stop")
                break
            parts = _terms(learner, images, labels)
            norms: dict[str, str] = {}
            for name, term in parts.items():
                if not term.requires_grad:
                    continue
                grads = torch.autograd.grad(
                    term, [p for gr in groups for p in gr["params"]], retain_graph=True, allow_unused=True
                )
                flat, j = [], 0
                for gr in groups:
                    n = len(gr["params"])
                    sq = sum(float(x.square().sum()) for x in grads[j : j + n] if x is not None)
                    flat.append(f"{gr['name']}={sq**0.5:.3g}")
                    j += n
                norms[name] = " ".join(flat)
            vals = " ".join(
                f"{float(out.terms.get(k, torch.tensor(float('nan')))):>9.4g}" for k in ("seg", "kd", "ad", "total")
            )
            print(f"{it:>3} {vals}  " + " | ".join(f"{k}: {v}" for k, v in norms.items()))
            if not torch.isfinite(out.loss):
                print("   non-finite loss: stop")
                break
            opt.zero_grad()
            out.loss.backward()
            opt.step()


if __name__ == "__main__":
    main()
