"""Issue 22 probe of DKD on plain_check's data: per-iteration loss terms, gradient norms per part, new rows.

The measurements of docs/lab-notebook.md ("DKD under a short generic schedule"); step-0 weights are cached in
/tmp/dkd2-cache. Example: ``python benchmarks/dkd_probe.py --steps 2 --learner-groups --per-step``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _networks import NETWORKS
from plain_check import evaluate, scenes, step_data
from robustness import parse_method

from incseg.learner import IncrementalLearner
from incseg.scenarios import get_scenario

CACHE = Path("/tmp/dkd2-cache")
CACHE.mkdir(exist_ok=True)


def groups(learner: IncrementalLearner) -> dict[str, float]:
    sq: dict[str, float] = {}
    for name, p in learner.module.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("model.classifier."):
            head = int(name.split(".")[3])
            if head == 0:
                g = p.grad
                sq["aux"] = sq.get("aux", 0.0) + float(g[:1].pow(2).sum())
                sq["old_rows"] = sq.get("old_rows", 0.0) + float(g[1:].pow(2).sum())
                continue
            key = "new_rows" if head == len(learner.model.classifier.heads) - 1 else "old_rows"
        elif p.ndim == 1:
            key = "bn"
        else:
            key = "conv"
        sq[key] = sq.get(key, 0.0) + float(p.grad.pow(2).sum())
    return {f"g_{k}": v**0.5 for k, v in sq.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="15-1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--network", default="plain")
    ap.add_argument("--step0", default="dkd")
    ap.add_argument("--method", default="dkd")
    ap.add_argument("--steps", type=int, default=2, help="number of steps to run (2 = step 0 and step 1)")
    ap.add_argument("--lr0", type=float, default=0.05)
    ap.add_argument("--lr-next", type=float, default=0.01)
    ap.add_argument("--epochs0", type=int, default=6)
    ap.add_argument("--epochs-next", type=int, default=12)
    ap.add_argument("--head-mult", type=float, default=1.0)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--per-step", action="store_true")
    ap.add_argument("--prior0", type=float, default=None)
    ap.add_argument("--ref-mult-next", type=float, default=1.0)
    ap.add_argument("--learner-groups", action="store_true")
    ap.add_argument("--enc-mult", type=float, default=1.0, help="encoder lr factor at every step")
    ap.add_argument("--enc-mult-next", type=float, default=None, help="encoder lr factor at steps > 0")
    ap.add_argument("--release-wd", action="store_true", help="wd 0 at steps > 0 but the new head")
    ap.add_argument("--freeze-affine", action="store_true", help="BN affine not trained at steps > 0")
    ap.add_argument("--mode", default="disjoint")
    ap.add_argument("--prior", type=float, default=None, help="new rows: weight 0, bias logit(prior)")
    ap.add_argument("--eval-step0", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seed = args.seed
    torch.manual_seed(seed)
    scenario = get_scenario("voc", args.task, mode=args.mode)
    train_x, train_y = scenes(600, 64, 1000 + seed)
    test_x, test_y = scenes(150, 64, 2000 + seed)
    model = NETWORKS[args.network](scenario.num_classes_at(0))
    method, overrides = parse_method(args.method)
    learner = IncrementalLearner(model, scenario, method, **overrides)
    key = (
        CACHE / f"{args.network}-{args.task}-{args.mode}-{seed}-{args.step0}-{args.lr0}-{args.epochs0}-"
        f"{args.enc_mult}-{args.prior0}.pt"
    )
    t0 = time.monotonic()
    for step in range(args.steps):
        learner.begin_step(step)
        if step == 0 and key.exists():
            learner.model.load_state_dict(torch.load(key))
            learner.end_step()
            continue
        if step == 0 and args.step0 != args.method:
            raise SystemExit("step 0 not cached: run with --method equal to --step0 first")
        lr = args.lr0 if step == 0 else args.lr_next
        if step == 0 and args.prior0 is not None:
            import math

            with torch.no_grad():
                learner.model.classifier.head(0).bias.fill_(math.log(args.prior0 / (1 - args.prior0)))
        if step > 0 and args.prior is not None:
            import math

            with torch.no_grad():
                hd = learner.model.classifier.head(step)
                hd.weight.zero_()
                hd.bias.fill_(math.log(args.prior / (1 - args.prior)))
        if step > 0 and args.freeze_affine:
            for mod in learner.model.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.requires_grad_(False)
        em = args.enc_mult if step == 0 or args.enc_mult_next is None else args.enc_mult_next
        pg = []
        for name, p in learner.module.named_parameters():
            if not p.requires_grad:
                continue
            f = (
                em
                if name.startswith("model.encoder.")
                else (args.head_mult if name.startswith("model.classifier.") else 1.0)
            )
            if step > 0 and name.startswith("model.refiner."):
                f = args.ref_mult_next
            wd = args.wd
            if step > 0 and args.release_wd and not name.startswith(f"model.classifier.heads.{step}."):
                wd = 0.0
            pg.append({"params": [p], "lr": lr * f, "weight_decay": wd})
        if args.learner_groups:
            pg = learner.param_groups(lr, weight_decay=args.wd)
        optimizer = torch.optim.SGD(pg, lr=lr, momentum=0.9)
        x, y = step_data(train_x, train_y, scenario, step, train=True)
        g = torch.Generator().manual_seed(1000 * seed + step)
        n_old = scenario.num_old_classes(step)
        it = 0
        for _ in range(args.epochs0 if step == 0 else args.epochs_next):
            order = torch.randperm(len(x), generator=g)
            for b in range(len(x) // 32):
                idx = order[b * 32 : (b + 1) * 32]
                out = learner.training_step(x[idx], y[idx])
                optimizer.zero_grad()
                out.loss.backward()
                rec = {"step": step, "it": it, **{k: round(float(v), 4) for k, v in out.terms.items()}}
                rec.update({k: round(v, 4) for k, v in groups(learner).items()})
                with torch.no_grad():
                    clf = learner.model.classifier
                    rec["aux_b"] = round(float(clf.head(0).bias[0]), 3)
                    if step > 0:
                        logits = learner.predict(x[idx])
                        pred = logits.argmax(1)
                        lab = y[idx]
                        newpix = lab >= n_old
                        newpix &= lab != 255
                        rec["new_bias"] = round(float(clf.head(step).bias.mean()), 3)
                        rec["frac_new_pred"] = round(float((pred >= n_old).float().mean()), 4)
                        rec["recall_new"] = (
                            round(float((pred[newpix] >= n_old).float().mean()), 4) if newpix.any() else None
                        )
                if step > 0 or not args.quiet:
                    print(json.dumps(rec), flush=True)
                optimizer.step()
                it += 1
        learner.end_step()
        if step == 0:
            torch.save(learner.model.state_dict(), key)
        if step > 0 and args.per_step:
            xt, yt = step_data(test_x, test_y, scenario, step, train=False)
            with torch.no_grad():
                pr = torch.cat([learner.predict(xt[b : b + 64]).argmax(1) for b in range(0, len(xt), 64)])
            k0 = scenario.num_classes_at(0)
            oldpix = (yt >= 1) & (yt < k0)
            nn_ = scenario.num_classes_at(step)
            from incseg.metrics import MeanIoU

            m = MeanIoU(nn_, num_old_classes=k0)
            m.update(torch.nn.functional.one_hot(pr, nn_).permute(0, 3, 1, 2).float(), yt)
            gr = m.compute().groups
            print(
                "STEP",
                step,
                json.dumps(
                    {
                        "old": round(100 * gr["old"], 1),
                        "new": round(100 * gr["new"], 1),
                        "oldpix->bg": round(float((pr[oldpix] == 0).float().mean()), 3),
                        "oldpix->new": round(float((pr[oldpix] >= k0).float().mean()), 3),
                        "oldpix->right": round(float((pr[oldpix] == yt[oldpix]).float().mean()), 3),
                        "bgpix->fg": round(float((pr[yt == 0] > 0).float().mean()), 3),
                    }
                ),
                flush=True,
            )
    # raw logits of new rows on new-class test pixels
    last = args.steps - 1
    if args.eval_step0 or last > 0:
        sc = scenario
        xt, yt = step_data(test_x, test_y, sc, last, train=False)
        metric = evaluate(learner, xt, yt, sc) if last == sc.num_steps - 1 else None
        with torch.no_grad():
            learner.model.eval()
            logits = learner.predict(xt[:64])
            lab = yt[:64]
            n_old = sc.num_old_classes(last) if last > 0 else 1
            nl = logits[:, n_old:]
            print(
                "new-row logit max",
                float(nl.max()) if nl.numel() else None,
                "on new pixels mean",
                float(nl.max(1).values[lab >= n_old].mean()) if last > 0 else None,
            )
        from incseg.metrics import MeanIoU

        m = MeanIoU(sc.num_classes_at(last), num_old_classes=sc.num_classes_at(0))
        with torch.no_grad():
            for b in range(0, len(xt), 64):
                m.update(learner.predict(xt[b : b + 64]), yt[b : b + 64])
        res = m.compute()
        print(
            "RESULT",
            json.dumps(
                {
                    "method": args.method,
                    "step": last,
                    "final": metric,
                    "groups": {k: round(100 * v, 2) for k, v in res.groups.items()},
                    "seconds": round(time.monotonic() - t0, 1),
                }
            ),
        )


if __name__ == "__main__":
    main()
