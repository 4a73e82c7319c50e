"""The training loss of a representation: the class loss on the first ``K`` channels (Dice + pixel-weighted CE,
:class:`medseg.losses.DiceWeightedCELoss`) plus the representation's regression terms on the other ``R``,
summed over the deep-supervision heads with the class loss's head weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.instances.base import Representation
from medseg.losses import DiceWeightedCELoss, LossOutput, deep_supervision_weights, head_strides


class InstanceLoss(nn.Module):
    """Class loss + regression terms.

    Args:
        class_loss: the loss of the ``K`` class channels.
        representation: gives the regression terms and their weights.
        num_classes: ``K``.
        regression_channels: ``R``; 0 makes this the class loss alone.

    Example:
        >>> loss_fn = InstanceLoss(DiceWeightedCELoss(3), build_representation("flows"), 3, 2)
        >>> out = loss_fn(logits, label, weight, regression)  # logits B K+R H W, regression B R H W
    """

    def __init__(self, class_loss: DiceWeightedCELoss, representation: Representation, num_classes: int,
                 regression_channels: int):
        super().__init__()
        self.class_loss, self.representation = class_loss, representation
        self.num_classes, self.regression_channels = int(num_classes), int(regression_channels)

    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        regression: torch.Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss.

        Args:
            logits: ``B K+R *S``, or a list of deep-supervision heads (full resolution first).
            target: ``B 1 *S`` class ids (full resolution); its non-zero classes are the objects, where the
                gradient terms are measured.
            weight: optional ``B 1 *S`` pixel weights of the CE term.
            regression: ``B R *S`` regression targets (full resolution); required when ``R > 0``.
        """
        heads = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        k, r = self.num_classes, self.regression_channels
        for i, head in enumerate(heads):
            if head.ndim not in (4, 5) or head.shape[1] != k + r:
                raise ValueError(f"head {i} must be B {k}+{r} *S (classes + regression channels); "
                                 f"received {tuple(head.shape)}")
        out = self.class_loss([h[:, :k] for h in heads] if len(heads) > 1 else heads[0][:, :k], target, weight)
        if r == 0:
            return out
        if regression is None or tuple(regression.shape) != (heads[0].shape[0], r, *heads[0].shape[2:]):
            raise ValueError(f"regression targets must be B R *S = {(heads[0].shape[0], r, *heads[0].shape[2:])}; "
                             f"received {None if regression is None else tuple(regression.shape)}")
        objects = (target if target.ndim == heads[0].ndim else target[:, None]) > 0
        total, parts = out.total, dict(out.parts)
        for head, w_head in zip(heads, deep_supervision_weights(self.class_loss.ds_weights, len(heads))):
            reg_target, mask = _on_grid(heads[0].shape[2:], head.shape[2:], regression.float(), objects)
            for name, (factor, value) in self.representation.loss_terms(head[:, k:], reg_target, mask).items():
                total = total + w_head * factor * value
                parts[name] = parts.get(name, 0.0) + w_head * value.detach()
        return LossOutput(total, parts)


def _on_grid(full, size, regression: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and object mask of a deep-supervision head, on the network's own pooling grid as the class
    targets are (:func:`medseg.losses._downsample_to`): replicate padding to a multiple of the head's stride
    ``f``, then the mean of each ``f``-block (a coarse head sees the block's mean offset or distance); a cell
    is an object where most of its block is."""
    full, size = tuple(full), tuple(size)
    if size == full:
        return regression, objects
    strides = head_strides(full, size)
    if strides is None:
        raise ValueError(f"deep-supervision head size {size} is not on a pooling grid of {full}")
    padding: list[int] = []
    for n, f in zip(reversed(full), reversed(strides)):  # F.pad lists the last axis first
        padding += [0, -n % f]
    pool = F.avg_pool2d if len(strides) == 2 else F.avg_pool3d

    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, padding, mode="replicate") if any(padding) else x
        return pool(x, kernel_size=tuple(strides), stride=tuple(strides))

    return blocks(regression), blocks(objects.float()) > 0.5
