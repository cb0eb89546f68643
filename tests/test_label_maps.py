"""Semantic label maps: paired folders, TFDS features, colour clusters, geometry, clear errors."""

import numpy as np
import pytest
from PIL import Image

from tests.conftest import folder_config
from vqjax.data import label_maps as lm
from vqjax.data import sources
from vqjax.data.pipeline import Preprocess, eval_batches, train_dataset
from vqjax.errors import ConfigError

IDS = (0, 2, 5)  # the ids the maps hold: a resize that interpolated would invent others
CLASSES = 6


def _blocks(rng, h=40, w=48, block=8):
  """ids [h, w] constant on block x block squares, and an image whose R channel is 40 * id."""
  ids = np.kron(rng.choice(IDS, (h // block, w // block)), np.ones((block, block), int))
  image = np.stack([40 * ids, 255 - 40 * ids, 7 * ids], -1).astype(np.uint8)
  return ids.astype(np.uint8), image


def _paired(root, n=4, without_map=(), seed=0):
  rng = np.random.default_rng(seed)
  images, maps = root / "images", root / "maps"
  images.mkdir()
  maps.mkdir()
  for i in range(n):
    ids, image = _blocks(rng)
    Image.fromarray(image).save(images / f"im{i}.png")
    if i not in without_map:
      Image.fromarray(ids, "L").save(maps / f"im{i}.png")
  return images, maps


def _paired_config(config, images, maps, **data):
  config = folder_config(config, images)
  with config.unlocked():
    config.data.label_maps = "paired"
    config.data.label_folder = str(maps)
    config.data.semantic_classes = CLASSES
    config.data.resize_shorter = 64  # 40x48 -> 64x77: a non-integer factor, then a crop
    for k, v in data.items():
      setattr(config.data, k, v)
  return config


def _ids_of(images):
  """The map each augmented image implies (R = 40 * id), from the batch's [-1, 1] floats."""
  return np.round((np.asarray(images)[..., 0] + 1.0) * 127.5 / 40.0).astype(int)


def _interior(ids, r=4):
  """Pixels whose (2r+1)^2 neighbourhood in `ids` [B, H, W] holds one id (bicubic is exact)."""
  b, h, w = ids.shape
  out = np.zeros(ids.shape, bool)
  for y in range(r, h - r):
    for x in range(r, w - r):
      win = ids[:, y - r:y + r + 1, x - r:x + r + 1].reshape(b, -1)
      out[:, y, x] = (win == win[:, :1]).all(-1)
  return out


def test_paired_maps_follow_the_image_geometry(tmp_path, smoke_config):
  config = _paired_config(smoke_config, *_paired(tmp_path))
  sources.validate_data_config(config.data)
  ds, preprocess = train_dataset(config)
  it = iter(ds)
  batches = [next(it) for _ in range(6)]  # 12 random crops and flips of the 4 images
  maps = np.concatenate([b["label_map"] for b in batches])
  assert maps.shape == (12, 32, 32) and maps.dtype == np.int32
  assert set(np.unique(maps).tolist()) <= set(IDS)  # nearest keeps only ids present
  inside = _interior(maps)
  assert inside.sum() > 2000  # plenty of block interiors to compare
  np.testing.assert_array_equal(maps[inside], _ids_of(
      np.concatenate([b["image"] for b in batches]))[inside])
  assert preprocess.num_corrupt == 0
  evals = list(eval_batches(config))
  assert all(b["label_map"].shape == (4, 32, 32) for b in evals)
  assert sum(float(b["mask"].sum()) for b in evals) == 4.0


def test_preprocess_applies_one_window_to_image_and_map(tmp_path):
  ids, image = _blocks(np.random.default_rng(3))
  Image.fromarray(ids, "L").save(tmp_path / "m.png")
  record = {"image": image, "label": 0, "path": "x", "label_map": str(tmp_path / "m.png")}
  pre = Preprocess(32, 64, True, True, label_maps="paired", semantic_classes=CLASSES)
  for seed in range(6):
    out = pre(record, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)  # the draws Preprocess makes: top, left, flip
    top, left = int(replay.integers(0, 64 - 32 + 1)), int(replay.integers(0, 77 - 32 + 1))
    want = lm.resize_nearest(ids.astype(np.int32), (64, 77))[top:top + 32, left:left + 32]
    want = want[:, ::-1] if replay.random() < 0.5 else want
    np.testing.assert_array_equal(out["label_map"], want)


def test_an_image_without_a_map_is_skipped_and_counted(tmp_path, smoke_config, capfd):
  images, maps = _paired(tmp_path, n=4, without_map=(2,))
  config = _paired_config(smoke_config, images, maps)
  capfd.readouterr()
  ds, preprocess = train_dataset(config)
  it = iter(ds)
  for _ in range(6):
    assert next(it)["label_map"].shape == (2, 32, 32)
  assert preprocess.num_corrupt == 1 and preprocess.num_without_map == 1
  evals = list(eval_batches(config))  # a second pipeline: counted again, not warned again
  assert sum(float(b["mask"].sum()) for b in evals) == 3.0
  lines = [x for x in capfd.readouterr().err.splitlines() if "no label map" in x]
  assert len(lines) == 1 and "im2.png" in lines[0] and "1 of the 4" in lines[0]
  for i in (0, 1, 3):
    (maps / f"im{i}.png").unlink()
  with pytest.raises(sources.DataSetNotFoundError) as info:
    sources.build_source(config.data, "train")
  assert str(images) in str(info.value) and str(maps) in str(info.value)
  with config.unlocked():
    config.data.label_folder = str(tmp_path / "nowhere")
  with pytest.raises(sources.DataSetNotFoundError, match="nowhere' does not exist"):
    sources.check_data_exists(config.data, ["train"])


def _one_pair(root, image, label_map):
  root.mkdir()
  (root / "images").mkdir()
  (root / "maps").mkdir()
  Image.fromarray(image).save(root / "images" / "a.png")
  Image.fromarray(label_map).save(root / "maps" / "a.png")
  return root / "images", root / "maps"


@pytest.mark.parametrize("case, match", [
    ("size", r"is 20x24 \(HxW\) but its image is 40x48"),
    ("id", r"has id 9, but data.semantic_classes=6"),
    ("colour", r"colour with unequal channels"),
])
def test_bad_maps_are_one_line_errors_naming_the_file(tmp_path, smoke_config, case, match):
  ids, image = _blocks(np.random.default_rng(0))
  bad = {"size": ids[:20, :24], "id": np.where(ids == 5, 9, ids).astype(np.uint8),
         "colour": np.stack([ids, ids, ids + 1], -1)}[case]
  images, maps = _one_pair(tmp_path / case, image, bad)
  config = _paired_config(smoke_config, images, maps)
  with pytest.raises(lm.LabelMapError, match=match) as info:
    list(eval_batches(config))
  message = str(info.value)
  assert str(maps / "a.png") in message and "\n" not in message


def test_map_formats_palette_grey_and_equal_channels(tmp_path):
  ids = np.array([[0, 1, 2], [300, 2, 0]])
  Image.fromarray(ids.astype(np.uint16)).save(tmp_path / "wide.png")  # 16-bit: not rescaled
  np.testing.assert_array_equal(lm.decode_label_map(str(tmp_path / "wide.png"), "w"), ids)
  small = np.minimum(ids, 2).astype(np.uint8)
  p = Image.fromarray(small, "L").convert("P")
  p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
  p.save(tmp_path / "p.png")
  np.testing.assert_array_equal(lm.decode_label_map(str(tmp_path / "p.png"), "p"), small)
  rgba = np.stack([small] * 3 + [np.full_like(small, 255)], -1)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(lm.decode_label_map(str(tmp_path / "rgba.png"), "r"), small)
  two = np.stack([small, small + 7, small * 0], -1)  # R = id, G = instance
  np.testing.assert_array_equal(lm.decode_label_map(two, "t", channel=0), small)
  with pytest.raises(lm.LabelMapError, match="data.label_map_channel=3"):
    lm.decode_label_map(small, "s", channel=3)
  (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 30)
  with pytest.raises(lm.LabelMapError, match="junk.png cannot be read"):
    lm.decode_label_map(str(tmp_path / "junk.png"), str(tmp_path / "junk.png"))


def test_downsample_nearest_takes_each_cells_centre_pixel():
  label_map = np.arange(24).reshape(1, 4, 6)
  # rows floor((i + 0.5) * 4 / 3) = 0, 2, 3; columns floor((j + 0.5) * 6 / 4) = 0, 2, 3, 5
  want = [[[0, 2, 3, 5], [12, 14, 15, 17], [18, 20, 21, 23]]]
  np.testing.assert_array_equal(lm.downsample_nearest(label_map, (3, 4)), want)
  np.testing.assert_array_equal(lm.downsample_nearest(np.arange(16).reshape(1, 4, 4), (2, 2)),
                                [[[5, 7], [13, 15]]])
  import jax.numpy as jnp

  np.testing.assert_array_equal(lm.downsample_nearest(jnp.asarray(label_map), (3, 4)), want)


def test_colour_cluster_ids_and_colorize():
  # Colour 0: floor(256 * frac(0.5 + phi3**-k)), phi3**-1..3 = 0.75488, 0.56984, 0.43016.
  assert lm.palette(1).tolist() == [[65, 17, 238]]
  colours = lm.palette(8).astype(int)
  assert len({tuple(c) for c in lm.palette(256).tolist()}) == 256  # distinct colours
  ids = np.array([[2, 0], [7, 2]])
  image = np.clip(colours[ids] + [[[3, -2, 1]]], 0, 255).astype(np.uint8)  # near each colour
  np.testing.assert_array_equal(lm.colour_cluster_ids(image, 8), ids)
  np.testing.assert_array_equal(lm.colour_cluster_ids(colours[None].astype(np.uint8), 8),
                                [np.arange(8)])
  shown = lm.colorize(np.stack([ids, ids]), 8)
  assert shown.shape == (2, 2, 2, 3) and shown.dtype == np.uint8
  np.testing.assert_array_equal(shown[0], colours[ids])
  with pytest.raises(ValueError, match="8 classes"):
    lm.colorize(ids + 6, 8)


def test_embedded_colour_clusters_match_the_image(smoke_config):
  with smoke_config.unlocked():
    smoke_config.data.label_maps = "colour_clusters"
    smoke_config.data.semantic_classes = 8
  sources.validate_data_config(smoke_config.data)
  batch = next(iter(train_dataset(smoke_config)[0]))
  assert batch["label_map"].shape == batch["image"].shape[:3]
  pixels = np.round((batch["image"] + 1.0) * 127.5).astype(np.uint8)
  for image, ids in zip(pixels, batch["label_map"], strict=True):
    np.testing.assert_array_equal(ids, lm.colour_cluster_ids(image, 8))
  evals = next(eval_batches(smoke_config))
  assert evals["label_map"].shape == evals["image"].shape[:3]
  assert evals["label_map"].dtype == np.int32


def test_no_label_map_key_without_maps(smoke_config):
  assert "label_map" not in next(iter(train_dataset(smoke_config)[0]))
  assert "label_map" not in next(eval_batches(smoke_config))


@pytest.mark.parametrize("fields, match", [
    ({"label_maps": "paired"}, "data.label_maps='paired' needs data.semantic_classes > 0"),
    ({"semantic_classes": 4}, "data.semantic_classes=4 needs data.label_maps"),
    ({"label_maps": "paired", "semantic_classes": 4},
     "data.label_maps='paired' needs data.source='folder'"),
    ({"label_maps": "paired", "semantic_classes": 4, "source": "folder", "folder": "x"},
     "data.label_maps='paired' needs data.label_folder"),
    ({"label_maps": "tfds", "semantic_classes": 4}, "data.label_maps='tfds' needs data.source"),
    ({"label_maps": "regions", "semantic_classes": 4}, "data.label_maps='regions'"),
])
def test_label_map_fields_are_validated(smoke_config, fields, match):
  with smoke_config.unlocked():
    for k, v in fields.items():
      setattr(smoke_config.data, k, v)
  with pytest.raises(ConfigError, match=match) as info:
    sources.validate_data_config(smoke_config.data)
  assert "\n" not in str(info.value)


def _tfds_config(config, **data):
  with config.unlocked():
    config.data.source = "tfds"
    config.data.name = "scene_parse150"
    config.data.val_split = "test"  # scene_parse150 has 'train' and 'test'
    config.data.label_maps = "tfds"
    config.data.semantic_classes = 151
    config.data.image_size = 16
    config.data.resize_shorter = 16
    config.train.batch_size = 2
    config.eval.batch_size = 2
    config.eval.max_examples = 0
    for k, v in data.items():
      setattr(config.data, k, v)
  return config


def test_tfds_scene_parse150_mock_records_carry_the_annotation(smoke_config):
  import tensorflow_datasets as tfds

  # The random mock data of scene_parse150: 'annotation' is [H, W, 3] (R = category,
  # G = instance) of another size than the image, so the pipeline stops with a clear error.
  with tfds.testing.mock_data(num_examples=3):
    source = sources.TfdsSource("scene_parse150", "train", None, "annotation")
    record = source[0]
    assert record["label_map"].ndim == 3 and record["label_map"].shape[-1] == 3
    config = _tfds_config(smoke_config)
    sources.validate_data_config(config.data)
    with pytest.raises(lm.LabelMapError, match=r"record \d feature 'annotation' is colour"):
      next(iter(train_dataset(config)[0]))
    with config.unlocked():
      config.data.label_map_channel = 0
    with pytest.raises(lm.LabelMapError, match=r"record \d feature 'annotation' is \d+x\d+"):
      next(iter(train_dataset(config)[0]))
    with pytest.raises(ConfigError, match="no feature 'segmentation' .*annotation, image"):
      sources.TfdsSource("scene_parse150", "train", None, "segmentation")


def test_tfds_maps_reach_the_batches(smoke_config):
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)

  def records(*args, **kwargs):  # consistent records in scene_parse150's layout
    out = []
    for _ in range(4):
      ids, image = _blocks(rng, 24, 32, 8)
      out.append({"image": image, "annotation": np.stack([ids, ids * 0 + 1, ids * 0], -1)})
    return out

  with tfds.testing.mock_data(as_data_source_fn=records):
    config = _tfds_config(smoke_config, label_map_channel=0)
    batch = next(iter(train_dataset(config)[0]))
    assert batch["label_map"].shape == (2, 16, 16) and batch["label_map"].dtype == np.int32
    assert set(np.unique(batch["label_map"]).tolist()) <= set(IDS)
    evals = list(eval_batches(config))
    assert sum(float(b["mask"].sum()) for b in evals) == 4.0
    assert all(b["label_map"].shape == (2, 16, 16) for b in evals)
