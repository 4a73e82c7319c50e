"""``flows``: the class channels plus a vector field, one channel per spatial axis: HoVer-Net's horizontal /
vertical (/ depth) maps, each pixel's offset from its object's centre of mass along that axis, normalised per
object and side to [-1, 1].

Why HoVer-Net's maps and not Cellpose's flows. Cellpose trains on the gradients of a centre-seeking potential
obtained by simulating diffusion in each object, and finds instances by moving every pixel along the
predicted field for ~200 interpolated steps and clustering the end points. Following the field is the
stronger idea for thin, curved shapes (where a centre of mass can lie outside the object), but the targets
are an iterative simulation and the post-processing is hundreds of passes over every pixel, far beyond
0.25 s per 512^2 image on one core, and heavier still in 3D. The offset maps are exact (closed form per
object), per axis and so the same in 3D, they turn with the image (a flip of an axis negates that
component, a 90-degree turn swaps two components and negates one), and they are cheap to decode: across
the border between two touching objects every component jumps (from +1 to -1 along the axis joining
them), inside an object it changes slowly. Nuclei are star-shaped, where a centre of mass is inside.

Post-processing: the foreground is ``P(object) >= foreground``; the *axial slope* is the smallest derivative
of a component along its own axis (:func:`axial_slope`): positive inside an object, strongly negative across
the border between touching ones (the field converges there, it diverges from every centre). Markers are
the connected foreground regions whose slope exceeds ``slope``, so the cores of touching nuclei never connect;
cores under ``marker_size`` x ``min_size`` pixels are dropped as HoVer-Net drops small markers (on a learned
field a few noisy pixels inside a nucleus pass the threshold and would split it: at equal budget this took
the held-out AP@0.5:0.95 from 0.68 to 0.78, fewer splits and fewer merges, since the tuned slope could then be
stricter). A watershed on ``-slope`` (plus the border probability with a border class) grows them over the
foreground, the borders being its ridges. The slope only uses
differences of neighbouring pixels, so it does not care that each object's maps are scaled differently, and
it held up against noise of 0.15 on the maps (AP@0.5 0.99 on 200 touching cells) where thresholding
``|v|`` near the centres did not (a blurred border averages +1 and -1 to a false "centre").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from medseg.instances.base import (
    Representation,
    finish_instances,
    foreground_mask,
    label_markers,
    median_object_size,
    object_boxes,
    with_borders,
)
from medseg.transforms.functional import as_label_array


def flow_targets(instance) -> np.ndarray:
    """Normalised offsets from each object's centre of mass, ``nd *S`` float32 (channel ``a`` = axis ``a``).

    Per object, inside its bounding box: ``x_a - c_a`` for the object's pixels ``x``, divided by the
    largest such offset on its side (negative offsets by the largest negative magnitude, positive ones by
    the largest positive), so every component spans [-1, 1] within the object; 0 on background.
    """
    inst = as_label_array(instance)
    out = np.zeros((inst.ndim, *inst.shape), np.float32)
    for index, box in object_boxes(inst):
        mask = inst[box] == index
        coords = np.nonzero(mask)
        for axis, (c, s) in enumerate(zip(coords, box)):
            pos = c + s.start  # image coordinates, so the result does not depend on the box
            offset = pos - pos.mean()
            neg, plus = offset < 0, offset > 0
            if neg.any():
                offset[neg] /= -offset[neg].min()
            if plus.any():
                offset[plus] /= offset[plus].max()
            out[axis][box][mask] = offset.astype(np.float32)
    return out


def axial_slope(field: np.ndarray) -> np.ndarray:
    """``min_a d v_a / d x_a``, the smallest derivative of a component along its own axis (central
    differences, one-sided at the image edge), ``*S`` float32.

    Inside an object every component grows away from the centre, so the slope is positive; across the
    border between two touching objects the component along the axis joining them falls from about +1 to
    -1, so it is strongly negative there. (The sum of the slopes, the divergence, dilutes that fall with
    the other axes' growth where a border runs diagonally; the minimum does not.)
    """
    slope = np.gradient(field[0], axis=0).astype(np.float32)
    for axis in range(1, field.shape[0]):
        np.minimum(slope, np.gradient(field[axis], axis=axis), out=slope)
    return slope


class Flows(Representation):
    """Class channels + per-axis normalised offset maps. Thresholds: ``foreground`` (object probability),
    ``slope`` (smallest axial slope of a core pixel), ``marker_size`` (smallest core kept, in multiples of the
    post-processing's ``min_size``, so it scales with the objects where ``min_size`` does), ``smooth`` (sigma in
    pixels of the Gaussian applied to the maps before the slope, 0: none; it removes noise inside objects but
    weakens the fall across a short contact, so the validation cases choose). The values tuned for ``smooth``
    and ``marker_size`` scale with the validation objects (:meth:`tuning_grid`)."""

    name = "flows"
    thresholds = {"foreground": 0.5, "slope": -0.1, "marker_size": 2.0, "smooth": 0.0}
    grid = {"foreground": (0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "slope": (-0.2, -0.1, 0.0, 0.1),
            "marker_size": (0.0, 1.0, 2.0, 4.0, 8.0), "smooth": (0.0, 2.0)}
    uses_gradient = True
    # The MSE of the maps weighs 3: our class loss (Dice over cell and border + CE weighted by the border map, up
    # to w0 + 1 = 11 near contacts) outweighs HoVer-Net's two-class one, which its MSE x 1 + MSGE x 2 balance.
    # benchmarks/instances.py's data and budget, 4 seeds: held-out AP@0.5:0.95 0.790 -> 0.799 (MSE x 3), 0.802
    # (x 6), merges 52 -> 36 / 37; larger nuclei, 2 seeds: no change (0.873 -> 0.878 on fp32 outputs, 0.883 ->
    # 0.878 through the benchmark). Small, within seed noise, but fewer merges, which real nuclei suffer from.
    loss_weights = {"mse": 3.0, "msge": 1.0}

    # Tuning values that scale with the objects (the fixed ``grid`` fits nuclei ~18 px across): the smoothing as a
    # fraction of the median equivalent diameter, the smallest core as a fraction of the median object size.
    smooth_fractions = (0.0, 0.05, 0.1, 0.15)
    marker_fractions = (0.0, 0.025, 0.05, 0.1, 0.2)

    def vector_axes(self, spatial_dims: int) -> list[int | None]:
        return list(range(spatial_dims))

    def tuning_grid(self, references, min_size: int = 8) -> dict[str, tuple[float, ...]]:
        """``grid`` with ``smooth`` and ``marker_size`` scaled to the reference objects' median size: a field
        learned on large nuclei is noisy over a larger scale and its spurious cores are larger (nuclei ~29 px
        across, the same weights tuned both ways, three trainings: held-out AP@0.5:0.95 0.807 -> 0.866 where the
        fixed grid chose its largest marker_size and no smoothing, 0.830 -> 0.840, 0.909 -> 0.906). Nuclei ~18 px
        across get about the fixed grid (mean of 4 seeds 0.791 -> 0.790)."""
        grid = dict(self.grid)
        size, diameter = median_object_size(references)
        if size > 0:
            grid["smooth"] = tuple(sorted({round(f * diameter, 1) for f in self.smooth_fractions}))
            grid["marker_size"] = tuple(sorted({round(f * size / max(min_size, 1), 1) for f in self.marker_fractions}))
        return grid

    def targets(self, instance: np.ndarray) -> np.ndarray:
        return flow_targets(instance)

    def postprocess(
        self, probs: np.ndarray, regression: np.ndarray | None, min_size: int = 8, **thresholds: float
    ) -> np.ndarray:
        t = self.check_thresholds(thresholds)
        dims = probs.ndim - 1
        if regression is None or regression.shape != (dims, *probs.shape[1:]):
            raise ValueError(f"'flows' needs {dims} regression channels of shape {probs.shape[1:]}; got "
                             f"{None if regression is None else regression.shape}")
        fg = foreground_mask(probs, t["foreground"])
        field = regression.astype(np.float32, copy=False)
        if t["smooth"] > 0:  # a learned field is noisy inside objects; HoVer-Net too differentiates a smoothed map
            field = np.stack([ndimage.gaussian_filter(c, t["smooth"]) for c in field])
        slope = axial_slope(field)
        markers = label_markers(fg & (slope > t["slope"]), t["marker_size"] * min_size)
        labels = watershed(with_borders(-slope, probs), markers, mask=fg)
        return finish_instances(labels, fg, min_size)
