"""The example of docs/how-to/write-a-method.md runs, and its method does what the page says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from incseg.learner import IncrementalLearner, MethodConfig
from incseg.models import small_segmenter
from incseg.scenarios import Scenario

PAGE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "write-a-method.md"


def _example() -> str:
    return PAGE.read_text(encoding="utf-8").split("```python\n")[1].split("```")[0]


def test_example_runs_and_fuses_the_weights(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_example(), str(PAGE), "exec"), namespace)
    assert namespace["learner"].config.family == "weight-fusion"

    config = MethodConfig.preset("mib").replace(name="mib+fusion", family="weight-fusion", alpha=0.3)
    scenario = Scenario([[1, 2], [3]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, config)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    optimizer = torch.optim.SGD(learner.param_groups(0.1), lr=0.1)
    out = learner.training_step(images, labels)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    trained = {k: v.clone() for k, v in learner.model.state_dict().items()}
    assert learner.teacher is not None
    old = learner.teacher.state_dict()
    learner.end_step()
    fused = learner.model.state_dict()
    shared = [k for k in trained if k in old and trained[k].is_floating_point()]
    assert any(not torch.equal(trained[k], old[k]) for k in shared)  # the step changed something to fuse
    for k in shared:
        torch.testing.assert_close(fused[k], 0.7 * trained[k] + 0.3 * old[k])
    new_rows = [k for k in trained if k not in old]
    assert new_rows and all(torch.equal(fused[k], trained[k]) for k in new_rows)

    path = tmp_path / "fusion.pt"  # the options travel with checkpoints
    learner.save(path)
    restored = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    assert restored.config.options == {"alpha": 0.3} and type(restored.method).__name__ == "WeightFusion"
