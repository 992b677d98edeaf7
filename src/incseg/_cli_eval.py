"""``incseg eval RUN_DIR|CHECKPOINT``: score a trained learner on the test set of its step, without training.

The parser part imports nothing heavy (``incseg --help`` stays fast); :func:`run_eval` imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incseg._catalog import DATASET_TASKS

if TYPE_CHECKING:
    from incseg.metrics import IoUResult

__all__ = ["add_eval_parser", "find_checkpoint", "run_eval"]

_STRATEGIES = ("skip", "zero_pad", "concat")


def add_eval_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``sub`` (the sub-parsers of ``incseg``)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "eval",
        help="evaluate a run folder or a checkpoint on the test set of its step (old/new/all, hIoU, per class)",
        description="Evaluate a trained learner on the test set of its (last) step: mIoU of the old, new and all "
        "classes with and without the background, hIoU and the IoU of every class, printed and written as "
        "JSON, and a confusion-matrix PNG when matplotlib is installed. A run folder (--out of incseg train) "
        "gives its settings (config.json) and its last checkpoint; a bare checkpoint takes the dataset "
        "settings from the flags below.",
        formatter_class=formatter_class,
    )
    p.add_argument(
        "target",
        type=Path,
        metavar="RUN_DIR|CHECKPOINT",
        help="a run folder of incseg train (uses checkpoints/last.pt) or a checkpoint file (.pt)",
    )
    p.add_argument("--dataset", choices=list(DATASET_TASKS), help="dataset (default: the run's)")
    p.add_argument("--root", type=Path, help="dataset root (default: the run's; synthetic needs none)")
    p.add_argument(
        "--strategy",
        choices=list(_STRATEGIES),
        help="CAF test strategy (default: the method's; no effect without a CAF module)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's evaluation batch size, else 8)")
    p.add_argument(
        "--model",
        choices=["deeplabv3_resnet101", "small"],
        help="network of the checkpoint (default: the run's, else recognised from the checkpoint's weights)",
    )
    p.add_argument("--output-stride", type=int, choices=[8, 16], help="of the ResNet-101 (default: the run's, else 16)")
    p.add_argument(
        "--crop-size", type=int, help="test image size; synthetic: image side (default: the run's, else the dataset's)"
    )
    p.add_argument("--seed", type=int, help="seed of the synthetic test images (default: the run's, else 0)")
    p.add_argument(
        "--out", type=Path, help="where eval.json and confusion.png go (default: RUN_DIR/eval, or next to CHECKPOINT)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def find_checkpoint(target: Path) -> tuple[Path, Path | None]:
    """``(checkpoint file, run folder or None)`` for a run folder or a checkpoint file.

    A run folder gives ``checkpoints/last.pt`` (else its latest ``checkpoints/step{t}.pt``, else ``last.pt`` in
    the folder itself). A checkpoint file's run folder is the first of its folder and that folder's parent that
    holds a ``config.json``.

    Raises:
        FileNotFoundError: ``target`` does not exist, or a folder holds no checkpoint.
    """
    if not target.exists():
        raise FileNotFoundError(
            f"{target} does not exist: pass a run folder (the --out of incseg train) or a checkpoint file"
        )
    if target.is_dir():
        folder = target / "checkpoints"
        candidates = [folder / "last.pt", *_step_files(folder), target / "last.pt", *_step_files(target)]
        for path in candidates:
            if path.is_file():
                return path, target
        raise FileNotFoundError(
            f"{target} holds no checkpoint (checkpoints/last.pt or checkpoints/step<t>.pt): "
            "is it a run folder of incseg train?"
        )
    for folder in (target.parent, target.parent.parent):
        if (folder / "config.json").is_file():
            return target, folder
    return target, None


def _step_files(folder: Path) -> list[Path]:
    """``step{t}.pt`` files of ``folder``, latest step first."""
    found = []
    for path in folder.glob("step*.pt") if folder.is_dir() else []:
        number = path.stem[len("step") :]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found, reverse=True)]


def _guess_model(weights: dict[str, Any]) -> str:
    """``"small"`` for :func:`~incseg.models.small_segmenter` weights, else the ResNet-101."""
    return "small" if any(key.startswith("encoder.stem.") for key in weights) else "deeplabv3_resnet101"


def _settings(args: argparse.Namespace, run_dir: Path | None, model_weights: dict[str, Any]) -> argparse.Namespace:
    """The dataset and network settings: the eval flags, else the run's ``config.json``, else defaults."""
    from incseg._cli_shared import DATASET_DEFAULTS

    saved: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "config.json").is_file():
        from incseg._checks import load_json_object

        config = load_json_object(run_dir / "config.json", "the settings of incseg train")
        saved, train = config.get("args", {}), config.get("train", {})
        if not isinstance(saved, dict) or not isinstance(train, dict):
            raise ValueError(f"{run_dir / 'config.json'} holds 'args' or 'train' that are not objects: repair it")

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return saved[name] if saved.get(name) is not None else default

    dataset = pick("dataset", None)
    if dataset is None:
        known = ", ".join(DATASET_TASKS)
        raise ValueError(f"--dataset is required for a checkpoint outside a run folder: one of {known}")
    root = pick("root", None)
    eval_batch = train.get("eval_batch_size") or train.get("batch_size") or 8
    return argparse.Namespace(
        dataset=dataset,
        root=Path(root) if root is not None else None,
        model=pick("model", _guess_model(model_weights)),
        output_stride=pick("output_stride", 16),
        backbone_weights=None,  # every weight comes from the checkpoint
        crop_size=pick("crop_size", DATASET_DEFAULTS[dataset]["crop_size"]),
        seed=pick("seed", 0),
        batch_size=args.batch_size if args.batch_size is not None else int(eval_batch),
        amp=saved.get("amp", "none"),  # as the run's own evaluation
    )


def _check_dataset(scenario: Any, dataset: str, checkpoint: Path) -> None:
    """Refuse a checkpoint trained on another dataset (its class names differ from ``dataset``'s)."""
    from incseg.scenarios import get_scenario

    expected = get_scenario(dataset, "offline").to_dict()["class_names"]
    names = scenario.to_dict()["class_names"]
    if list(names) != list(expected):
        shown = ", ".join(names[1:4])
        raise ValueError(
            f"{checkpoint} was trained on {scenario.name} ({len(names)} classes: {shown}, ...), not on --dataset "
            f"{dataset} ({len(expected)} classes: {', '.join(expected[1:4])}, ...)"
        )


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def _group(index: int, num_old_classes: int | None) -> str:
    if index == 0:
        return "bg"
    return "old" if num_old_classes is None or index < num_old_classes else "new"


def _per_class(result: IoUResult) -> list[dict[str, Any]]:
    """One row per class: name, group (bg/old/new), IoU and accuracy in % (``None`` where undefined)."""
    rows = []
    for c in range(result.num_classes):
        iou, acc = float(result.iou[c]), float(result.accuracy[c])
        rows.append(
            {
                "class": result.class_name(c),
                "group": _group(c, result.num_old_classes),
                "iou_pct": None if math.isnan(iou) else round(100 * iou, 4),
                "accuracy_pct": None if math.isnan(acc) else round(100 * acc, 4),
            }
        )
    return rows


def format_result(result: IoUResult, per_step: IoUResult | None = None) -> str:
    """The per-class table and the group means (in %) that ``incseg eval`` prints."""
    width = max(len("class"), *(len(result.class_name(c)) for c in range(result.num_classes)))
    n_old = result.num_old_classes if result.num_old_classes is not None else result.num_classes
    lines = [f"{'class':<{width}}  {'group':<5}  {'IoU':>7}  {'acc':>7}", "-" * (width + 25)]
    for c in range(result.num_classes):
        group = _group(c, result.num_old_classes)
        iou, acc = float(result.iou[c]), float(result.accuracy[c])
        lines.append(f"{result.class_name(c):<{width}}  {group:<5}  {_pct(iou):>7}  {_pct(acc):>7}")
    g = result.groups
    lines.append("")
    lines.append(
        f"mIoU (%): old {_pct(g['old'])}, new {_pct(g['new'])}, all {_pct(g['all'])} (background excluded; "
        f"old = classes 1-{n_old - 1}); with background: old {_pct(g['old_bg'])}, all {_pct(g['all_bg'])}; "
        f"hIoU {_pct(result.hmean)}; pixel accuracy {_pct(result.pixel_accuracy)}"
    )
    if per_step is not None and per_step.num_old_classes != result.num_old_classes:
        p = per_step.groups
        lines.append(
            f"per-step split (old = classes learnt before this step): old {_pct(p['old'])}, new {_pct(p['new'])}, "
            f"hIoU {_pct(per_step.hmean)}"
        )
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """``incseg eval``: load a run folder or checkpoint, evaluate the test set of its step, print and write.

    Raises:
        FileNotFoundError: no such path, no checkpoint in the folder, dataset files missing.
        ValueError: a checkpoint of another dataset, a corrupt checkpoint (``CheckpointError``), bad settings.
    """
    from incseg import distributed as D
    from incseg._cli_shared import build_model as _build_model
    from incseg._cli_shared import has_matplotlib as _has_matplotlib
    from incseg._cli_shared import sources as _sources
    from incseg.data import IncrementalSegmentation
    from incseg.engine import evaluate
    from incseg.learner import IncrementalLearner
    from incseg.learner.checkpoint import method_from, read_checkpoint, scenario_from

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    checkpoint, run_dir = find_checkpoint(args.target)
    data = read_checkpoint(checkpoint, map_location="cpu")
    scenario, method = scenario_from(data), method_from(data)
    settings = _settings(args, run_dir, data.get("model") or {})
    _check_dataset(scenario, settings.dataset, checkpoint)
    device = D.init_from_env(args.device)
    main = D.is_main_process()
    model = _build_model(settings, scenario.num_classes_at(0))
    learner = IncrementalLearner(model, scenario, method)
    learner.load_state_dict(data)
    learner.to(device)
    step = learner.step
    if main and not learner.step_finished:
        epoch = data.get("extra", {}).get("epoch")
        print(f"note: {checkpoint} is in the middle of step {step} (after epoch {epoch}): evaluating it as it is")
    _, test_src, _, test_tf = _sources(settings)
    cache = run_dir / "cache" if run_dir is not None else None
    test_set = IncrementalSegmentation(test_src, scenario, step, train=False, transform=test_tf, cache_dir=cache)
    result = evaluate(
        learner,
        test_set,
        device=device,
        batch_size=settings.batch_size,
        amp=settings.amp,
        strategy=args.strategy,
        progress=not args.no_progress,
    )
    per_step = result.regroup(scenario.num_old_classes(step))
    if main:
        strategy = args.strategy or method.test_strategy
        print(
            f"{checkpoint}: {scenario.name} ({scenario.mode}), method {method.name}, step {step}/"
            f"{scenario.num_steps - 1}, {len(test_set)} test images, test strategy {strategy}"  # type: ignore[arg-type]
        )
        print(format_result(result, per_step))
        out = args.out if args.out is not None else (run_dir / "eval" if run_dir is not None else checkpoint.parent)
        out.mkdir(parents=True, exist_ok=True)
        stem = "eval" if args.strategy is None else f"eval-{args.strategy}"
        report = {
            "checkpoint": str(checkpoint),
            "run_dir": None if run_dir is None else str(run_dir),
            "dataset": settings.dataset,
            "scenario": scenario.name,
            "mode": scenario.mode,
            "method": method.name,
            "step": step,
            "step_finished": learner.step_finished,
            "strategy": strategy,
            "num_images": len(test_set),  # type: ignore[arg-type]
            "groups": "result and per_class: old = classes of step 0 (as history.json's result); per_step: old = "
            "classes learnt before this step",
            "per_class": _per_class(result),
            "result": result.to_dict(),
            "per_step": per_step.to_dict(include_confusion=False),
        }
        path = out / f"{stem}.json"
        path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        written = [path]
        if _has_matplotlib():
            from incseg.plots import plot_confusion

            written.append(plot_confusion(result, out / f"confusion{stem[4:]}.png"))
        print("wrote " + ", ".join(str(p) for p in written))
    D.cleanup()
    return 0
