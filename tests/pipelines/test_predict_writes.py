"""How `medseg predict` writes what it computed: the probabilities archive at a chosen zlib level."""

import io
import zipfile

import numpy as np
import pytest

from pipelines.predict import savez_compressed


@pytest.mark.parametrize("level", [None, 0, 1, 9])
def test_probabilities_archive_reads_back_with_numpy_at_every_level(level):
    rng = np.random.default_rng(0)
    arrays = {"probabilities": rng.random((2, 16, 16, 8)).astype(np.float16),
              "regression": rng.standard_normal((2, 16, 16, 8)).astype(np.float32)}
    buffer = io.BytesIO()
    savez_compressed(buffer, arrays, level)
    buffer.seek(0)
    with np.load(buffer) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype
            np.testing.assert_array_equal(loaded[name], array)


def test_a_higher_compression_level_writes_a_smaller_archive():
    smooth = np.repeat(np.linspace(0, 1, 64, dtype=np.float16)[None], 256, 0)  # compressible
    sizes = {}
    for level in (0, 9):
        buffer = io.BytesIO()
        savez_compressed(buffer, {"probabilities": smooth}, level)
        sizes[level] = len(buffer.getvalue())
        with zipfile.ZipFile(buffer) as archive:
            assert archive.infolist()[0].compress_type == zipfile.ZIP_DEFLATED
    assert sizes[0] > smooth.nbytes  # level 0 stores the bytes as they are
    assert sizes[9] < sizes[0] / 4
