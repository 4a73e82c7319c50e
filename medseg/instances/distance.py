"""``distance``: the class channels plus one regression channel, each object's normalised distance to its
own boundary (1 at its most interior pixel, ``1 / max`` on its edge, 0 on background).

Touching nuclei without background between them still get a valley of low distance along their shared
boundary, since each object's distance is to its *own* boundary (other objects count as outside). Instances
come from a marker-controlled watershed on the predicted distance: markers are the connected regions above
the ``marker`` threshold (the cores, which the valley separates), grown down the distance over the
predicted foreground; with a border class (``cell_border``) its probability is added to the landscape, so
neighbouring floods meet on the predicted border (at equal budget: held-out AP@0.5:0.95 0.774 -> 0.787,
the same AP@0.5: the boundaries are placed better).

The image edge is not a boundary: a nucleus cut by a patch's edge keeps the distances it has in the whole
image as far as the patch shows them (its maximum, and so its normalisation, is the visible part's).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from medseg.instances.base import Representation, finish_instances, foreground_mask, object_boxes, with_borders
from medseg.transforms.functional import as_label_array


def distance_targets(instance) -> np.ndarray:
    """Normalised distance of every object pixel to its own boundary, ``1 *S`` float32.

    Per object, inside its bounding box grown by one pixel: the Euclidean distance to the nearest pixel
    that is not the object (``scipy.ndimage.distance_transform_edt``), divided by the object's largest.
    The nearest such pixel is always inside the grown box (clamping any farther one to the box is closer),
    so this equals the whole-image transform, at a cost that grows with the objects' boxes.
    """
    inst = as_label_array(instance)
    out = np.zeros((1, *inst.shape), np.float32)
    for index, box in object_boxes(inst, margin=1):
        mask = inst[box] == index
        dist = ndimage.distance_transform_edt(mask)
        peak = dist.max()
        if peak > 0:
            out[0][box][mask] = (dist[mask] / peak).astype(np.float32)
    return out


class Distance(Representation):
    """Class channels + normalised distance. Thresholds: ``foreground`` (object probability), ``marker``
    (predicted distance above which a pixel belongs to a core)."""

    name = "distance"
    thresholds = {"foreground": 0.5, "marker": 0.5}
    grid = {"foreground": (0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "marker": (0.3, 0.4, 0.5, 0.6, 0.7)}

    def vector_axes(self, spatial_dims: int) -> list[int | None]:
        return [None]

    def targets(self, instance: np.ndarray) -> np.ndarray:
        return distance_targets(instance)

    def postprocess(
        self, probs: np.ndarray, regression: np.ndarray | None, min_size: int = 8, **thresholds: float
    ) -> np.ndarray:
        t = self.check_thresholds(thresholds)
        if regression is None or regression.shape[0] != 1 or regression.shape[1:] != probs.shape[1:]:
            raise ValueError(f"'distance' needs one regression channel of shape {probs.shape[1:]}; got "
                             f"{None if regression is None else regression.shape}")
        fg = foreground_mask(probs, t["foreground"])
        # a light smoothing keeps pixel noise from breaking a core into several markers
        dist = ndimage.gaussian_filter(regression[0].astype(np.float32), 1.0, truncate=2.0)
        markers, _ = ndimage.label(fg & (dist >= t["marker"]))
        labels = watershed(with_borders(-dist, probs), markers, mask=fg)
        return finish_instances(labels, fg, min_size)
