"""Command line: ``incseg demo`` (built-in benchmark, CPU, minutes) and ``incseg train`` (VOC / ADE20K).

Both run under ``torchrun`` for multi-process training (DDP); only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incseg._catalog import DATASET_TASKS, METHOD_DESCRIPTIONS
from incseg._cli_config import copy_config, expand_config
from incseg._cli_eval import add_eval_parser, run_eval
from incseg._cli_shared import DATASET_DEFAULTS
from incseg._cli_shared import SYNTHETIC_IMAGES as _SYNTHETIC_IMAGES
from incseg._cli_shared import build_model as _build_model
from incseg._cli_shared import has_matplotlib as _has_matplotlib
from incseg._cli_shared import sources as _sources
from incseg._cli_shared import synthetic_sources as _synthetic_sources
from incseg._version import __version__

if TYPE_CHECKING:  # the command line imports torch only once a command runs, so --help is fast
    from incseg.data import IncrementalSegmentation
    from incseg.engine import TrainConfig
    from incseg.learner import IncrementalLearner
    from incseg.metrics import IoUResult
    from incseg.scenarios import Scenario

__all__ = ["main"]

DEMO_METHODS = ("ft", "mib", "caf", "joint")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends ``(default: X)`` to options that have a plain default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


def _per_dataset(key: str) -> str:
    """``"default: voc 30, ade20k 60, synthetic 15"`` for a dataset-dependent option (values collapsed)."""
    values = {name: d[key] for name, d in DATASET_DEFAULTS.items()}
    return "default: " + ", ".join(f"{name} {v}" for name, v in values.items())


def _catalog_text() -> str:
    tasks = "\n".join(f"  {name:<10} {', '.join(t)} (or any A-B split)" for name, t in DATASET_TASKS.items())
    width = max(map(len, METHOD_DESCRIPTIONS))
    methods = "\n".join(f"  {name:<{width}}  {text}" for name, text in METHOD_DESCRIPTIONS.items())
    return f"tasks per dataset:\n{tasks}\n\nmethods (--method):\n{methods}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _common(p: argparse.ArgumentParser, *, out_default: str, device_default: str) -> None:
    p.add_argument("--out", type=Path, help=f"run folder: results, checkpoints, plots (default: {out_default})")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random")
    p.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default: {device_default})")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision")
    p.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader workers per process")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nan-policy", choices=["stop", "skip"], default="stop", help="what to do on a NaN/Inf loss")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if settings that change results differ from the run's config.json / checkpoint",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``incseg`` argument parser (sub-commands ``demo`` and ``train``); builds without importing torch."""
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="incseg",
        description="Class-incremental semantic segmentation (CAF). Run 'incseg COMMAND --help' for its options.",
        epilog=_catalog_text(),
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"incseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synthetic = DATASET_DEFAULTS["synthetic"]
    demo = sub.add_parser(
        "demo",
        help="incremental learning on the built-in synthetic benchmark (CPU, minutes)",
        description="FT, MiB, CAF and joint training side by side on the built-in synthetic benchmark.",
        formatter_class=fmt,
    )
    demo.add_argument("--task", default=synthetic["task"], help="task: " + ", ".join(DATASET_TASKS["synthetic"]))
    demo.add_argument("--mode", choices=["disjoint", "overlapped"], default="disjoint", help="labelling of steps")
    demo.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated method names")
    demo.add_argument("--epochs", type=_positive_int, default=synthetic["epochs"], help="epochs of step 0 and joint")
    demo.add_argument("--epochs-next", type=_positive_int, default=synthetic["epochs_next"], help="later steps")
    demo.add_argument("--batch-size", type=_positive_int, default=synthetic["batch_size"], help="batch size")
    demo.add_argument("--lr", type=_positive_float, default=synthetic["lr"], help="learning rate of step 0 and joint")
    demo.add_argument(
        "--lr-next", type=_positive_float, default=synthetic["lr_next"], help="learning rate of later steps"
    )
    demo.add_argument(
        "--lambda-ad",
        type=_non_negative_float,
        default=None,
        help="attentive distillation weight (default: the method's, 1000 with CAF's gradient balance)",
    )
    demo.add_argument("--train-images", type=_positive_int, default=_SYNTHETIC_IMAGES["train"], help="train set")
    demo.add_argument("--val-images", type=_positive_int, default=_SYNTHETIC_IMAGES["val"], help="test set")
    demo.add_argument("--size", type=_positive_int, default=synthetic["crop_size"], help="image side in pixels")
    demo.add_argument("--width", type=_positive_int, default=32, help="width of the small network")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 10 / 5 epochs on 500 / 100 images, about a sixth of the full demo's time",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads; the table depends on it (float rounding). 1 is fastest for this small network on a "
        "busy machine: a second thread waits on the first when the cores are shared",
    )
    _common(demo, out_default="incseg-demo", device_default="cpu; the small network gains little from a GPU")

    train = sub.add_parser(
        "train",
        help="train one method on a registered scenario (VOC, ADE20K, synthetic)",
        description="Train one method on one task, with checkpoints and an evaluation after every step.\n"
        "Options left out take their dataset's value: the paper's for voc and ade20k, the demo's for synthetic.",
        epilog=_catalog_text(),
        formatter_class=fmt,
    )
    train.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of options (keys: the option names, e.g. batch-size = 24); flags given here override it",
    )
    train.add_argument("--dataset", choices=list(DATASET_TASKS), help="dataset (required)")
    train.add_argument("--root", type=Path, help="dataset root (VOCdevkit/.. or ADEChallengeData2016/..)")
    train.add_argument("--task", help="task, listed below (" + _per_dataset("task") + ")")
    train.add_argument(
        "--mode",
        choices=["disjoint", "overlapped"],
        help="image filter of the steps (default: voc and synthetic disjoint, ade20k overlapped as PLOP)",
    )
    train.add_argument(
        "--method", default="caf", choices=list(METHOD_DESCRIPTIONS), metavar="METHOD", help="listed below"
    )
    train.add_argument(
        "--model", choices=["deeplabv3_resnet101", "small"], help="network (" + _per_dataset("model") + ")"
    )
    train.add_argument("--backbone-weights", type=Path, help="local ImageNet ResNet-101 state dict (.pth)")
    train.add_argument("--output-stride", type=int, choices=[8, 16], default=16, help="of the ResNet-101")
    train.add_argument("--epochs", type=_positive_int, help="epochs of step 0 (" + _per_dataset("epochs") + ")")
    train.add_argument(
        "--epochs-next", type=_positive_int, help="epochs of later steps (default: --epochs; synthetic alone: 15)"
    )
    train.add_argument(
        "--batch-size", type=_positive_int, help="global batch size (" + _per_dataset("batch_size") + ")"
    )
    train.add_argument("--lr", type=_positive_float, help="learning rate of step 0 (" + _per_dataset("lr") + ")")
    train.add_argument(
        "--lr-next", type=_positive_float, help="learning rate of later steps (" + _per_dataset("lr_next") + ")"
    )
    train.add_argument(
        "--crop-size",
        type=_positive_int,
        help="training crop; synthetic: image side (" + _per_dataset("crop_size") + ")",
    )
    train.add_argument(
        "--lambda-d", type=_non_negative_float, help="weight of the knowledge distillation (default: the method's)"
    )
    train.add_argument(
        "--lambda-ad", type=_non_negative_float, help="weight of the attentive distillation (default: the method's)"
    )
    train.add_argument(
        "--test-strategy", choices=["skip", "zero_pad", "concat"], help="CAF at test time (default: the method's)"
    )
    train.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SyncBatchNorm under DDP (CUDA only); --no-sync-bn overrides a config file's sync-bn = true",
    )
    train.add_argument(
        "--void-as-background", action="store_true", help="train labels: void (255) -> background, as MiB"
    )
    train.add_argument("--max-iters-per-epoch", type=_positive_int, help="cap iterations (quick checks)")
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log loss terms, lr and mIoU per step to OUT/tensorboard (needs incseg[tensorboard])",
    )
    train.add_argument(
        "--cache-check",
        choices=["stat", "content"],
        default="stat",
        help="class-set cache: trust mask names, sizes and times (stat) or hash every mask (content)",
    )
    train.add_argument(
        "--memory",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="replay memory of N training images (class-balanced, any method; 0: none)",
    )
    _common(train, out_default="runs/DATASET-TASK-MODE-METHOD", device_default="cuda when available")

    plot = sub.add_parser(
        "plot",
        help="figures of a run folder: loss terms and lr over iterations, mIoU per step, IoU heat map",
        description="Write RUN_DIR/plots/*.png from metrics.jsonl and history.json (needs incseg[plot]).",
        formatter_class=fmt,
    )
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the --out folder of incseg train")
    add_eval_parser(sub, fmt)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]  # type: ignore[no-any-return]


def resolve_train_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options of ``incseg train`` left out with their dataset's values (see ``DATASET_DEFAULTS``).

    Raises:
        ValueError: no ``--dataset``.
    """
    if args.dataset is None:
        raise ValueError("--dataset is required: one of " + ", ".join(DATASET_TASKS))
    if getattr(args, "mode", None) is None:
        from incseg.scenarios import default_mode

        args.mode = default_mode(args.dataset)
    if args.epochs_next is None and args.epochs is not None:
        args.epochs_next = args.epochs
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _slow_run_warnings(args: argparse.Namespace, device_type: str) -> list[str]:
    """One line per setting that will obviously take hours or learn little."""
    warnings = []
    if args.model == "deeplabv3_resnet101" and device_type == "cpu":
        warnings.append(
            "warning: DeepLabV3-ResNet101 on the CPU takes hours per step; use a GPU (--device cuda) or --model small"
        )
    if args.model == "deeplabv3_resnet101" and args.dataset != "synthetic" and args.backbone_weights is None:
        warnings.append(
            "warning: no --backbone-weights: a ResNet-101 trained from scratch needs far longer than the paper's "
            "schedule; pass a local ImageNet state dict"
        )
    return warnings


def _datasets(
    train_source: Any,
    test_source: Any,
    scenario: Scenario,
    train_tf: Any,
    test_tf: Any,
    cache_dir: Path | None,
    *,
    void_as_background: bool = False,
    cache_check: str = "stat",
) -> Callable[[int], tuple[IncrementalSegmentation, IncrementalSegmentation]]:
    from incseg.data import IncrementalSegmentation

    def make(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        return (
            IncrementalSegmentation(
                train_source,
                scenario,
                step,
                train=True,
                transform=train_tf,
                cache_dir=cache_dir,
                void_as_background=void_as_background,
                cache_check=cache_check,  # type: ignore[arg-type]
            ),
            IncrementalSegmentation(
                test_source,
                scenario,
                step,
                train=False,
                transform=test_tf,
                cache_dir=cache_dir,
                cache_check=cache_check,  # type: ignore[arg-type]
            ),
        )

    return make


def _row(method: str, result: IoUResult) -> dict[str, Any]:
    g = result.groups
    return {"method": method, **{k: round(100 * v, 2) for k, v in g.items()}}


def _print_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    header = f"{'method':<8}" + "".join(f"{k:>10}" for k in keys)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<8}" + "".join(f"{r.get(k, float('nan')):>10.1f}" for k in keys))
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    """``incseg demo``: FT, MiB, CAF and joint training side by side on the synthetic benchmark.

    Step 0 is the same training for every incremental method (plain cross-entropy on the first classes: the
    unbiased CE has nothing to aggregate yet and no teacher exists), so it is trained once and shared; each
    method then learns the later steps from that model. Joint training learns all classes in one step.
    ``--threads`` sets torch's intra-op threads for the run (the caller's setting is restored afterwards).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from incseg import distributed as D
    from incseg._progress import Eta
    from incseg.data import IncrementalSegmentation
    from incseg.engine import TrainConfig, evaluate, planned_iterations, train_scenario
    from incseg.learner import METHODS, IncrementalLearner
    from incseg.metrics import StepHistory
    from incseg.models import small_segmenter
    from incseg.scenarios import get_scenario

    device = D.init_from_env(args.device or "cpu")
    out = args.out or Path("incseg-demo")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"incseg demo: unknown method {m!r}; known: {', '.join(METHODS)}")
    if args.quick:
        args.epochs, args.epochs_next = min(args.epochs, 10), min(args.epochs_next, 5)
        args.train_images, args.val_images = min(args.train_images, 500), min(args.val_images, 100)
    scenario = get_scenario("synthetic", args.task, mode=args.mode)
    train_src, test_src, train_tf, test_tf = _synthetic_sources(
        args.size, args.seed, args.train_images, args.val_images
    )
    common: dict[str, Any] = {
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_next": args.lr_next,
        "amp": args.amp,
        "num_workers": args.workers,
        "seed": args.seed,
        "nan_policy": args.nan_policy,
        "progress": not args.no_progress,
        "extra": _result_args(
            args, ("task", "mode", "train_images", "val_images", "size", "width", "lambda_ad", "threads")
        ),
    }
    first = TrainConfig(epochs=args.epochs, **common)
    later = TrainConfig(epochs=args.epochs_next, **common)
    main = D.is_main_process()
    say = print if main else (lambda *_a, **_k: None)
    last = scenario.num_steps - 1
    cache = out / "cache"
    datasets = _datasets(train_src, test_src, scenario, train_tf, test_tf, cache)
    final: dict[str, IoUResult] = {}
    learners: dict[str, IncrementalLearner] = {}
    t_start = time.monotonic()

    incremental = [m for m in methods if m != "joint"]
    joint = scenario.joint()
    joint_datasets = _datasets(train_src, test_src, joint, train_tf, test_tf, cache)
    # One time estimate for the whole demo (every phase's progress line ends with it): the training iterations
    # of step 0, of each method's later steps and of joint training, at the pace of the run so far.
    eta = None
    if not args.no_progress and main:
        later_steps = sum(planned_iterations(datasets, later, range(1, scenario.num_steps)).values())
        eta = Eta(
            (sum(planned_iterations(datasets, first, range(0, 1)).values()) if incremental else 0)
            + later_steps * len(incremental)
            + (sum(planned_iterations(joint_datasets, first, range(0, 1)).values()) if "joint" in methods else 0)
        )
    if incremental:
        say(f"\n=== step 0 ({scenario.name}, shared by {', '.join(incremental)}) ===")
        torch.manual_seed(args.seed)
        base = IncrementalLearner(
            small_segmenter(scenario.num_classes_at(0), width=args.width).to(device), scenario, "ft"
        )
        base_history = train_scenario(
            base,
            datasets,
            first,
            device=device,
            checkpoint_dir=out / "step0",
            resume=not args.no_resume,
            steps=range(0, 1),
            eta=eta,
        )
        step0_state = base.model.state_dict()
    for method in incremental:
        say(f"\n=== {method} (steps 1-{last} of {scenario.name}) ===")
        torch.manual_seed(args.seed)
        model = small_segmenter(scenario.num_classes_at(0), width=args.width).to(device)
        model.load_state_dict(step0_state)
        overrides = {"lambda_ad": args.lambda_ad} if METHODS[method].ad is not None and args.lambda_ad else {}
        learner = IncrementalLearner(model, scenario, method, **overrides)
        learner.begin_step(0)
        learner.end_step()
        train_scenario(
            learner,
            datasets,
            later,
            device=device,
            checkpoint_dir=out / method,
            resume=not args.no_resume,
            steps=range(1, scenario.num_steps),
            history=StepHistory.from_dict(base_history.to_dict()),
            eta=eta,
        )
        learners[method] = learner
    if "joint" in methods:
        say(f"\n=== joint (all {joint.num_classes_at(0) - 1} classes in one step: the upper bound) ===")
        torch.manual_seed(args.seed)
        learner = IncrementalLearner(small_segmenter(joint.num_classes_at(0), width=args.width).to(device), joint, "ft")
        train_scenario(
            learner,
            joint_datasets,
            first,
            device=device,
            checkpoint_dir=out / "joint",
            resume=not args.no_resume,
            eta=eta,
        )
        learners["joint"] = learner
    # Score every method on the same final test set with the incremental scenario's old/new split: old = the
    # classes of step 0, new = all later ones (the field's convention; the joint model has a one-step scenario).
    final_test = IncrementalSegmentation(test_src, scenario, last, train=False, transform=test_tf)
    for method in methods:
        final[method] = evaluate(
            learners[method],
            final_test,
            device=device,
            batch_size=args.batch_size,
            num_old_classes=scenario.num_classes_at(0),
        )
    if main:
        _report(out, scenario, final, learners, test_src, test_tf, time.monotonic() - t_start)
    D.cleanup()
    return 0


def _report(
    out: Path,
    scenario: Scenario,
    final: dict[str, IoUResult],
    learners: dict[str, IncrementalLearner],
    test_src: Any,
    test_tf: Any,
    seconds: float,
) -> None:
    rows = [_row(m, r) for m, r in final.items()]
    keys = ["old", "new", "all", "all_bg"]
    last = scenario.num_steps - 1
    print(
        f"\nFinal mIoU (%) after step {last} of {scenario.name} (old = classes of step 0, background excluded;"
        f" all_bg includes it), {seconds / 60:.1f} min:"
    )
    print(_print_table(rows, keys))
    out.mkdir(parents=True, exist_ok=True)
    per_step = {m: r.regroup(scenario.num_old_classes(last)) for m, r in final.items()}
    (out / "results.json").write_text(
        json.dumps(
            {
                "scenario": scenario.to_dict(),
                "groups": "old = classes of step 0, new = classes of steps 1.. (final: its num_old_classes); "
                "final_per_step: old = classes learnt before the last step, new = those of the last step",
                "final": {m: r.to_dict() for m, r in final.items()},
                "final_per_step": {m: _row(m, r) for m, r in per_step.items()},
            },
            indent=2,
        )
    )
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", *sorted({k for r in rows for k in r if k != "method"})])
        writer.writeheader()
        writer.writerows(rows)
    picture = _demo_picture(out / "predictions.png", scenario, learners, test_src, test_tf)
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'}, {picture} (and {picture.with_suffix('.npz').name})")


def _demo_picture(
    path: Path, scenario: Scenario, learners: dict[str, IncrementalLearner], test_src: Any, test_tf: Any
) -> Path:
    import numpy as np
    import torch

    from incseg.data import IncrementalSegmentation
    from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from incseg.visualize import attention_heatmap, colorize, denormalize, legend, save_grid

    last = scenario.num_steps - 1
    dataset = IncrementalSegmentation(test_src, scenario, last, train=False, transform=test_tf)
    idx = list(range(0, len(dataset), max(1, len(dataset) // 6)))[:6]
    images = torch.stack([dataset[i][0] for i in idx])
    targets = [dataset[i][1] for i in idx]
    rows: list[dict[str, Any]] = [{"image": denormalize(im, IMAGENET_MEAN, IMAGENET_STD)} for im in images]
    for row, t in zip(rows, targets):
        row["truth"] = colorize(t)
    # The same pictures as arrays (class indices of the final model), for figures drawn elsewhere
    # (docs/figures/make_figures.py): image, truth, pred_<method>, class_names.
    arrays: dict[str, Any] = {
        "image": np.stack([row["image"] for row in rows]),
        "truth": torch.stack(targets).numpy().astype(np.uint8),
        "class_names": np.array(scenario.class_names_at(last)),
    }
    for method, learner in learners.items():
        device = next(learner.model.parameters()).device
        pred = learner.predict(images.to(device)).argmax(1).cpu()
        arrays[f"pred_{method}"] = pred.numpy().astype(np.uint8)
        for row, p in zip(rows, pred):
            row[method] = colorize(p)
        fusion = learner.model.fusion
        if fusion is not None:
            learner.model.eval()
            with torch.no_grad():
                _, maps = fusion(learner.model.encoder(images.to(device)), return_maps=True)
            for row, a in zip(rows, maps.spatial[:, 0]):
                row[f"{method} A_SP"] = attention_heatmap(a, (images.shape[-2], images.shape[-1]))
    np.savez_compressed(path.with_suffix(".npz"), **arrays)
    return save_grid(path, rows, scale=3, legend=legend(scenario.class_names_at(last)))


def _default_out(args: argparse.Namespace) -> Path:
    return Path("runs") / f"{args.dataset}-{args.task}-{args.mode}-{args.method}"


_NON_RESULT_ARGS = frozenset(
    {
        "command",
        "out",
        "no_resume",
        "no_progress",
        "nan_policy",
        "allow_config_change",
        "cache_check",
        "config",
        "tensorboard",
    }
)


def _write_run_config(out: Path, args: argparse.Namespace, config: TrainConfig, *, resume: bool) -> None:
    """Write ``out/config.json`` once (real JSON types); on a resume, refuse settings that change results.

    A resumed run keeps the file of its first start; with ``--allow-config-change`` the changes are appended
    to its ``resumed_with_changes`` list, so the file never claims settings the run was not trained with. A folder
    without a checkpoint has nothing to resume: its file is replaced.
    """
    from incseg._checks import load_json_object
    from incseg.engine import config_differences, format_differences

    path = out / "config.json"
    now = {"args": {k: _json_value(v) for k, v in sorted(vars(args).items())}, "train": config.to_dict()}
    # Only a run with a checkpoint holds anything to protect: a run that failed before its first checkpoint
    # (a bad setting, a missing file) leaves a config.json that the corrected command simply replaces.
    if resume and path.is_file() and (out / "checkpoints" / "last.pt").exists():
        saved = load_json_object(path, "the settings of the run in this folder")
        if not isinstance(saved.get("args", {}), dict):
            raise ValueError(f"{path} holds 'args' that are not an object: repair it, or use another --out")
        differences = config_differences(saved.get("args", {}), now["args"], ignore=_NON_RESULT_ARGS)
        if not differences:
            return
        if not args.allow_config_change:
            raise ValueError(
                f"{out} holds a run started with other settings that change its results "
                f"({format_differences(differences)}, config.json -> now): resume with the original settings, "
                "use another --out or --no-resume, or pass --allow-config-change to resume anyway"
            )
        saved.setdefault("resumed_with_changes", []).append({k: list(v) for k, v in differences.items()})
        now = saved
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=2, allow_nan=False) + "\n")


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


# Options of incseg train that are TrainConfig fields; every other option that changes results goes into
# TrainConfig.extra, so that a checkpoint records them all (a checkpoint copied into another run folder with
# another --crop-size is refused on resume, whatever that folder's config.json says).
_TRAIN_CONFIG_ARGS = frozenset(
    {"epochs", "epochs_next", "batch_size", "lr", "lr_next", "amp", "workers", "seed", "max_iters_per_epoch"}
)


def _result_args(args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The options that change results and are no :class:`~incseg.engine.TrainConfig` field, as JSON values."""
    keep = set(vars(args)) - _NON_RESULT_ARGS - _TRAIN_CONFIG_ARGS if names is None else set(names)
    return {k: _json_value(v) for k, v in sorted(vars(args).items()) if k in keep}


def run_train(args: argparse.Namespace) -> int:
    """``incseg train``: one method on one registered scenario, with checkpoints and evaluation per step."""
    import torch

    from incseg import distributed as D
    from incseg.engine import MetricsLog, TensorBoardLog, TrainConfig, train_scenario
    from incseg.learner import IncrementalLearner
    from incseg.methods import MethodConfig
    from incseg.scenarios import get_scenario

    resolve_train_args(args)
    if args.tensorboard and not _has_tensorboard():
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'incseg[tensorboard]'")
    scenario = get_scenario(args.dataset, args.task, mode=args.mode)
    device = D.init_from_env(args.device)
    if D.is_main_process():
        for line in _slow_run_warnings(args, device.type):
            print(line, file=sys.stderr)
    train_src, test_src, train_tf, test_tf = _sources(args)
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "lambda_d": args.lambda_d,
            "lambda_ad": args.lambda_ad,
            "test_strategy": args.test_strategy,
        }.items()
        if v is not None
    }
    method = "ft" if args.method == "joint" else args.method
    scn = scenario.joint() if args.method == "joint" else scenario
    torch.manual_seed(args.seed)
    model = _build_model(args, scn.num_classes_at(0))
    if args.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
        if D.is_distributed():
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
    model = model.to(device)
    if args.void_as_background:
        overrides["void_as_background"] = True
    method_config = MethodConfig.preset(method)
    if args.memory > 0:  # the replay component, added to whatever the method has
        method_config = method_config.replace(
            components=(*method_config.components, "replay"), memory_size=args.memory, memory_seed=args.seed
        )
    learner = IncrementalLearner(model, scn, method_config, **overrides)
    out = args.out or _default_out(args)
    config = TrainConfig(
        epochs=args.epochs,
        epochs_next=args.epochs_next,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_next=args.lr_next,
        amp=args.amp,
        num_workers=args.workers,
        seed=args.seed,
        nan_policy=args.nan_policy,
        progress=not args.no_progress,
        max_iters_per_epoch=args.max_iters_per_epoch,
        extra=_result_args(args),
    )
    if D.is_main_process():
        _write_run_config(out, args, config, resume=not args.no_resume)
        if args.config is not None:
            copy_config(args.config, out)
    metrics_log = MetricsLog(out / "metrics.jsonl")  # rank 0 only: the engine calls it there
    board = TensorBoardLog(out / "tensorboard") if args.tensorboard and D.is_main_process() else None

    def on_iteration(record: dict[str, Any]) -> None:
        metrics_log(record)
        if board is not None:
            board(record)

    try:
        history = train_scenario(
            learner,
            _datasets(
                train_src,
                test_src,
                scn,
                train_tf,
                test_tf,
                out / "cache",
                void_as_background=learner.config.void_as_background,
                cache_check=args.cache_check,
            ),
            config,
            device=device,
            checkpoint_dir=out / "checkpoints",
            resume=not args.no_resume,
            on_iteration=on_iteration,
            on_step_end=board.step_end if board is not None else None,
            allow_config_change=args.allow_config_change,
        )
    finally:
        metrics_log.close()
        if board is not None:
            board.close()
    if D.is_main_process():
        print(history.table())
        history.to_json(out / "history.json")
        history.to_csv(out / "history.csv")
        print(f"wrote {out / 'history.json'}, {out / 'history.csv'} and {out / 'metrics.jsonl'}")
        if _has_matplotlib():
            from incseg.plots import plot_run

            print("wrote " + ", ".join(str(p) for p in plot_run(out)))
    D.cleanup()
    return 0


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def run_plot(args: argparse.Namespace) -> int:
    """``incseg plot RUN_DIR``: the PNG figures of a run folder (:func:`incseg.plots.plot_run`)."""
    from incseg.plots import plot_run

    try:
        written = plot_run(args.run_dir)
    except ImportError as err:  # matplotlib missing: say which extra installs it
        print(f"incseg plot: error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; for ``train --config FILE``, the file's options come first and the flags override them.

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: the config file is not valid TOML, has an unknown key or a value its option refuses.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config is not None:
        argv = expand_config(_subparser(parser, "train"), sys.argv[1:] if argv is None else argv, args.config)
        args = parser.parse_args(argv)
    return args


def _error_line(err: BaseException) -> str:
    """The one line to print for ``err``. A DataLoader worker's error carries the worker's whole traceback in its
    message ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): keep its own message."""
    text = str(err)
    if "Original Traceback" in text:
        worker = re.search(r"in DataLoader worker process (\d+)", text)
        lines = text.rstrip().splitlines()
        name = f"{type(err).__name__}: "
        start = max((i for i, line in enumerate(lines) if line.startswith(name)), default=len(lines) - 1)
        text = " ".join(lines[start:]).removeprefix(name)
        if worker:
            text += f" (in DataLoader worker {worker.group(1)})"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``incseg`` console script."""
    try:
        args = parse_args(argv)
    except (FileNotFoundError, ValueError) as err:  # a bad --config file
        print(f"incseg train: error: {_error_line(err)}", file=sys.stderr)
        return 2
    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "plot":
            return run_plot(args)
        if args.command == "eval":
            return run_eval(args)
        return run_train(args)
    except (OSError, ValueError) as err:  # missing files, permissions, full disks, bad settings or data
        print(f"incseg {args.command}: error: {_error_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from incseg.learner.guard import DivergenceError

        if not isinstance(err, DivergenceError):
            raise
        print(f"incseg {args.command}: error: {_error_line(err)}", file=sys.stderr)  # names the term, values, fix
        return 1
    except KeyboardInterrupt:  # checkpoints are written after every epoch: the same command resumes
        print(f"\nincseg {args.command}: interrupted; resume with the same command", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
