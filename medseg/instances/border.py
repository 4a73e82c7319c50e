"""``border``: background / cell / border classes (the U-Net paper's), no regression channel.

Instances are the connected components of the cell interiors (argmax == cell), grown over the foreground by
a watershed on the cell probability (:func:`medseg.postprocess.cell_instances`). One broken border line
merges two nuclei, which is why ``distance`` and ``flows`` exist; this stays the baseline and the default
of models trained before representations existed.
"""

from __future__ import annotations

import numpy as np

from medseg.instances.base import Representation, finish_instances, foreground_mask
from medseg.postprocess import cell_instances


class Border(Representation):
    """Border classes only. Threshold ``foreground``: the cell + border probability that counts as object."""

    name = "border"
    semantic = ("cell_border",)
    thresholds = {"foreground": 0.5}
    grid = {"foreground": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}

    def postprocess(
        self, probs: np.ndarray, regression: np.ndarray | None = None, min_size: int = 8, **thresholds: float
    ) -> np.ndarray:
        t = self.check_thresholds(thresholds)
        if probs.shape[0] < 3:
            raise ValueError(f"'border' needs background, cell and border channels; got {probs.shape[0]} channels")
        labels = cell_instances(probs, cell_class=1, border_class=2, min_size=0, threshold=t["foreground"])
        return finish_instances(labels, foreground_mask(probs, t["foreground"]), min_size)
