"""Search objectives as composable terms.

    dnas (EdMIPS):  L = CE + lambda_c * P(C)
    seam:           L = CE + lambda_m * L_margin(z, y) + lambda_c * P(C)
    asga:           dnas's terms, optimised by the ASGA two-pass rule
    seam_asga:      seam's terms inside ASGA's two passes

`P(C)` is the complexity penalty of the expected BitOps (linear or hinge, framework.quant.cost).
It depends on the logits only, so its gradient is added to the logits outside the two passes.

SEAM's large-margin term (ACM MM 2023) on L2-normalised penultimate features `z` (the input of the
last linear layer), in the centre form [decided, METHOD.md sec. 4]: class centres
`c_k = m * EMA_k + (1 - m) * mean_{i: y_i = k} z_i` (the EMA detached, the batch mean
differentiable, so both terms have gradients),

    L_intra = mean_i ||z_i - c_{y_i}||^2                      (intra-class compactness)
    L_inter = mean_{j != k} max(0, margin - ||c_j - c_k||)^2  (inter-class separation)
    L_margin = L_intra + L_inter
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PenultimateFeatures:
    """Captures the input of a model's last linear layer (the penultimate features) on every forward."""

    def __init__(self, model: nn.Module):
        last = None
        for module in model.modules():
            if isinstance(module, nn.Linear):
                last = module
        if last is None:
            raise ValueError("the model has no linear layer whose input could serve as features")
        self.features: torch.Tensor | None = None
        self._handle = last.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.features = inputs[0]

    def remove(self) -> None:
        self._handle.remove()


class CenterMarginLoss(nn.Module):
    """SEAM's centre-form large-margin loss (see the module docstring)."""

    def __init__(self, num_classes: int, dim: int, margin: float = 1.0, momentum: float = 0.9):
        super().__init__()
        self.margin, self.momentum = float(margin), float(momentum)
        self.register_buffer("centers", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(features.flatten(1), dim=1)
        classes = labels.unique()
        batch_means = torch.stack([z[labels == k].mean(0) for k in classes])
        ema = self.centers[classes]
        seen = self.seen[classes].unsqueeze(1)
        centers = torch.where(seen, self.momentum * ema + (1 - self.momentum) * batch_means, batch_means)
        index = torch.searchsorted(classes, labels)
        intra = (z - centers[index]).pow(2).sum(1).mean()
        if len(classes) > 1:
            distances = torch.cdist(centers, centers)
            off_diagonal = ~torch.eye(len(classes), dtype=torch.bool, device=z.device)
            inter = F.relu(self.margin - distances[off_diagonal]).pow(2).mean()
        else:
            inter = z.new_zeros(())
        if self.training:
            with torch.no_grad():
                self.centers[classes] = centers.detach()
                self.seen[classes] = True
        return intra + inter
