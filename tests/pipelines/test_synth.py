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


def test_lesions_spacing_option(tmp_path):
    from medseg.data.readers import load_image, spacing_of
    from medseg.errors import ConfigError
    from pipelines.cli import build_parser
    from pipelines.synth import run_synth

    parser = build_parser()
    args = parser.parse_args(["synth", "lesions", "--out", str(tmp_path / "l"), "--n", "1", "--size", "32", "32",
                              "16", "--spacing", "0.8", "0.8", "4"])
    run_synth(args)
    image = load_image(sorted((tmp_path / "l" / "imagesTr").iterdir())[0])
    np.testing.assert_allclose(spacing_of(image), [0.8, 0.8, 4.0], rtol=1e-5)
    args = parser.parse_args(["synth", "lesions", "--out", str(tmp_path / "m"), "--dims", "2", "--spacing", "1",
                              "1", "1"])
    with pytest.raises(ConfigError, match="--spacing"):
        run_synth(args)
