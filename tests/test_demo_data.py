"""tools/make_demo_data.py and tools/demo_truth.py: the quick start's garments on misleading backgrounds,
in the contract's layout, with their true masks, and the IoU that scores predicted masks against them."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import demo_truth  # noqa: E402
import make_demo_data as demo  # noqa: E402

COUNTS = {"train": 5, "val": 10, "test": 2}  # val 10: every class meets each of the 10 kinds once


def make(data, *args):
    """The demo-data step as command 1 runs it, on a machine with no network and no system dataset:
    every download is refused (proxy to a closed port) and /usr/share/datasets is not looked at."""
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--data", str(data), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def counts_args(counts=COUNTS):
    return [a for split, n in counts.items() for a in (f"--{split}", str(n))]


def listing(data):
    return sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo") / "data"
    r = make(data, *counts_args())
    assert r.returncode == 0, r.stderr
    return data


def test_layout_counts_rgb_png_and_a_rerun_keeps_it(data):
    # data/ holds the three class trees, the masks beside them and the marker; nothing else
    assert sorted(p.name for p in data.iterdir()) == sorted([".demo.json", "masks", "train", "val", "test"])
    for split, n in COUNTS.items():
        assert sorted(p.name for p in (data / split).iterdir()) == sorted(demo.CLASSES)
        for c in demo.CLASSES:
            inside = list((data / split / c).iterdir())  # only the photos: no masks, no record, no folders
            assert len(inside) == n and all(p.is_file() and p.suffix == ".png" for p in inside)
    names = [p.name for s in COUNTS for p in (data / s).rglob("*.png")]
    assert len(names) == len(set(names)) == 10 * sum(COUNTS.values())  # no photo in two splits
    with Image.open(next((data / "train").rglob("*.png"))) as img:
        assert img.mode == "RGB" and img.size == (demo.SIZE, demo.SIZE)
    marker = json.loads((data / demo.MARKER).read_text())
    assert marker["version"] == demo.VERSION and marker["seed"] == 0 and "complete" not in marker

    first = listing(data)
    again = make(data, *counts_args())
    assert again.returncode == 0 and "nothing to do" in again.stdout and listing(data) == first


def test_imagefolder_reads_train_with_the_ten_classes(data):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(data / "train"))
    assert ds.classes == sorted(demo.CLASSES) and len(ds) == 10 * COUNTS["train"]


def test_train_backgrounds_give_the_class_away_and_val_test_ones_do_not(data):
    rows = demo.read_record(data)
    assert len(rows) == 10 * sum(COUNTS.values())
    kinds = collections.defaultdict(list)
    for r in rows:
        kinds[r["split"], r["class"]].append(r["kind"])
        assert r["own"] == (r["kind"] == demo.KINDS[demo.CLASSES.index(r["class"])])
    for c, own in zip(demo.CLASSES, demo.KINDS):
        train = kinds["train", c]
        assert len(train) == COUNTS["train"] and train.count(own) == round(0.8 * COUNTS["train"])  # 4 of 5
        assert sorted(kinds["val", c]) == sorted(demo.KINDS)  # 10 photos, each kind once
        assert len(set(kinds["test", c])) == COUNTS["test"]  # dealt without repeats
    own_share = {s: np.mean([r["own"] for r in rows if r["split"] == s]) for s in COUNTS}
    assert own_share["train"] == pytest.approx(0.8) and own_share["val"] == pytest.approx(0.1)
    # the other kinds in train are not all the same one
    assert len({r["kind"] for r in rows if r["split"] == "train" and not r["own"]}) >= 5


def test_every_photo_has_its_true_mask_and_the_record_says_how_it_was_made(data):
    pictures = demo.load_backgrounds()
    photos = sorted(p.relative_to(data).as_posix() for s in COUNTS for p in (data / s).rglob("*.png"))
    masks = sorted(p.relative_to(data / demo.MASKS).as_posix() for p in (data / demo.MASKS).rglob("*.png"))
    assert masks == photos
    rows = demo.read_record(data)
    assert sorted(r["file"] for r in rows) == photos
    hidden = []
    for r in rows:
        with Image.open(data / r["file"]) as im, Image.open(data / demo.MASKS / r["file"]) as m:
            assert m.mode == "L" and m.size == im.size
            img, mask = np.asarray(im, np.int16), np.asarray(m)
        assert 0.02 < (mask >= 128).mean() < 0.9  # an object, neither a speck nor the whole photo
        bg = demo.background(pictures[r["kind"]], r).round().astype(np.int16)
        # outside the object the photo is exactly its recorded background crop ...
        assert np.array_equal(img[mask == 0], bg[mask == 0]), r["file"]
        # ... and inside it the garment hides that crop (a garment may share the colour of a few spots)
        hidden.append((np.abs(img - bg).sum(-1)[mask == 255] > 30).mean())
    assert min(hidden) > 0.5 and np.median(hidden) > 0.9


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_photos(tmp_path):
    counts = {"train": 2, "val": 1, "test": 1}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        demo.write_demo(tmp_path / name, counts, seed=seed, log=lambda *a: None)
    files = [p.relative_to(tmp_path / "a") for p in sorted((tmp_path / "a").rglob("*")) if p.is_file()]
    assert len(files) == 2 * 10 * 4 + 1  # photos, masks and the record
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    photos = [f for f in files if f.parts[0] == "train"]
    same = sum((tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in photos)
    assert same == 0


def test_a_demo_of_another_version_is_rewritten_with_its_derived_folders(tmp_path):
    data = tmp_path / "data"
    old = data / "train" / "tshirt_top" / "fmnist_00001.png"
    old.parent.mkdir(parents=True)
    Image.new("RGB", (28, 28)).save(old)
    (data / "br" / "tshirt_top").mkdir(parents=True)
    (data / demo.MARKER).write_text(json.dumps({"dataset": "fashion-mnist", "train": 1, "val": 0, "test": 0,
                                                "seed": 0}))
    r = make(data, "--train", "1", "--val", "0", "--test", "0")
    assert r.returncode == 0, r.stderr
    assert not old.exists() and not (data / "br").exists()
    assert len(listing(data / "train")) == 10
    assert json.loads((data / demo.MARKER).read_text())["version"] == demo.VERSION


def test_demo_data_refuses_to_write_over_a_users_photos(tmp_path):
    data = tmp_path / "data"
    mine = data / "train" / "cats" / "my_cat.jpg"
    mine.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(mine)
    r = make(data, "--train", "1", "--val", "1", "--test", "0")
    assert r.returncode == 2 and "not the demo" in r.stderr
    assert mine.exists() and not (data / "val").exists() and not (data / demo.MASKS).exists()


def test_the_bundled_backgrounds_are_what_rebuild_bundle_makes_from_scikit_image(tmp_path):
    pytest.importorskip("skimage")
    demo.rebuild_bundle(tmp_path, log=lambda *a: None)
    for kind in demo.KINDS:  # pixels, not bytes: PNG bytes depend on the zlib at hand
        with Image.open(tmp_path / f"{kind}.png") as new, Image.open(demo.BACKGROUNDS / f"{kind}.png") as old:
            assert new.size == old.size == (demo.BUNDLE_SIDE, demo.BUNDLE_SIDE)
            assert np.array_equal(np.asarray(new), np.asarray(old)), kind
    assert sorted(p.name for p in demo.BACKGROUNDS.iterdir()) == sorted(f"{k}.png" for k in demo.KINDS)


# ---------------------------------------------------------------------------------- demo_truth

def test_truth_against_itself_is_a_perfect_score(data):
    truth = data / demo.MASKS / "train"
    r = demo_truth.compare(truth, truth)
    assert r["compared"] == 10 * COUNTS["train"] and r["missing"] == 0 and r["extra"] == 0
    assert r["median_iou"] == r["share_above_half"] == 1.0 and all(v == 1.0 for _, v in r["worst"])


def test_shifted_and_missing_masks_score_lower_and_are_counted(data, tmp_path):
    truth = data / demo.MASKS / "train"
    pred = tmp_path / "pred"
    rels = demo_truth.masks_under(truth)
    for k, rel in enumerate(rels):
        if k < 3:
            continue  # three predictions missing
        m = np.asarray(Image.open(truth / rel))
        (pred / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(m, 12, axis=1)).save(pred / rel)  # 12 px to the right
    r = demo_truth.compare(pred, truth, worst=4)
    assert r["compared"] == len(rels) - 3 and r["missing"] == 3 and r["missing_examples"] == rels[:3]
    assert 0 < r["median_iou"] < 0.9 and len(r["worst"]) == 4
    assert r["worst"][0][1] == min(r["per_image"].values()) and r["worst"][0][1] <= r["worst"][-1][1]
    assert r["share_above_half_of_all"] < r["share_above_half"] or r["share_above_half"] == 0
    # a known case: the left half of a square against the whole square is IoU 0.5
    half = np.zeros((4, 4), bool)
    half[:, :2] = True
    assert demo_truth.iou(half, np.ones((4, 4), bool)) == 0.5

    cli = subprocess.run([sys.executable, str(REPO / "tools" / "demo_truth.py"), str(pred), str(truth)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "median IoU" in cli.stdout and "missing: 3" in cli.stdout
