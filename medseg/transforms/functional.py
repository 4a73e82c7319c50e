"""Pure operations behind the transforms: label conversion, warps and colour (border weight map: weight_map).

Arrays are channel-free here (``H W [D]`` for label maps, ``nd H W [D]`` for sampling coordinates);
the channel-first wrappers live in :mod:`medseg.transforms.array`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries


# ---------------------------------------------------------------------------------------------- label maps
def as_label_array(labels, name: str = "instance map") -> np.ndarray:
    """Integer numpy copy of a label map (no channel); float maps must hold whole, non-negative numbers."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold whole numbers (label ids), got non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer or float array, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (0 = background), got minimum {arr.min()}")
    return arr


def instances_to_semantic(instance, mode: str = "cell_border", border_width: int = 1) -> np.ndarray:
    """Semantic target from instance ids, uint8.

    Args:
        instance: instance ids ``H W [D]``.
        mode: ``"foreground"``: 0 background, 1 object. ``"cell_border"``: 0 background, 1 cell interior,
            2 border = object pixels within ``border_width`` steps (face neighbours) of a pixel with another
            id, background included; touching cells thus get separated interiors. The image edge is not
            a border.
        border_width: border thickness in pixels.
    """
    inst = as_label_array(instance)
    if mode == "foreground":
        return (inst > 0).astype(np.uint8)
    if mode != "cell_border":
        raise ValueError(f"mode must be 'cell_border' or 'foreground', got {mode!r}")
    if border_width < 1:
        raise ValueError(f"border_width must be >= 1, got {border_width}")
    # Pixels next to another id (both sides, background included), then widened: a pixel within w steps of
    # another id is within w - 1 steps of such a pair (tests/test_library_equivalence.py checks it).
    border = find_boundaries(inst, connectivity=1, mode="thick")
    if border_width > 1:
        cross = ndi.generate_binary_structure(inst.ndim, 1)
        border = ndi.binary_dilation(border, structure=cross, iterations=border_width - 1)
    out = (inst > 0).astype(np.uint8)
    out[(inst > 0) & border] = 2
    return out


# -------------------------------------------------------------------------------------------------- warps
def identity_coords(shape: Sequence[int], device=None) -> torch.Tensor:
    """Pixel coordinates ``nd H W [D]`` (float32) of a grid of ``shape``."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def upsample_field(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Cubic upsampling of a coarse field ``C h w [d]`` to ``C *shape``; the corners stay aligned.

    3D uses bicubic over (H, W) and then over (W, D) with W unchanged (an exact identity there), i.e.
    separable cubic interpolation, which torch lacks as a single call.
    """
    shape = tuple(int(s) for s in shape)
    if field.ndim == 3:
        return F.interpolate(field[None], size=shape, mode="bicubic", align_corners=True)[0]
    c, h, w, d = field.shape
    big_h, big_w, big_d = shape
    x = field.permute(0, 3, 1, 2).reshape(1, c * d, h, w)
    x = F.interpolate(x, size=(big_h, big_w), mode="bicubic", align_corners=True)
    x = x.reshape(c, d, big_h, big_w).permute(0, 2, 3, 1).reshape(1, c * big_h, big_w, d)
    x = F.interpolate(x, size=(big_w, big_d), mode="bicubic", align_corners=True)
    return x.reshape(c, big_h, big_w, big_d)


def elastic_coords(shape: Sequence[int], control: torch.Tensor) -> torch.Tensor:
    """Sampling coordinates ``nd *shape``: identity plus a displacement (pixels) interpolated from
    ``control`` (``nd *control_grid``), whose corners sit on the image corners."""
    return identity_coords(shape, control.device) + upsample_field(control, shape)


def optical_coords(shape: Sequence[int], k: float, center: Sequence[float]) -> torch.Tensor:
    """Sampling coordinates of a radial (barrel/pincushion) distortion, ``nd *shape``.

    An output pixel ``p`` samples ``c + (p - c) * (1 + k * r^2)`` with ``r = |p - c| / R``, ``c`` the
    centre (pixels) and ``R`` half the largest extent. ``k > 0``: barrel (the border is squeezed in),
    ``k < 0``: pincushion.
    """
    coords = identity_coords(shape)
    c = torch.as_tensor(center, dtype=torch.float32).reshape(-1, *([1] * len(shape)))
    radius = max(max((n - 1) / 2.0 for n in shape), 1.0)
    rel = coords - c
    r2 = (rel / radius).pow(2).sum(0, keepdim=True)
    return c + rel * (1.0 + k * r2)


def warp(img: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "reflection"):
    """Sample a channel-first image ``C *spatial`` at pixel coordinates ``nd *spatial``.

    ``padding_mode="reflection"`` mirrors about the edge pixels, so image and labels get the same context.
    Non-float inputs come back in their dtype (use ``mode="nearest"`` for them).
    """
    shape = img.shape[1:]
    coords = coords.to(img.device)
    norm = [coords[a] * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros_like(coords[a]) for a, n in enumerate(shape)]
    grid = torch.stack(norm[::-1], dim=-1)[None]  # grid_sample wants (x, y[, z]) = reversed axes
    src = torch.as_tensor(img)
    out = F.grid_sample(
        src.float()[None].as_subclass(torch.Tensor), grid, mode=mode, padding_mode=padding_mode, align_corners=True
    )[0]
    if not src.dtype.is_floating_point:
        out = out.round().to(src.dtype)
    elif out.dtype != src.dtype:
        out = out.to(src.dtype)
    return out


# ------------------------------------------------------------------------------------------------- colour
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_jitter(
    img: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0, hue: float = 0.0
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue changes of an image ``C *spatial``, in that order.

    Factors of 1 (hue 0) change nothing. Brightness multiplies; contrast scales about the mean grey
    level; saturation blends with the grey image (luma); hue rotates the chroma plane of YIQ by
    ``hue`` turns (a linear stand-in for an HSV hue shift). Saturation and hue need 3 channels (RGB) and
    are skipped for other channel counts. Values are not clipped.
    """
    out = img.float() * brightness if brightness != 1.0 else img.float()
    rgb = out.shape[0] == 3
    weights = _RGB_TO_YIQ[0].to(out.device).reshape(3, *([1] * (out.ndim - 1))) if rgb else None
    if contrast != 1.0:
        mean = (out * weights).sum(0).mean() if rgb else out.mean()
        out = mean + (out - mean) * contrast
    if rgb and saturation != 1.0:
        grey = (out * weights).sum(0, keepdim=True)
        out = grey + (out - grey) * saturation
    if rgb and hue != 0.0:
        t = _RGB_TO_YIQ.to(out.device)
        cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], device=out.device)
        matrix = torch.linalg.inv(t) @ rot @ t
        out = torch.einsum("ij,j...->i...", matrix, out)
    return out.to(img.dtype) if img.dtype.is_floating_point else out
