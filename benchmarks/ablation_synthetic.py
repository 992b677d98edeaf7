"""Ablations and CAF test strategies on the synthetic benchmark (a script, not a test).

Trains step 0 once (as `incseg demo` does), then each run's later steps from that same model, and scores the
final model of every run on the last step's test set with each CAF test strategy. Produces the ablation and
strategy tables of docs/lab-notebook.md (and writes benchmarks/results/ablation_synthetic.json, which
docs/figures/make_figures.py plots):

    python benchmarks/ablation_synthetic.py
    python benchmarks/ablation_synthetic.py --runs mib caf:lambda_ad=10 caf:lambda_ad=100 --seed 1

A run is a method preset of `incseg.learner.METHODS`, optionally with `:field=value,...` overrides of its
`MethodConfig` (numbers are parsed as floats, except `caf_inner_channels`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _results import save_rows

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform, TrainTransform
from incseg.engine import TrainConfig, evaluate, train_scenario
from incseg.learner import IncrementalLearner
from incseg.models import small_segmenter
from incseg.scenarios import get_scenario

DEFAULT_RUNS = [
    "mib",
    "baseline+ad+bkd",
    "baseline+caf+bkd",
    "caf:lambda_ad=1",
    "caf:lambda_ad=10",
    "caf:lambda_ad=100",
]


def _parse_run(text: str) -> tuple[str, dict[str, Any]]:
    method, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = int(value) if key == "caf_inner_channels" else float(value)
    return method, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="method[:field=value,...] per run")
    parser.add_argument("--task", default="15-5")
    parser.add_argument("--mode", default="disjoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of step 0")
    parser.add_argument("--epochs-next", type=int, default=15, help="epochs of each later step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-next", type=float, default=0.01)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation-synthetic"))
    args = parser.parse_args()

    scenario = get_scenario("synthetic", args.task, mode=args.mode)
    train_src = SyntheticScenes("train", num_images=args.train_images, seed=args.seed)
    test_src = SyntheticScenes("val", num_images=args.val_images, seed=args.seed)
    train_tf, test_tf = TrainTransform(crop_size=train_src.size, scale=(0.75, 1.25)), TestTransform(size=None)

    def datasets(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        return (
            IncrementalSegmentation(train_src, scenario, step, train=True, transform=train_tf),
            IncrementalSegmentation(test_src, scenario, step, train=False, transform=test_tf),
        )

    common = {"batch_size": 16, "lr": args.lr, "lr_next": args.lr_next, "seed": args.seed, "progress": False}
    device, quiet = torch.device("cpu"), lambda _msg: None
    torch.manual_seed(args.seed)
    base = IncrementalLearner(small_segmenter(scenario.num_classes_at(0)), scenario, "ft")
    train_scenario(
        base, datasets, TrainConfig(epochs=args.epochs, **common), device=device, log=quiet,
        checkpoint_dir=args.out / f"step0-seed{args.seed}", steps=range(0, 1),
    )  # fmt: skip
    last = scenario.num_steps - 1
    final_test = datasets(last)[1]
    print(f"{scenario.name} seed {args.seed}: mIoU % on the last step's test set (old / new / all, no background)")
    print(f"{'run':<28}{'strategy':<10}{'old':>7}{'new':>7}{'all':>7}{'time':>8}")
    for text in args.runs:
        rows: list[dict[str, Any]] = []
        method, overrides = _parse_run(text)
        torch.manual_seed(args.seed)
        model = small_segmenter(scenario.num_classes_at(0))
        model.load_state_dict(base.model.state_dict())
        learner = IncrementalLearner(model, scenario, method, **overrides)
        learner.begin_step(0)
        learner.end_step()
        t0 = time.monotonic()
        train_scenario(
            learner, datasets, TrainConfig(epochs=args.epochs_next, nan_policy="skip", **common), device=device,
            log=quiet, steps=range(1, scenario.num_steps),
        )  # fmt: skip
        seconds = time.monotonic() - t0
        strategies = ["skip", "zero_pad", "concat"] if learner.model.fusion is not None else [None]
        for strategy in strategies:
            g = evaluate(learner, final_test, device=device, batch_size=32, strategy=strategy).groups  # type: ignore[arg-type]
            label = strategy or "-"
            rows.append(
                {"task": args.task, "mode": args.mode, "seed": args.seed, "epochs_next": args.epochs_next,
                 "run": text, "method": method, "overrides": overrides, "strategy": label, "seconds": round(seconds),
                 **{k: round(100 * g[k], 2) for k in ("old", "new", "all")}}
            )  # fmt: skip
            print(
                f"{text:<28}{label:<10}{100 * g['old']:>7.1f}{100 * g['new']:>7.1f}{100 * g['all']:>7.1f}"
                f"{seconds:>7.0f}s"
            )
        save_rows("ablation_synthetic", rows, key=("task", "mode", "seed", "epochs_next", "run", "strategy"))


if __name__ == "__main__":
    main()
