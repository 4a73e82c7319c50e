import json

import pytest

from medseg.data.splits import load_or_create_folds, make_folds
from medseg.errors import DataError

NAMES = [f"case{i:02d}" for i in range(11)]


@pytest.mark.parametrize("k", [2, 3, 5, 11])
def test_folds_validate_every_case_exactly_once(k):
    folds = make_folds(NAMES, k, seed=3)
    assert len(folds) == k
    validated = [n for f in folds for n in f["val"]]
    assert sorted(validated) == sorted(NAMES)  # each case once
    for f in folds:
        assert set(f["train"]) | set(f["val"]) == set(NAMES) and not set(f["train"]) & set(f["val"])
    sizes = [len(f["val"]) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert make_folds(list(reversed(NAMES)), k, seed=3) == folds  # a function of the names, not their order


def test_written_once_then_read_back(tmp_path):
    path = tmp_path / "splits.json"
    first = load_or_create_folds(path, NAMES, 5, seed=0)
    assert json.loads(path.read_text()) == first
    assert load_or_create_folds(path, NAMES, 5, seed=99) == first  # the file wins over a new seed


def test_user_splits_win(tmp_path):
    path = tmp_path / "splits.json"
    mine = [{"train": NAMES[3:], "val": NAMES[:3]}, {"train": NAMES[:3], "val": NAMES[3:]}]
    path.write_text(json.dumps(mine))
    assert load_or_create_folds(path, NAMES, 2) == mine


@pytest.mark.parametrize("content, match", [
    ([{"train": ["nope"], "val": NAMES[:2]}], "not in the dataset"),
    ([{"train": NAMES, "val": NAMES[:2]}], "both train and val"),
    ({"train": []}, "non-empty list"),
    ([{"train": NAMES[2:], "val": NAMES[:2]}], "holds 1 folds but data.folds is 2"),
])
def test_bad_splits_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=match) as err:
        load_or_create_folds(path, NAMES, 2)
    assert str(path) in str(err.value)
