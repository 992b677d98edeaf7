"""Worker of the 2-process gloo test of ``MeanIoU.sync`` (a plain module so that spawned processes can import it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from incseg.metrics import MeanIoU

NUM_CLASSES = 5
NUM_IMAGES = 5


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole evaluation set (every rank builds the same one), plus one extra batch per rank."""
    gen = torch.Generator().manual_seed(1234)
    target = torch.randint(0, NUM_CLASSES, (NUM_IMAGES, 6, 7), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255
    logits = torch.randn(NUM_IMAGES, NUM_CLASSES, 3, 4, generator=gen)  # low resolution: upsampled in update
    extra_target = torch.randint(0, NUM_CLASSES, (2, 1, 6, 7), generator=gen)
    extra_pred = torch.randint(0, NUM_CLASSES, (2, 1, 6, 7), generator=gen)
    return logits, target, extra_pred, extra_target


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Update with this rank's shard (uneven: 3 and 2 images), sync twice, update more, sync again."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        logits, target, extra_pred, extra_target = make_data()
        metric = MeanIoU(NUM_CLASSES, num_old_classes=3)
        for i in range(rank, NUM_IMAGES, world_size):
            metric.update(logits[i : i + 1], target[i : i + 1])
        local = metric.local_confusion
        metric.sync()
        first = metric.compute()
        metric.sync()  # a second sync must not count the other ranks twice
        second = metric.compute()
        metric.update(extra_pred[rank], extra_target[rank])
        before_resync = metric.confusion.clone()
        metric.sync()
        final = metric.compute()
        torch.save(
            {
                "local": local,
                "first": first.confusion,
                "second": second.confusion,
                "first_iou": first.iou,
                "before_resync": before_resync,
                "final": final.confusion,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
