"""Synthetic datasets for demos and tests: fluorescence nuclei (instances) and lesions (2D and 3D).

Nothing is downloaded. Each generator writes an MSD / nnU-Net style folder::

    out/dataset.json
    out/imagesTr/<case>_0000<ext>   out/labelsTr/<case><ext>
    out/imagesTs/<case>_0000<ext>   out/labelsTs/<case><ext>     (only when n_test > 0)

Every case draws from its own generator seeded by ``(seed, split, index)``, so a call is
deterministic, ``n=4`` writes exactly the first four cases of ``n=8``, and the held-out cases do
not depend on ``n``. Rendering is vectorised numpy/scipy; loops run over objects, never pixels.
Sizes and spacings are ``x y [z]``, medseg's axis convention (see the README). The preview picture
is drawn by the ``medseg synth`` pipeline, not here.
"""

from medseg.data.synth.cells import make_cells
from medseg.data.synth.lesions import make_lesions

__all__ = ["make_cells", "make_lesions"]
