"""Drop incseg's losses into an existing training loop, keeping your own model, teacher and optimizer.

Your trainer already has a model that returns features and logits and a frozen copy of the previous step's
model. incseg only provides the loss: `CAFLoss` = unbiased CE + lambda_D * KD + lambda_AD * attentive distillation
(eq. 13), here with the settings of the `caf` recipe. The attentive distillation has trainable
squeeze-and-excitation blocks: give `criterion.parameters()` to the optimizer too.

    python examples/drop_in_losses.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from incseg.losses import CAFLoss


class MyNet(nn.Module):
    """Any network: here encoder -> refiner -> 1x1 classifier, returning the features the loss needs."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.refiner = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        h = self.refiner(z)
        return {"z": z, "h": h, "logits": self.classifier(h)}


def grow(model: MyNet, new_classes: int) -> None:
    """Add output channels for the new classes (MiB init: copy the background row, shift the biases)."""
    old = model.classifier
    conv = nn.Conv2d(old.in_channels, old.out_channels + new_classes, 1)
    with torch.no_grad():
        conv.weight[: old.out_channels] = old.weight
        conv.bias[: old.out_channels] = old.bias
        conv.weight[old.out_channels :] = old.weight[:1]
        shift = torch.log(torch.tensor(float(new_classes + 1)))
        conv.bias[old.out_channels :] = old.bias[0] - shift
        conv.bias[0] = old.bias[0] - shift
    model.classifier = conv


def main() -> None:
    torch.manual_seed(0)
    num_old, num_new = 6, 2  # background + 5 old classes, then 2 new classes
    model = MyNet(num_old)
    # ... step 0 training of `model` happens in your trainer ...
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    grow(model, num_new)

    # the `caf` recipe's losses (docs/protocol.md): MiB's KD and the attentive distillation's gradient balance;
    # CAFLoss(32, 16) alone is the paper's eq. 13 (balanced KD, fixed lambda_AD=1000), which diverges on most networks
    criterion = CAFLoss(z_channels=32, h_channels=16, kd="unbiased", ad_balance=1.0)
    optimizer = torch.optim.SGD([*model.parameters(), *criterion.parameters()], lr=1e-3, momentum=0.9)

    images = torch.randn(4, 3, 64, 64)
    labels = torch.randint(0, num_old + num_new, (4, 64, 64))
    labels[labels < num_old] = 0  # old classes are not annotated at this step: background
    for it in range(3):
        with torch.no_grad():
            old = teacher(images)
        new = model(images)
        out = criterion(
            new["logits"],
            labels,
            num_old_classes=num_old,
            old_logits=old["logits"],
            features={"z": new["z"], "h": new["h"]},
            old_features={"z": old["z"], "h": old["h"]},
        )  # logits at 1/4 resolution are upsampled to the labels inside the loss
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        print(f"iteration {it}: " + ", ".join(f"{k}={float(v):.4f}" for k, v in out.terms.items()))


if __name__ == "__main__":
    main()
