"""Calibrate the difficulty of :class:`incseg.data.synthetic.SyntheticScenes`.

Trains the reference small network jointly on all 21 classes (plain cross-entropy, void ignored) on the
synthetic train split and prints the validation mIoU over the 21 classes from a dataset-level confusion
matrix, with the per-class IoU, the training time and the image generation time. The benchmark is meant to
be neither trivial nor hopeless for this budget: the target is a joint mIoU of 60-85%.

The model is ``incseg.models.small_segmenter(21, width=32)`` when it exists, otherwise (or with
``--stand-in``) a private stand-in of similar size (conv-BN-ReLU stages, output stride 8, about 140k
parameters, logits upsampled bilinearly).

Usage::

    python benchmarks/calibrate_synthetic.py                  # defaults: 2 threads, 6 epochs, Adam 1e-3
    python benchmarks/calibrate_synthetic.py --epochs 3 --optimizer sgd --lr 0.01
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.data.synthetic import SyntheticScenes

NUM_CLASSES = 21
IGNORE_INDEX = 255


def _conv_bn_relu(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class StandInSegmenter(nn.Module):
    """Private stand-in for ``small_segmenter``: output stride 8, about 140k parameters at width 32."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            _conv_bn_relu(3, w1, stride=2),
            _conv_bn_relu(w1, w1),
            _conv_bn_relu(w1, w2, stride=2),
            _conv_bn_relu(w2, w2),
            _conv_bn_relu(w2, w2, stride=2),
            _conv_bn_relu(w2, w2, dilation=2),
        )
        self.classifier = nn.Conv2d(w2, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_model(width: int, *, stand_in: bool) -> tuple[nn.Module, str]:
    """The reference small segmenter if available (and not ``stand_in``), else the private stand-in."""
    if not stand_in:
        try:
            from incseg.models import small_segmenter  # type: ignore[attr-defined]

            return small_segmenter(NUM_CLASSES, width=width), "incseg.models.small_segmenter"
        except (ImportError, AttributeError):
            pass
    return StandInSegmenter(NUM_CLASSES, width), "stand-in (benchmarks/calibrate_synthetic.py)"


def materialise(source: SyntheticScenes) -> tuple[Tensor, Tensor, float]:
    """All images and masks of ``source`` as tensors, and the generation time per image in ms."""
    start = time.perf_counter()
    pairs = [source.load(i) for i in range(len(source))]
    per_image_ms = (time.perf_counter() - start) / len(source) * 1e3
    images = torch.stack([p[0] for p in pairs])
    masks = torch.stack([p[1] for p in pairs])
    return images, masks, per_image_ms


def normalise(images: Tensor) -> Tensor:
    return (images.float() - 127.5) / 64.0


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` int64 confusion matrix (rows: target, columns: prediction), ignored pixels dropped."""
    valid = target != IGNORE_INDEX
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(conf: Tensor) -> Tensor:
    """IoU per class (NaN for classes absent from both target and prediction)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, masks: Tensor, batch_size: int = 50) -> Tensor:
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for start in range(0, len(images), batch_size):
        x = normalise(images[start : start + batch_size])
        logits = F.interpolate(model(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1), masks[start : start + batch_size], NUM_CLASSES)
    return per_class_iou(conf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adam), 1e-2 (sgd)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stand-in", action="store_true", help="use the private stand-in model")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_src = SyntheticScenes("train", num_images=args.num_train, size=args.size, seed=args.seed)
    val_src = SyntheticScenes("val", num_images=args.num_val, size=args.size, seed=args.seed)
    train_x, train_y, gen_ms = materialise(train_src)
    val_x, val_y, _ = materialise(val_src)
    start = time.perf_counter()
    for i in range(len(train_src)):
        train_src.labels_present(i)
    labels_ms = (time.perf_counter() - start) / len(train_src) * 1e3
    print(f"data: {train_src!r} / {val_src!r}")
    print(f"generation: {gen_ms:.2f} ms per image (load), {labels_ms:.3f} ms per labels_present")
    void = (train_y == IGNORE_INDEX).double().mean().item()
    bg = (train_y == 0).double().mean().item()
    print(f"train pixels: background {bg:.1%}, void {void:.1%}, objects {1 - bg - void:.1%}")

    model, model_name = build_model(args.width, stand_in=args.stand_in)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model_name}, {num_params} parameters")
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 1e-2)
    optimizer: torch.optim.Optimizer
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - s / total_steps) ** 0.9)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_x))
        running = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            x, y = normalise(train_x[idx]), train_y[idx]
            flip = torch.rand(len(idx)) < 0.5  # horizontal flips keep every class a class
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch + 1}/{args.epochs}: loss {running / steps_per_epoch:.3f}, {elapsed:.0f} s")
    train_s = time.perf_counter() - start

    iou = evaluate(model, val_x, val_y)
    print(f"training: {total_steps} steps of batch {args.batch_size} in {train_s:.1f} s ({args.threads} threads)")
    for k, name in enumerate(SyntheticScenes.class_names):
        print(f"  {k:2d} {name:20s} IoU {iou[k].item():6.1%}")
    print(f"val mIoU (21 classes): {iou.nanmean().item():.1%}; objects only (1-20): {iou[1:].nanmean().item():.1%}")


if __name__ == "__main__":
    main()
