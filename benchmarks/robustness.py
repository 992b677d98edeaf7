"""Does one method configuration hold on every network? A networks x methods matrix (a script, not a test).

For every network and seed, step 0 (the 15 classes shared by 15-5 and 15-1 of the synthetic benchmark) is
trained once with plain fine-tuning; every method then learns the later steps from that same model, with the
library's defaults for the method and the same optimiser settings for all. Each cell reports mIoU (%) on the
last step's test set with the field's convention (old = the classes of step 0, new = all later classes,
background excluded), whether training diverged (a non-finite loss or weights), and for CAF methods the
``all`` mIoU with the ``skip`` and ``concat`` test strategies. Rows are appended to a JSON file as they finish,
so an interrupted run keeps its cells; ``--table`` prints the markdown table of docs/lab-notebook.md from the JSON.

    python benchmarks/robustness.py                                  # the full matrix (about 2 h on 2 cores)
    python benchmarks/robustness.py --networks small --seeds 0 --tasks 15-5 --methods mib caf
    python benchmarks/robustness.py --stability fcn_resnet50 deeplabv3_resnet101   # a few iterations each
    python benchmarks/robustness.py --table benchmarks/results/robustness*.json

A method is a preset of ``incseg.learner.METHODS``, optionally with ``:field=value,...`` overrides.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _networks import NETWORKS, build_network

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform, TrainTransform
from incseg.engine import TrainConfig, evaluate, train_scenario
from incseg.learner import IncrementalLearner
from incseg.scenarios import get_scenario

DEFAULT_METHODS = ["mib", "caf", "caf-paper"]


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    method, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        literal = {"None": None, "True": True, "False": False}
        if value in literal:
            overrides[key] = literal[value]
        else:
            try:
                overrides[key] = int(value) if key in ("caf_inner_channels", "ad_balance_every") else float(value)
            except ValueError:
                overrides[key] = value
    return method, overrides


def _finite_weights(learner: IncrementalLearner) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in learner.model.parameters())


def run_matrix(args: argparse.Namespace) -> None:
    out_path: Path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out_path.exists():
        for row in json.loads(out_path.read_text()):
            done.add((row["network"], row["method"], row["task"], row["seed"]))
    device = torch.device("cpu")
    for network in args.networks:
        for seed in args.seeds:
            train_src = SyntheticScenes("train", num_images=args.train_images, seed=seed)
            test_src = SyntheticScenes("val", num_images=args.val_images, seed=seed)
            train_tf = TrainTransform(crop_size=train_src.size, scale=(0.75, 1.25))
            test_tf = TestTransform(size=None)
            base_state = None
            for task in args.tasks:
                scenario = get_scenario("synthetic", task, mode=args.mode)
                k0 = scenario.num_classes_at(0)

                def datasets(
                    step: int, scenario=scenario, srcs=(train_src, test_src), tfs=(train_tf, test_tf)
                ) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
                    return (
                        IncrementalSegmentation(srcs[0], scenario, step, train=True, transform=tfs[0]),
                        IncrementalSegmentation(srcs[1], scenario, step, train=False, transform=tfs[1]),
                    )

                common = {"batch_size": args.batch_size, "lr": args.lr0, "lr_next": args.lr_next, "seed": seed}
                if base_state is None:
                    cache = args.cache / f"{network}-seed{seed}-n{args.train_images}-e{args.epochs0}-step0.pt"
                    if cache.exists():
                        base_state = torch.load(cache, weights_only=True)
                    else:
                        t0 = time.monotonic()
                        base = IncrementalLearner(build_network(network, k0, seed), scenario, "ft")
                        cfg = TrainConfig(epochs=args.epochs0, progress=False, **common)
                        train_scenario(base, datasets, cfg, device=device, steps=range(1), log=lambda _m: None)
                        base_state = base.model.state_dict()
                        cache.parent.mkdir(parents=True, exist_ok=True)
                        torch.save(base_state, cache)
                        print(f"[{network} seed {seed}] step 0 trained in {time.monotonic() - t0:.0f}s", flush=True)
                last = scenario.num_steps - 1
                final_test = datasets(last)[1]
                for text in args.methods:
                    if (network, text, task, seed) in done:
                        continue
                    method, overrides = parse_method(text)
                    model = build_network(network, k0, seed)
                    model.load_state_dict(base_state)
                    learner = IncrementalLearner(model, scenario, method, **overrides)
                    learner.begin_step(0)
                    learner.end_step()
                    t0 = time.monotonic()
                    cfg = TrainConfig(epochs=args.epochs_next, progress=False, nan_policy="stop", **common)
                    row: dict[str, Any] = {"network": network, "method": text, "task": task, "seed": seed}
                    try:
                        train_scenario(learner, datasets, cfg, device=device, steps=range(1, last + 1),
                                       log=lambda _m: None)  # fmt: skip
                        diverged = not _finite_weights(learner)
                        reason = "non-finite weights" if diverged else ""
                    except Exception as err:  # a divergence error of the loop or of the guard
                        diverged, reason = True, f"{type(err).__name__}: {str(err)[:200]}"
                    row.update(diverged=diverged, reason=reason, seconds=round(time.monotonic() - t0, 1))
                    if not diverged:
                        strategies = ["skip", "concat"] if learner.model.fusion is not None else [None]
                        for strategy in strategies:
                            result = evaluate(learner, final_test, device=device, batch_size=32, strategy=strategy)  # type: ignore[arg-type]
                            # evaluate's default split: old = the classes of step 0, new = all later ones
                            g = {k: 100 * result.groups[k] for k in ("old", "new", "all")}
                            if strategy in (None, learner.config.test_strategy):
                                row.update(g)
                            if strategy is not None:
                                row[f"{strategy}_all"] = g["all"]
                    rows = json.loads(out_path.read_text()) if out_path.exists() else []
                    rows.append(row)
                    out_path.write_text(json.dumps(rows, indent=1))
                    print(json.dumps(row), flush=True)


def _calibrate_batch_norm(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Running statistics of the final weights (cumulative averages over ``batches``), as at the end of a real
    step 0, whose learning rate decays to 0: a short warm-up at a constant rate leaves them lagging behind."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for images in batches:
            model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def run_stability(args: argparse.Namespace) -> None:
    """A few iterations of step 1 per network and method at the network's real size: does anything diverge?

    Step 0 first trains ``--stability-warmup`` iterations with plain fine-tuning, then its batch-norm running
    statistics are recomputed for the final weights (as after any real step 0); every method then starts step 1
    from that model.
    """
    from incseg.models import deeplabv3_resnet101

    out_path: Path = args.out.with_name("stability.json")
    rows = json.loads(out_path.read_text()) if out_path.exists() else []
    scenario = get_scenario("synthetic", "15-5", mode=args.mode)
    k0 = scenario.num_classes_at(0)
    src = SyntheticScenes("train", num_images=64, seed=0, size=args.stability_size)
    tf = TrainTransform(crop_size=args.stability_size)

    def batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = IncrementalSegmentation(src, scenario, step, train=True, transform=tf)
        samples = [data[i % len(data)] for i in range(args.batch_size * args.stability_iters)]
        chunks = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
        return [tuple(torch.stack(t) for t in zip(*chunk)) for chunk in chunks]  # type: ignore[misc]

    def build(network: str) -> Any:
        torch.manual_seed(0)
        return deeplabv3_resnet101(k0) if network == "deeplabv3_resnet101" else build_network(network, k0, 0)

    step1 = batches(1)
    for network in args.stability:
        base = IncrementalLearner(build(network), scenario, "ft")
        base.begin_step(0)
        opt = torch.optim.SGD(base.param_groups(args.lr0), lr=args.lr0, momentum=0.9, weight_decay=1e-4)
        base.module.train()
        step0 = batches(0)
        for i in range(args.stability_warmup):
            out = base.training_step(*step0[i % len(step0)])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        _calibrate_batch_norm(base.model, [images for images, _ in step0])
        state = base.model.state_dict()
        for text in args.methods:
            method, overrides = parse_method(text)
            model = build(network)
            model.load_state_dict(state)
            learner = IncrementalLearner(model, scenario, method, **overrides)
            learner.begin_step(0)
            learner.end_step()
            learner.begin_step(1)
            opt = torch.optim.SGD(learner.param_groups(args.lr_next), lr=args.lr_next, momentum=0.9, weight_decay=1e-4)
            learner.module.train()
            terms: list[dict[str, Any]] = []
            diverged, reason = False, ""
            for images, labels in step1:
                try:
                    out = learner.training_step(images, labels)
                except Exception as err:  # the divergence guard
                    diverged, reason = True, f"{type(err).__name__}: {str(err)[:160]}"
                    break
                terms.append({k: round(float(v), 4) for k, v in out.terms.items()})
                opt.zero_grad()
                out.loss.backward()
                opt.step()
            diverged = diverged or not _finite_weights(learner)
            row = {"network": network, "method": text, "lr": args.lr_next, "warmup": args.stability_warmup,
                   "size": args.stability_size, "iters": len(terms), "terms": terms, "diverged": diverged,
                   "reason": reason}  # fmt: skip
            rows.append(row)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(rows, indent=1))
            print(json.dumps({k: v for k, v in row.items() if k != "terms"}), "last:", terms[-1:], flush=True)


def table(paths: list[Path]) -> str:
    rows = [row for path in paths for row in json.loads(path.read_text())]
    lines = [
        "| network | task | method | old | new | all | skip / concat all | diverged (seeds) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["network"], r["task"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for network, task, method in keys:
        cell = [r for r in rows if (r["network"], r["task"], r["method"]) == (network, task, method)]
        ok = [r for r in cell if not r["diverged"]]

        def avg(key: str, ok: list[dict[str, Any]] = ok) -> str:
            vals = [r[key] for r in ok if key in r and not math.isnan(r[key])]
            return f"{sum(vals) / len(vals):.1f}" if vals else "-"

        strat = f"{avg('skip_all')} / {avg('concat_all')}" if any("skip_all" in r for r in ok) else "-"
        div = f"{sum(r['diverged'] for r in cell)}/{len(cell)}"
        lines.append(
            f"| {network} | {task} | {method} | {avg('old')} | {avg('new')} | {avg('all')} | {strat} | {div} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["small", "outsider", "mobilenet"], choices=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method[:field=value,...]")
    parser.add_argument("--tasks", nargs="+", default=["15-5", "15-1"])
    parser.add_argument("--mode", default="disjoint")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--epochs0", type=int, default=15, help="epochs of step 0")
    parser.add_argument("--epochs-next", type=int, default=12, help="epochs of each later step")
    parser.add_argument("--lr0", type=float, default=0.05)
    parser.add_argument("--lr-next", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness.json"))
    parser.add_argument("--cache", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--stability", nargs="*", default=None, help="networks for the few-iteration check")
    parser.add_argument("--stability-iters", type=int, default=10)
    parser.add_argument("--stability-warmup", type=int, default=30, help="step-0 iterations before the check")
    parser.add_argument("--stability-size", type=int, default=128)
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="print the markdown table of JSON files")
    args = parser.parse_args()
    if args.table is not None:
        print(table(args.table))
    elif args.stability is not None:
        run_stability(args)
    else:
        run_matrix(args)


if __name__ == "__main__":
    main()
