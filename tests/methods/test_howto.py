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
    blocks = PAGE.read_text(encoding="utf-8").split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if "@register_component" in b)


def test_example_composes_a_family_and_components(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_example(), str(PAGE), "exec"), namespace)
    learner = namespace["learner"]
    assert learner.config.family == "plain-ce" and learner.config.components == ("logit-distillation", "caf-fusion")
    assert sorted(namespace["out"].terms) == ["logits", "seg", "total"] and learner.model.fusion is not None

    # the component's term is the weighted MSE of the old logits, in float64
    scenario = Scenario([[1, 2], [3]])
    config = MethodConfig(
        name="ce+ld", family="plain-ce", components=("logit-distillation",), options={"logit_weight": 0.5}
    )
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(3, width=8).double(), scenario, config)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 32, 32))
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    out = learner.training_step(images, labels)
    assert learner.teacher is not None
    old = learner.teacher.forward_features(images)["logits"]
    new = learner.model.forward_features(images)["logits"][:, :3]
    torch.testing.assert_close(out.terms["logits"], 0.5 * ((new - old) ** 2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.terms["total"], out.terms["seg"] + out.terms["logits"], rtol=1e-12, atol=0)

    path = tmp_path / "composed.pt"  # the components and their options travel with checkpoints
    learner.save(path)
    restored = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8).double())
    assert restored.config == learner.config and restored.config.options == {"logit_weight": 0.5}
