"""`medseg synth`'s preview: drawn by the pipeline from the files the generator wrote."""

import numpy as np
import pytest
from PIL import Image

from medseg.data.synth import make_cells, make_lesions
from pipelines.synth import write_preview


@pytest.mark.parametrize(
    "make",
    [
        lambda out: make_cells(out, n=3, n_test=1, seed=0),
        lambda out: make_lesions(out, n=3, n_test=1, seed=0, dims=3),
        lambda out: make_lesions(out, n=3, n_test=1, seed=0, dims=2),
    ],
    ids=["cells", "lesions3d", "lesions2d"],
)
def test_preview_is_a_real_picture(make, tmp_path):
    root = make(tmp_path / "ds")
    assert not (root / "preview.png").exists()  # the library writes data only
    preview = np.asarray(Image.open(write_preview(root)).convert("RGB"))
    assert preview.shape[0] > 200 and preview.shape[1] > 600
    packed = (preview[..., 0].astype(np.int32) << 16) | (preview[..., 1].astype(np.int32) << 8) | preview[..., 2]
    assert preview.std() > 20 and len(np.unique(packed)) > 100
