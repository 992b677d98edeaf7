"""Two-process gloo run of the reference loop: DDP keeps the ranks in lock-step and metrics are global."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import ddp_worker

from incseg.learner import IncrementalLearner


def test_two_process_training_agrees_across_ranks(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["model"].keys() == r1["model"].keys()
    for key, value in r0["model"].items():
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BatchNorm statistics are per process (use SyncBatchNorm to share them)
        torch.testing.assert_close(value, r1["model"][key], rtol=0, atol=0, msg=key)
    for c0, c1 in zip(r0["confusion"], r1["confusion"]):
        torch.testing.assert_close(c0, c1, rtol=0, atol=0)
    # Evaluation saw every validation image exactly once across the two ranks.
    from _tiny import tiny_datasets, tiny_learner, tiny_scenario

    scenario = tiny_scenario()
    _, test_set = tiny_datasets(scenario)(1)
    labels = torch.stack([test_set[i][1] for i in range(len(test_set))])
    assert int(r0["confusion"][-1].sum()) == int((labels != 255).sum())
    # Rank 0 wrote a checkpoint that a single process can load.
    learner = IncrementalLearner.from_checkpoint(tmp_path / "ckpt" / "step1.pt", tiny_learner(scenario).model)
    for key, value in learner.model.state_dict().items():
        torch.testing.assert_close(value, r0["model"][key], rtol=0, atol=0, msg=key)


def test_nan_on_one_rank_stops_every_rank_and_names_it(tmp_path: Path) -> None:
    from _tiny import ddp_nan_worker

    mp.spawn(ddp_nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "non-finite loss at step 0, epoch 0, batch 0 on rank 1" in message, message
