"""FLOPs and activation memory of one training image, the basis of the cost estimates of docs/reproduce.md.

One training step (teacher forward, student forward with CAF, CAFLoss, backward) of DeepLabV3-ResNet101 at output
stride 16 on 512x512 images, at step 0 and at step 1 of VOC 15-5 with the ``caf`` recipe, in float32 and under
bfloat16 autocast. FLOPs come from ``torch.utils.flop_counter``; the activation memory is the storage of the
tensors autograd saves for backward, measured at two batch sizes so that the weights (saved too) cancel out:
the per-image figure is the difference divided by the difference of the batch sizes. Device-independent counts,
so the CPU gives them (minutes on one core):

    python benchmarks/cost_per_image.py            # rows in benchmarks/results/cost_per_image.json
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from _results import save_rows
from torch.utils.flop_counter import FlopCounterMode

from incseg.learner import IncrementalLearner
from incseg.models import deeplabv3_resnet101
from incseg.scenarios import get_scenario


def _step(learner: IncrementalLearner, batch: int, size: int, amp: str) -> tuple[float, int]:
    """FLOPs of one forward + backward, and the bytes of the storages saved for backward."""
    seen: set[tuple[int, torch.dtype]] = set()
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            saved += tensor.untyped_storage().nbytes()
        return tensor

    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, learner.model.num_classes, (batch, size, size))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    with FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = learner.training_step(images, labels, guard=False).loss
        loss.backward()
    learner.module.zero_grad(set_to_none=True)
    return float(flops.get_total_flops()), saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side")
    parser.add_argument("--batches", type=int, nargs=2, default=(2, 4), help="the two batch sizes (>= 2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    small, large = args.batches
    learner = IncrementalLearner(deeplabv3_resnet101(16), get_scenario("voc", "15-5"), "caf")
    rows = []
    for step in (0, 1):
        if step == 1:
            learner.end_step()
        learner.begin_step(step)
        trained = sum(p.numel() for p in learner.module.parameters() if p.requires_grad)
        teacher = 0 if learner.teacher is None else sum(p.numel() for p in learner.teacher.parameters())
        for amp in ("none", "bf16"):
            flops_small, saved_small = _step(learner, small, args.size, amp)
            flops_large, saved_large = _step(learner, large, args.size, amp)
            row = {
                "model": "deeplabv3_resnet101",
                "method": "caf",
                "step": step,
                "size": args.size,
                "amp": amp,
                "gflop_per_image": round((flops_large - flops_small) / (large - small) / 1e9, 1),
                "activations_mib_per_image": round((saved_large - saved_small) / (large - small) / 2**20, 1),
                "trained_parameters_m": round(trained / 1e6, 2),
                "teacher_parameters_m": round(teacher / 1e6, 2),
            }
            print(row, flush=True)
            rows.append(row)
    print(save_rows("cost_per_image", rows, key=("model", "method", "step", "size", "amp")))


if __name__ == "__main__":
    main()
