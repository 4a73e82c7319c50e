"""Segmentation loss: soft Dice + pixel-weighted cross-entropy, with deep-supervision weighting.

The Dice term is nnU-Net's *batch Dice*: intersections and volumes are summed over the batch and all
pixels before the per-class ratio is taken. Training patches often hold no lesion at all; a per-sample
Dice would be undefined (or pure smoothing noise) for such samples, while the batch Dice only needs the
class somewhere in the batch.

The cross-entropy term carries the per-pixel weight map (U-Net paper: high weight on thin borders
between touching cells) and optional per-class weights. The weight map is not applied to the Dice term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DS_WEIGHTINGS = ("halving", "equal")


def deep_supervision_weights(spec: str | Sequence[float], num_heads: int) -> list[float]:
    """Weights of ``num_heads`` deep-supervision heads, normalised to sum to 1.

    Args:
        spec: ``"halving"`` (head ``i`` gets ``1/2**i`` before normalising: the full-resolution head 0 counts
            most, as in nnU-Net), ``"equal"`` (the UNet++ paper's average), or one finite weight >= 0 per
            head in the network's output order, not all 0.
        num_heads: the number of outputs the network returns in training mode.

    Raises:
        ValueError: an unknown name, a list of another length, or negative, non-finite or all-zero weights.
    """
    if isinstance(spec, str):
        if spec not in DS_WEIGHTINGS:
            raise ValueError(f"expected {', '.join(DS_WEIGHTINGS)} or one weight per head, got {spec!r}")
        raw = [0.5**i for i in range(num_heads)] if spec == "halving" else [1.0] * num_heads
    else:
        raw = [float(w) for w in spec]
        if len(raw) != num_heads:
            raise ValueError(f"expected {num_heads} weights (one per network output), got {len(raw)}: {list(spec)}")
        if not all(math.isfinite(w) and w >= 0 for w in raw) or sum(raw) == 0:
            raise ValueError(f"expected finite weights >= 0, not all 0, got {list(spec)}")
    total = sum(raw)
    return [w / total for w in raw]


class LossOutput(NamedTuple):
    """The loss and its unweighted parts.

    Attributes:
        total: scalar to call ``backward()`` on: ``dice_weight * dice + ce_weight * ce`` (averaged over
            deep-supervision heads).
        parts: detached scalars for logging, ``{"dice": 1 - soft Dice, "ce": weighted cross-entropy}``.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class DiceWeightedCELoss(nn.Module):
    """Soft batch Dice plus cross-entropy weighted per pixel and per class.

    Args:
        num_classes: number of output channels (background included), at least 2.
        dice_weight: factor of the Dice term in ``total``.
        ce_weight: factor of the cross-entropy term in ``total``.
        include_background: whether class 0 takes part in the Dice mean (it always does in the CE).
        class_weights: one non-negative weight per class for the CE term; ``None`` = all 1.
        smooth: added to the Dice numerator and denominator; a class absent from the whole batch
            then scores ~1 only if it is also (almost) never predicted.
        ds_weights: weighting of the deep-supervision heads, in the order the network returns them:
            ``"halving"`` (head ``i`` gets ``1/2**i``), ``"equal"``, or one non-negative weight per head;
            normalised to sum to 1 (see :func:`deep_supervision_weights`), so identical heads give the
            single-head loss.

    Example:
        >>> loss_fn = DiceWeightedCELoss(num_classes=3)
        >>> out = loss_fn(logits, labels, weight=weight_map)  # logits B C H W, labels B 1 H W
        >>> out.total.backward(); log(out.parts)
    """

    def __init__(
        self,
        num_classes: int,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1e-5,
        ds_weights: str | Sequence[float] = "halving",
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(
                f"dice_weight and ce_weight must be >= 0 and not both 0, got {dice_weight} and {ce_weight}"
            )
        try:
            deep_supervision_weights(ds_weights, 1 if isinstance(ds_weights, str) else len(ds_weights))
        except ValueError as err:
            raise ValueError(f"ds_weights: {err}") from None
        if class_weights is not None:
            if len(class_weights) != num_classes or min(class_weights) < 0:
                raise ValueError(
                    f"class_weights must hold {num_classes} non-negative numbers (one per class), "
                    f"got {list(class_weights)}"
                )
            self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))
        else:
            self.class_weights = None
        self.num_classes = num_classes
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.smooth = smooth
        self.ds_weights = ds_weights if isinstance(ds_weights, str) else [float(w) for w in ds_weights]

    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss.

        Args:
            logits: ``B C H W [D]`` raw scores, or a list of them for deep supervision: element 0 at full
                resolution, each other one at full resolution or on a coarser grid of the network's stride-2
                pooling, ``ceil(n / 2**k)`` cells along an axis of ``n`` voxels (see :func:`_downsample_to`).
            target: ``B 1 H W [D]`` or ``B H W [D]`` class ids in ``[0, num_classes)`` (integer, or float
                holding integers), at full resolution.
            weight: optional per-pixel weights of the CE term, ``B 1 H W [D]`` or ``B H W [D]``, full
                resolution.

        Returns:
            :class:`LossOutput` with ``total`` and detached ``parts``.

        Raises:
            ValueError: a channel count other than ``num_classes``, target or weight shapes that do not
                match the logits, target values outside ``[0, num_classes)``, or a head whose size is not
                on a pooling grid of the full-resolution target.
        """
        heads = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if not heads:
            raise ValueError("logits is an empty list; expected at least one B C H W [D] tensor")
        target = self._check_target(heads[0], target)
        weight = self._check_weight(target, weight)

        if not isinstance(self.ds_weights, str) and len(self.ds_weights) != len(heads):
            raise ValueError(
                f"ds_weights holds {len(self.ds_weights)} weights but the model returned {len(heads)} outputs; "
                "expected one weight per output"
            )
        head_weights = deep_supervision_weights(self.ds_weights, len(heads))
        total, dice_sum, ce_sum = 0.0, 0.0, 0.0
        for i, (head, w_head) in enumerate(zip(heads, head_weights)):
            t, w = self._head_target(i, head, heads[0], target, weight)
            # one log-softmax serves both terms; float32 whatever autocast chose (sums over millions of
            # pixels overflow or round badly in fp16)
            log_probs = torch.log_softmax(head.float(), dim=1)
            dice = self._dice_loss(log_probs.exp(), t)
            ce = self._ce_loss(log_probs, t, w)
            total = total + w_head * (self.dice_weight * dice + self.ce_weight * ce)
            dice_sum = dice_sum + w_head * dice.detach()
            ce_sum = ce_sum + w_head * ce.detach()
        return LossOutput(total, {"dice": dice_sum, "ce": ce_sum})

    # -- the two terms (one head) ------------------------------------------------------------------------

    def _dice_loss(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
        axes = [0, *range(2, probs.ndim)]  # batch Dice: sum over batch and space, keep classes
        intersect = (probs * onehot).sum(axes)
        volumes = probs.sum(axes) + onehot.sum(axes)
        dice = (2 * intersect + self.smooth) / (volumes + self.smooth).clamp_min(1e-8)
        if not self.include_background:
            dice = dice[1:]
        return 1 - dice.mean()

    def _ce_loss(self, log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ce = F.nll_loss(log_probs, target, reduction="none")  # B H W [D]
        if weight is None and self.class_weights is None:
            return ce.mean()
        w = torch.ones_like(ce) if weight is None else weight.float()
        if self.class_weights is not None:
            w = w * self.class_weights.to(ce.device)[target]  # works even if the module was not moved
        # Normalising by the summed weights keeps the CE on the scale of a plain mean (comparable to the
        # Dice term whatever the weight map's range); the weights still shift emphasis between pixels.
        return (w * ce).sum() / w.sum().clamp_min(1e-8)

    # -- checks and deep-supervision helpers -------------------------------------------------------------

    def _check_target(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim not in (4, 5):
            raise ValueError(f"logits must be B C H W [D] (2D or 3D), got shape {tuple(logits.shape)}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels, expected num_classes={self.num_classes} "
                f"(logits shape {tuple(logits.shape)})"
            )
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target[:, 0]
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
                f"expected B 1 H W [D] or B H W [D] = {expected}"
            )
        if target.is_floating_point():
            target = target.round()
        target = target.long()
        lo, hi = torch.aminmax(target)  # one device sync; avoids CUDA's cryptic device-side assert in CE
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"target values must lie in [0, {self.num_classes - 1}] (num_classes={self.num_classes}), "
                f"got min {lo} and max {hi}"
            )
        return target

    @staticmethod
    def _check_weight(target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
        if weight is None:
            return None
        if weight.ndim == target.ndim + 1 and weight.shape[1] == 1:
            weight = weight[:, 0]
        if weight.shape != target.shape:
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match the target; expected "
                f"B 1 H W [D] or B H W [D] = {tuple(target.shape)}"
            )
        return weight

    def _head_target(
        self, i: int, head: torch.Tensor, full: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target and weight map of head ``i``, on its own grid (see :func:`_downsample_to`)."""
        if head.shape[:2] != full.shape[:2] or head.ndim != full.ndim:
            raise ValueError(
                f"deep-supervision head {i} has shape {tuple(head.shape)}; expected B={full.shape[0]}, "
                f"C={full.shape[1]} and {full.ndim - 2} spatial dims like head 0 {tuple(full.shape)}"
            )
        size, full_size = tuple(head.shape[2:]), tuple(full.shape[2:])
        if size == full_size:
            return target, weight
        strides = head_strides(full_size, size)
        if strides is None:
            raise ValueError(
                f"deep-supervision head {i} spatial size {size} is not on a pooling grid of the full "
                f"resolution {full_size}; expected ceil(n / 2**k) cells along an axis of n voxels"
            )
        return _downsample_to(strides, target, weight, self.num_classes)

def head_strides(full: Sequence[int], size: Sequence[int]) -> tuple[int, ...] | None:
    """Per axis, the power-of-two stride ``f`` with ``ceil(full / f) == size``, or None if there is none."""
    strides = []
    for n, s in zip(full, size):
        f = 1
        while math.ceil(n / f) > s:
            f *= 2
        if math.ceil(n / f) != s:
            return None
        strides.append(f)
    return tuple(strides)


def _downsample_to(
    strides: Sequence[int], target: torch.Tensor, weight: torch.Tensor | None, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring the ``B H W [D]`` target and weight map onto a coarse head's grid, cell by cell.

    A network of this package pads its input at the high end of every axis and halves it with stride-2
    max-pooling, so cell ``i`` of a head at stride ``f`` pools voxels ``[i*f, (i+1)*f)``, and along an axis
    of ``n`` voxels the head keeps ``ceil(n / f)`` cells (:mod:`medseg.nets.blocks`). The target and weight
    map go through the same blocks: the label of a cell is the class covering most of its block, ties to
    the higher class id, so that a structure one voxel thin (a border between touching cells) is not erased
    at every coarse level; the weight is the block's mean, which keeps the mass of a thin high-weight ridge.
    Only the image's own voxels vote, as in a max-pool, which the replicated padding cannot change: so the
    last, partial block is not swayed toward its last row, and a head with one cell along an axis gets the
    same target whatever its stride. Resampling instead (nearest or adaptive pooling from ``n`` to
    ``ceil(n / f)`` cells) would shift cells against the features whenever ``n`` is not a multiple of ``f``.
    """
    padding: list[int] = []
    for n, f in zip(reversed(target.shape[1:]), reversed(strides)):  # F.pad lists the last axis first
        padding += [0, -n % f]
    pool = F.avg_pool2d if len(strides) == 2 else F.avg_pool3d

    def blocks(x: torch.Tensor) -> torch.Tensor:  # B C *S -> B C *S/f, block sums / f**dims (zero padding)
        return pool(F.pad(x, padding) if any(padding) else x, kernel_size=tuple(strides), stride=tuple(strides))

    onehot = torch.zeros((target.shape[0], num_classes, *target.shape[1:]), device=target.device)
    counts = blocks(onehot.scatter_(1, target[:, None], 1.0))  # B K *s, proportional to each class's voxels
    labels = num_classes - 1 - counts.flip(1).argmax(1)  # argmax takes the first maximum: the highest class
    if weight is None:
        return labels, None
    return labels, blocks(weight[:, None].float())[:, 0] / counts.sum(1)  # sum over classes: real voxels
