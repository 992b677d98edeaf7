"""A tiny incremental run shared by the engine, CLI and DDP tests (importable by spawned processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform
from incseg.engine import TrainConfig, train_scenario
from incseg.learner import IncrementalLearner
from incseg.metrics import StepHistory
from incseg.models import small_segmenter
from incseg.scenarios import Scenario, get_scenario


def tiny_scenario() -> Scenario:
    return get_scenario("synthetic", "15-5", mode="overlapped")


def tiny_datasets(scenario: Scenario, size: int = 48, n_train: int = 64, n_val: int = 24) -> Any:
    train_src = SyntheticScenes("train", num_images=n_train, size=size, seed=1)
    val_src = SyntheticScenes("val", num_images=n_val, size=size, seed=1)
    tf = TestTransform(size=None)

    def make(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        return (
            IncrementalSegmentation(train_src, scenario, step, train=True, transform=tf),
            IncrementalSegmentation(val_src, scenario, step, train=False, transform=tf),
        )

    return make


def tiny_config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.02,
        "lr_next": 0.005,
        "max_iters_per_epoch": 3,
        "progress": False,
    }
    base.update(kw)
    return TrainConfig(**base)


def tiny_learner(scenario: Scenario, method: str = "caf", seed: int = 0) -> IncrementalLearner:
    torch.manual_seed(seed)
    return IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, method)


def tiny_run(
    out: Path | None,
    *,
    method: str = "caf",
    resume: bool = True,
    learner: IncrementalLearner | None = None,
    on_iteration: Any = None,
    allow_config_change: bool = False,
    **kw: Any,
) -> tuple[IncrementalLearner, StepHistory]:
    scenario = tiny_scenario()
    learner = learner if learner is not None else tiny_learner(scenario, method)
    history = train_scenario(
        learner,
        tiny_datasets(scenario),
        tiny_config(**kw),
        device=torch.device("cpu"),
        checkpoint_dir=out,
        resume=resume,
        log=lambda _m: None,
        on_iteration=on_iteration,
        allow_config_change=allow_config_change,
    )
    return learner, history


def ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One process of a 2-process gloo run: train the tiny scenario under DDP, dump weights and results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        learner, history = tiny_run(Path(out_dir) / "ckpt", batch_size=4)
        torch.save(
            {"model": learner.model.state_dict(), "confusion": [history[s].confusion for s in history.steps]},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def ddp_nan_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Rank 1 computes a NaN loss at its first batch: every rank must stop with a message naming rank 1."""
    import torch.distributed as dist

    from incseg.learner import NonFiniteLossError
    from incseg.losses import LossOutput

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    original = IncrementalLearner.training_step

    def nan_on_rank_1(self, images, labels, *, module=None, guard=True):  # type: ignore[no-untyped-def]
        out = original(self, images, labels, module=module, guard=guard)
        if rank == 1:
            bad = out.loss * float("nan")
            return LossOutput(bad, {**out.terms, "seg": bad.detach(), "total": bad.detach()})
        return out

    IncrementalLearner.training_step = nan_on_rank_1  # type: ignore[method-assign]
    try:
        tiny_run(None, batch_size=4, epochs=1)
        message = "no error"
    except NonFiniteLossError as err:
        message = str(err)
    finally:
        IncrementalLearner.training_step = original  # type: ignore[method-assign]
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.txt").write_text(message)
