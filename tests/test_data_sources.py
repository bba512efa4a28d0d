"""Bring-your-own-data sources on small files written here: an ImageFolder (PNG and JPEG, RGB and grey, masks,
vectors), downsampled-ImageNet npz files, and the ArrayRecord shards `prepare` writes from both. Pixels against a
numpy reference of Pillow's integer arithmetic; labels from class folders; masks aligned with their images through
crop and flip; folder == array_record batch for batch; per-process rows; every bad input as one clear error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmdiff_jax.data import augment, pipeline, prepare, shapes, sources
from mmdiff_jax.data.sources import array_record, folder
from mmdiff_jax.data.sources.base import DataError, decode
from mmdiff_jax.errors import UserError
from tests import pillow_reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
CLASSES = ("bird", "cat", "dog")  # sorted: ids 0, 1, 2


def _save(path: str, pixels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _blocky(rng, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3] constant on 2x2 blocks (so box halving and nearest neighbour agree)."""
    small = rng.integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 2, 0), 2, 1)


def _mask_of(image: np.ndarray) -> np.ndarray:
    """The test masks are a function of the pixel: class 0..3 from the red channel."""
    return (image[..., 0] // 64).astype(np.uint8)


def write_folder(root: str, seed: int = 0, per_class: int = 4, masks: bool = True, vectors: bool = True) -> dict:
    """ROOT/{train,test}/<class>/ of PNG (RGB and grey) and JPEG images of mixed sizes (2x, exact, wider), masks
    and vectors.
    Returns {split: [relative paths]}."""
    rng = np.random.default_rng(seed)
    sizes = [(2 * SIZE, 2 * SIZE + 8), (SIZE, SIZE + 4), (2 * SIZE + 4, 2 * SIZE), (SIZE + 6, SIZE)]
    listing = {}
    for split in ("train", "test"):
        listing[split] = []
        for cls in CLASSES:
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                image = _blocky(rng, h, w)
                ext = "jpg" if i == per_class - 1 else "png"
                rel = f"{cls}/{i:02d}.{ext}"
                if i == 1:  # a grey file (mode L): RGB conversion repeats its channel
                    image = np.repeat(image[..., :1], 3, axis=-1)
                    _save(os.path.join(root, split, rel), image[..., 0])
                else:
                    _save(os.path.join(root, split, rel), image)
                if masks:
                    _save(os.path.join(root, f"{split}_masks", cls, f"{i:02d}.png"), _mask_of(image))
                listing[split].append(rel)
        if vectors:
            names = np.array(listing[split][::-1])  # any order: matched by name
            np.savez(os.path.join(root, f"{split}_vectors.npz"), names=names,
                     vectors=np.stack([[len(n), hash(n) % 7, i] for i, n in enumerate(names)]).astype(np.float64))
    return listing


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    write_folder(root)
    return root


@pytest.fixture(scope="module")
def prepared(data_root, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("prepared")), "shards")
    prepare.prepare("folder", data_root, out, image_size=SIZE, mask_classes=4, shard_size=5, workers=2)
    return out


def _folder(root, split="train", **kw):
    return sources.get_source("folder", split, root=root, image_size=kw.pop("image_size", SIZE),
                              mask_classes=kw.pop("mask_classes", 4), **kw)


def _expected_pixels(path: str, channels: int = 3) -> np.ndarray:
    """The numpy reference of load_image: decode, (grey), box halvings, bicubic to the short side, centre crop."""
    with Image.open(path) as img:
        x = np.asarray(img.convert("RGB"))
    if channels == 1:
        x = ref.grey(x)
    while min(x.shape[:2]) >= 2 * SIZE:
        x = ref.box_halve(x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2])
    h, w = x.shape[:2]
    scale = SIZE / min(h, w)
    new_w, new_h = max(SIZE, round(w * scale)), max(SIZE, round(h * scale))
    if (new_w, new_h) != (w, h):
        x = ref.bicubic_resize(x, new_w, new_h)
    x = ref.centre_crop(x, SIZE)
    return x[..., None] if channels == 1 else x


def test_pixels_match_the_numpy_reference(data_root):
    listing = _folder(data_root).listing
    modes = set()
    for i, rel in enumerate(listing.paths):
        with Image.open(listing.image_path(i)) as img:
            modes.add((img.format, img.mode))
    assert {("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB")} <= modes
    for channels in (3, 1):
        src = _folder(data_root, channels=channels)
        for i in range(len(src)):
            got = src[i]["image"]
            assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, channels)
            np.testing.assert_array_equal(got, _expected_pixels(src.listing.image_path(i), channels))
        model_form = decode(src[0])["image"]
        assert model_form.dtype == np.float32
        np.testing.assert_array_equal(model_form, src[0]["image"].astype(np.float32) / np.float32(127.5) - 1)


def test_bicubic_reference_is_pillow_exactly():
    """The reference itself, on odd sizes up and down (the folder test above exercises only some of them)."""
    rng = np.random.default_rng(1)
    for h, w, oh, ow in [(37, 53, 16, 23), (20, 20, 33, 33), (50, 70, 19, 27)]:
        x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(ref.bicubic_resize(x, ow, oh),
                                      np.asarray(Image.fromarray(x).resize((ow, oh), Image.BICUBIC)))


def test_labels_follow_sorted_class_folders(data_root):
    src = _folder(data_root)
    assert src.class_names == CLASSES
    for i, rel in enumerate(src.listing.paths):
        assert int(src[i]["label"]) == CLASSES.index(rel.split("/")[0])


def test_masks_stay_aligned_through_resize_crop_and_flip(data_root):
    src = _folder(data_root)
    flip = augment.RandomFlip()
    flipped_seen = 0
    for i in range(len(src)):
        example = src[i]
        if src.listing.paths[i].endswith(".jpg"):  # lossy pixels: the mask came from the PNG it was saved from
            continue
        np.testing.assert_array_equal(example["mask"], _mask_of(example["image"]))
        for seed in range(2):
            out = flip(example, np.random.default_rng(seed))
            np.testing.assert_array_equal(out["mask"], _mask_of(out["image"]))
            flipped_seen += not np.array_equal(out["image"], example["image"])
    assert flipped_seen > 0


def test_vectors_follow_their_names_and_are_standardized_with_train_statistics(data_root):
    train, test = _folder(data_root), _folder(data_root, "test")
    raw = {}
    for split in ("train", "test"):
        with np.load(os.path.join(data_root, f"{split}_vectors.npz")) as f:
            raw[split] = dict(zip(f["names"].tolist(), f["vectors"]))
    train_raw = np.stack([raw["train"][p] for p in train.listing.paths])
    mean, std = train_raw.mean(0), np.maximum(train_raw.std(0), 1e-3)
    for src, split in ((train, "train"), (test, "test")):
        for i, p in enumerate(src.listing.paths):
            np.testing.assert_allclose(src[i]["vector"], (raw[split][p] - mean) / std, rtol=1e-6)


def test_folder_and_array_record_give_identical_batches(data_root, prepared):
    info = json.load(open(os.path.join(prepared, "info.json")))
    assert info["class_names"] == list(CLASSES) and info["splits"]["train"]["count"] == 12
    assert len(info["splits"]["train"]["shards"]) == 3  # 5 + 5 + 2
    for split in ("train", "test"):
        a, b = _folder(data_root, split), sources.get_source("array_record", split, path=prepared)
        assert len(a) == len(b) and a.class_names == b.class_names
        flips = [augment.RandomFlip()]
        it_a = pipeline.train_iterator(a, 4, seed=7, random_map=flips)
        it_b = pipeline.train_iterator(b, 4, seed=7, random_map=flips)
        for _ in range(5):  # more than an epoch
            x, y = next(it_a), next(it_b)
            assert sorted(x) == sorted(y) == ["image", "label", "mask", "vector"]
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            assert x["image"].dtype == np.float32 and x["mask"].dtype == np.int32


def test_array_record_rows_per_process_and_exact_resume(prepared):
    src = sources.get_source("array_record", "train", path=prepared)
    whole = pipeline.train_iterator(src, 6, seed=3)
    blocks = [pipeline.train_iterator(src, 6, 3, b, 3) for b in range(3)]
    for _ in range(4):
        full = next(whole)
        parts = [next(it) for it in blocks]
        np.testing.assert_array_equal(full["image"], np.concatenate([p["image"] for p in parts]))
    state = whole.get_state()
    expected = [next(whole)["label"] for _ in range(3)]
    resumed = pipeline.train_iterator(src, 6, seed=3)
    resumed.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["label"], want)


def test_grain_workers_deliver_the_same_stream(prepared):
    src = sources.get_source("array_record", "train", path=prepared)
    plain = pipeline.train_iterator(src, 4, seed=5)
    workers = pipeline.train_iterator(src, 4, seed=5, workers=2, worker_buffer=2)
    for _ in range(4):
        x, y = next(plain), next(workers)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    state = workers.get_state()
    want = next(workers)["label"]
    again = pipeline.train_iterator(src, 4, seed=5, workers=2, worker_buffer=2)
    again.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(again)["label"], want)


def _write_npz(path: str, data: np.ndarray, labels: np.ndarray) -> None:
    np.savez(path, data=data, labels=labels)


def test_imagenet64_npz_is_channel_major_and_one_based(tmp_path):
    rng = np.random.default_rng(0)
    side, n = 8, [5, 3]
    arrays = {}
    for k, count in enumerate(n, start=1):
        data = rng.integers(0, 256, (count, 3 * side * side), dtype=np.uint8)
        labels = rng.integers(1, 1001, count)
        _write_npz(str(tmp_path / f"train_data_batch_{k}.npz"), data, labels)
        arrays[k] = (data, labels)
    _write_npz(str(tmp_path / "val_data.npz"), arrays[1][0][:2], arrays[1][1][:2])
    src = sources.get_source("imagenet64", "train", root=str(tmp_path))
    assert len(src) == 8
    data = np.concatenate([arrays[1][0], arrays[2][0]])
    labels = np.concatenate([arrays[1][1], arrays[2][1]])
    for i in range(len(src)):
        image = src[i]["image"]
        for y, x, c in [(0, 0, 0), (3, 5, 1), (7, 2, 2)]:
            assert image[y, x, c] == data[i, c * side * side + y * side + x]
        assert src[i]["label"] == labels[i] - 1
    out = str(tmp_path / "shards")
    prepare.prepare("imagenet64", str(tmp_path), out, shard_size=2, workers=2)
    shards = sources.get_source("array_record", "train", path=out)
    assert len(shards) == 8 and len(json.load(open(os.path.join(out, "info.json")))["splits"]["train"]["shards"]) == 5
    for i in range(len(src)):
        np.testing.assert_array_equal(shards[i]["image"], src[i]["image"])
        assert shards[i]["label"] == src[i]["label"]
    with pytest.raises(DataError, match="allow_pickle|pickle"):
        np.savez(str(tmp_path / "val_data.npz"), data=arrays[1][0][:2], labels=np.array([1, "x"], dtype=object))
        sources.get_source("imagenet64", "test", root=str(tmp_path))


def test_shapes_follow_the_data(data_root, prepared):
    from mmdiff_jax.configs import folder_image_label, folder_image_mask

    c = folder_image_label.get_config("smoke")
    c.data.source_kwargs.root = data_root
    for size, levels, bottom in [(8, 2, 4), (16, 3, 4), (32, 4, 4), (64, 4, 8)]:
        c.data.image_size = size
        r = shapes.resolve(c)
        assert r.latent_shape == (size, size, 3) and r.modalities.image.shape == (size, size, 3)
        assert r.modalities.label.num_classes == 3 and len(r.model.channels) == levels
        assert size % 2 ** (levels - 1) == 0 and size // 2 ** (levels - 1) == bottom
    c.latent_shape = (16, 16, 1)
    with pytest.raises(UserError, match="latent_shape"):
        shapes.resolve(c)
    m = folder_image_mask.get_config("array_record_smoke")
    m.data.source_kwargs.path = prepared
    with pytest.raises(UserError, match="num_classes"):
        shapes.resolve(m)
    m.modalities.mask.num_classes = 4
    r = shapes.resolve(m)
    assert r.latent_shape == (SIZE, SIZE, 3) and r.modalities.mask.shape == (SIZE, SIZE)


def test_the_check_is_cached(data_root, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    _folder(data_root, cache_dir=cache)
    monkeypatch.setattr(folder, "_check_one", lambda *a: "should not run")
    _folder(data_root, cache_dir=cache)  # cached: no file is opened again
    with pytest.raises(DataError, match="should not run"):
        _folder(data_root, cache_dir=str(tmp_path / "other"))


# Bad input: each problem stops the run before training with one line naming the file.
def _break(root: str, what: str) -> str:
    """Damage a fresh copy of the test folder; returns the name the error must mention."""
    write_folder(root, masks=True, vectors=True)
    if what == "corrupt image":
        with open(os.path.join(root, "train", "cat", "01.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really")
        return "cat/01.png"
    if what == "truncated jpeg":
        path = os.path.join(root, "train", "dog", "03.jpg")
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
        return "dog/03.jpg"
    if what == "mask size":
        _save(os.path.join(root, "train_masks", "bird", "00.png"), np.zeros((5, 5), np.uint8))
        return "bird/00.png"
    if what == "mask value":
        _save(os.path.join(root, "train_masks", "bird", "01.png"), np.full((SIZE, SIZE + 4), 9, np.uint8))
        return "outside the classes"
    if what == "empty class":
        os.makedirs(os.path.join(root, "train", "eel"))
        return "eel"
    if what == "no images":
        for split in ("train", "test"):
            for cls in CLASSES:
                for f in os.listdir(os.path.join(root, split, cls)):
                    os.remove(os.path.join(root, split, cls, f))
                os.rmdir(os.path.join(root, split, cls))
        return "no class folders"
    if what == "test classes":
        os.rename(os.path.join(root, "test", "dog"), os.path.join(root, "test", "wolf"))
        return "class folders differ"
    if what == "vector names":
        np.savez(os.path.join(root, "train_vectors.npz"), names=np.array(["cat/00.png"]), vectors=np.zeros((1, 3)))
        return "no vector for image"
    raise ValueError(what)


BAD = ["corrupt image", "truncated jpeg", "mask size", "mask value", "empty class", "no images", "test classes",
       "vector names"]


@pytest.mark.parametrize("what", BAD)
def test_bad_folders_are_refused_naming_the_file(tmp_path, what):
    root = str(tmp_path / "data")
    needle = _break(root, what)
    with pytest.raises(DataError, match=None) as e:
        _folder(root, "test" if what == "test classes" else "train")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("what", ["missing", "truncated", "mismatched"])
def test_bad_shards_are_refused_naming_the_shard(prepared, tmp_path, what):
    import shutil

    path = str(tmp_path / "copy")
    shutil.copytree(prepared, path)
    shard = os.path.join(path, "train-00001-of-00003.array_record")
    if what == "missing":
        os.remove(shard)
    elif what == "truncated":
        blob = open(shard, "rb").read()
        open(shard, "wb").write(blob[:-100])
    else:
        shutil.copy(os.path.join(path, "train-00002-of-00003.array_record"), shard)
    with pytest.raises(DataError) as e:
        sources.get_source("array_record", "train", path=path)
    assert "train-00001-of-00003" in str(e.value)


def test_prepare_cli_fails_cleanly_and_writes_nothing(tmp_path):
    root = str(tmp_path / "data")
    _break(root, "corrupt image")
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "-m", "mmdiff_jax.data.prepare", "--source", "folder", "--root", root,
                          "--out", out, "--image_size", str(SIZE)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cat/01.png" in errors[0] and "Traceback" not in run.stderr
    assert os.listdir(str(tmp_path)) == ["data"]  # no OUT, no temporary folder


def test_prepare_refuses_an_existing_output(data_root, prepared):
    with pytest.raises(UserError, match="already exists"):
        prepare.prepare("folder", data_root, prepared, image_size=SIZE)
    assert array_record.read_info(prepared)["splits"]["train"]["count"] == 12  # untouched
