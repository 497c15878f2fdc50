"""``skysense predict``: a fine-tuned segmentation model over a whole scene, streamed into class maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from embed_helpers import ORIGIN, write_raster, write_s2_series
from skysense import SkySense
from skysense.config import S2_BANDS
from skysense.downstream.finetune import save_finetuned
from skysense.downstream.tasks import TaskSpec, build_task_model
from skysense.inference import EmbedOptions, Scene, resolve_frames
from skysense.inference.predict import CLASS_NODATA, classes_path, predict_scene, semantic_paths
from skysense.inference.scene import normalized_batch

CLASSES = ("built", "field", "water")


def segmentation_model(modalities: tuple[str, ...], geo_context: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = TaskSpec(task="segmentation", num_classes=3, modalities=modalities, class_names=CLASSES,
                    decoder_channels=8, geo_context=geo_context)
    return build_task_model(SkySense.from_preset("tiny"), spec).eval()


def s2_scene(model: torch.nn.Module, folder: Path, height: int = 16, width: int = 24, **kwargs: object) -> Scene:
    frames = resolve_frames("s2", write_s2_series(folder, height, width, **kwargs), S2_BANDS)
    return Scene(model.encoder.config, s2=frames, s2_offsets=[0.0] * len(frames))


def _read(path: Path) -> tuple[np.ndarray, dict, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.profile, src.tags()


def test_one_window_equals_the_model_on_the_whole_scene(tmp_path: Path) -> None:
    model = segmentation_model(("s2",))
    with s2_scene(model, tmp_path / "s2") as scene:
        report = predict_scene(model, scene, tmp_path / "map.tif",
                               EmbedOptions(window=32, overlap=0, block=32, progress=False, preview=False))
        window = scene.read(Window(0, 0, 32, 32), ["s2"])
        batch = normalized_batch([window], model.encoder.config, ["s2"])
    with torch.no_grad():
        expected = torch.softmax(model(batch)["mask"], 1)[0, :, :16, :24].numpy()
    probabilities, profile, tags = _read(report.out)
    assert probabilities.shape == (3, 16, 24) and report.extra["upscale"] == 1
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert profile["crs"] == rasterio.crs.CRS.from_string("EPSG:32631")
    assert profile["transform"] == from_origin(*ORIGIN, 10.0, 10.0)  # the S2 grid
    labels, class_profile, class_tags = _read(classes_path(report.out))
    assert class_profile["dtype"] == "uint8" and class_profile["nodata"] == CLASS_NODATA
    assert class_profile["transform"] == profile["transform"] and json.loads(class_tags["skysense_classes"]) == list(CLASSES)
    np.testing.assert_array_equal(labels[0], expected.argmax(0))
    counts = report.extra["finish"]["pixels_per_class"]
    assert sum(counts.values()) == 16 * 24 and counts == {c: int((expected.argmax(0) == i).sum())
                                                          for i, c in enumerate(CLASSES)}


def test_windows_blend_and_nodata_stays_nodata(tmp_path: Path) -> None:
    model = segmentation_model(("s2",))
    with s2_scene(model, tmp_path / "s2", height=40, width=44, nodata_box=(0, 8, 0, 12)) as scene:
        report = predict_scene(model, scene, tmp_path / "map.tif",
                               EmbedOptions(window=16, overlap=4, block=16, batch_size=2, progress=False))
    probabilities, _, _ = _read(report.out)
    labels, _, _ = _read(classes_path(report.out))
    assert report.windows_computed > 4 and report.preview is not None and report.preview.is_file()
    assert np.isnan(probabilities[:, :8, :12]).all() and (labels[0, :8, :12] == CLASS_NODATA).all()
    rest = np.ones((40, 44), bool)
    rest[:8, :12] = False
    np.testing.assert_allclose(probabilities[:, rest].sum(0), 1.0, atol=1e-5)
    assert (labels[0, rest] < 3).all()


def test_hr_models_map_on_the_hr_grid_with_geo_context(tmp_path: Path) -> None:
    model = segmentation_model(("hr",), geo_context=True)
    transform = from_origin(*ORIGIN, 0.3125, 0.3125)
    rng = np.random.default_rng(0)
    hr = write_raster(tmp_path / "hr.tif", rng.integers(0, 256, (3, 64, 96), dtype=np.uint8), transform)
    with Scene(model.encoder.config, hr=hr) as scene:
        report = predict_scene(model, scene, tmp_path / "hr_map.tif",
                               EmbedOptions(window=2, overlap=0, block=64, progress=False, preview=False))
    probabilities, profile, _ = _read(report.out)
    assert probabilities.shape == (3, 64, 96) and report.extra["upscale"] == 32
    assert profile["transform"] == transform and np.isfinite(probabilities).all()


def test_hr_maps_end_where_the_hr_image_does(tmp_path: Path) -> None:
    """An HR image of 70 x 100 pixels (not multiples of 32) gets a 70 x 100 map on its own grid, with
    windows still starting on fusion-grid pixels: the top-left one equals the model on that window."""
    model = segmentation_model(("hr",))
    transform = from_origin(*ORIGIN, 0.3125, 0.3125)
    rng = np.random.default_rng(1)
    hr = write_raster(tmp_path / "hr.tif", rng.integers(0, 256, (3, 70, 100), dtype=np.uint8), transform)
    with Scene(model.encoder.config, hr=hr) as scene:
        report = predict_scene(model, scene, tmp_path / "hr_map.tif",
                               EmbedOptions(window=2, overlap=0, block=64, progress=False, preview=False))
        batch = normalized_batch([scene.read(Window(0, 0, 2, 2), ["hr"])], model.encoder.config, ["hr"])
    with torch.no_grad():
        expected = torch.softmax(model(batch)["mask"], 1)[0].numpy()
    probabilities, profile, _ = _read(report.out)
    labels, class_profile, _ = _read(classes_path(report.out))
    assert probabilities.shape == (3, 70, 100) and labels.shape == (1, 70, 100)
    assert profile["transform"] == transform and class_profile["transform"] == transform
    assert np.isfinite(probabilities).all() and (labels < 3).all()
    np.testing.assert_allclose(probabilities[:, :32, :64], expected[:, :32, :64], atol=1e-5)


def classifier_model(modalities: tuple[str, ...], **spec: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_task_model(SkySense.from_preset("tiny"), TaskSpec(task="classification", num_classes=3,
                                                                   modalities=modalities, class_names=CLASSES,
                                                                   **spec)).eval()


def test_a_classifier_labels_each_tile_as_it_labels_that_window(tmp_path: Path) -> None:
    model = classifier_model(("s2",), sentinel_size=12)
    with s2_scene(model, tmp_path / "s2", height=16, width=24, nodata_box=(8, 16, 20, 24)) as scene:
        report = predict_scene(model, scene, tmp_path / "tiles.tif",
                               EmbedOptions(window=8, overlap=0, block=16, progress=False, preview=False))
        windows = [scene.read(Window(8 * c, 8 * r, 8, 8), ["s2"]) for r in range(2) for c in range(3)]
        batch = normalized_batch(windows, model.encoder.config, ["s2"])
    batch["s2"] = torch.nn.functional.interpolate(batch["s2"].flatten(0, 1), size=(12, 12), mode="bilinear",
                                                  antialias=True).unflatten(0, batch["s2"].shape[:2])
    with torch.no_grad():
        expected = torch.softmax(model(batch)["label"], 1).numpy().T.reshape(3, 2, 3)
    probabilities, profile, tags = _read(report.out)
    labels, _, _ = _read(classes_path(report.out))
    assert probabilities.shape == (3, 2, 3) and tags["skysense_tile"] == "8"
    assert profile["transform"] == from_origin(*ORIGIN, 80.0, 80.0)  # one pixel per 8 x 8 S2 pixels
    assert np.isnan(probabilities[:, 1, 2]).all() and labels[0, 1, 2] == CLASS_NODATA  # a nodata corner
    valid = np.ones((2, 3), bool)
    valid[1, 2] = False
    np.testing.assert_allclose(probabilities[:, valid], expected[:, valid], atol=1e-5)
    np.testing.assert_array_equal(labels[0][valid], expected.argmax(0)[valid])
    assert sum(report.extra["finish"]["pixels_per_class"].values()) == 5


def test_hr_and_multilabel_classifiers_tile_the_hr_image(tmp_path: Path) -> None:
    model = classifier_model(("hr",), multilabel=True, image_size=32)
    rng = np.random.default_rng(2)
    hr = write_raster(tmp_path / "hr.tif", rng.integers(0, 256, (3, 70, 100), dtype=np.uint8),
                      from_origin(*ORIGIN, 0.3125, 0.3125))
    with Scene(model.encoder.config, hr=hr) as scene:
        report = predict_scene(model, scene, tmp_path / "tiles.tif",
                               EmbedOptions(window=2, overlap=0, block=16, progress=False, preview=False))
        batch = normalized_batch([scene.read(Window(0, 0, 2, 2), ["hr"])], model.encoder.config, ["hr"])
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)["label"])[0].numpy()
    probabilities, profile, _ = _read(report.out)
    assert probabilities.shape == (3, 2, 2) and profile["transform"] == from_origin(*ORIGIN, 20.0, 20.0)
    np.testing.assert_allclose(probabilities[:, 0, 0], expected, atol=1e-5)  # sigmoids: they need not sum to 1
    assert np.isnan(probabilities[:, 1, :]).all() and np.isnan(probabilities[:, :, 1]).all()  # tiles past the edge
    assert not classes_path(report.out).exists() and report.extra["finish"]["classes_path"] is None
    assert report.extra["finish"]["pixels_per_class"] == {c: int(p >= 0.5) for c, p in zip(CLASSES, expected)}


def test_wrong_models_and_missing_inputs_are_refused(tmp_path: Path) -> None:
    detector = build_task_model(SkySense.from_preset("tiny"), TaskSpec(task="detection", num_classes=3,
                                                                        modalities=("hr",))).eval()
    with s2_scene(detector, tmp_path / "s2") as scene:
        with pytest.raises(ValueError, match="predict: expected a segmentation, change, classification model, "
                                             "got a detection model"):
            predict_scene(detector, scene, tmp_path / "a.tif")
        with pytest.raises(ValueError, match="a classifier labels side-by-side tiles .* overlap must be 0, got 16"):
            predict_scene(classifier_model(("s2",)), scene, tmp_path / "c.tif", EmbedOptions(window=8))
        with pytest.raises(ValueError, match=r"predict: the model reads \['hr', 's2'\]; the scene lacks \['hr'\]"):
            predict_scene(segmentation_model(("hr", "s2")), scene, tmp_path / "b.tif")


def test_predict_command_on_a_finetuned_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    model = segmentation_model(("s2",))
    save_finetuned(model, tmp_path / "run", {"dataset": "manifest"}, step=1)
    s2 = write_s2_series(tmp_path / "s2", 16, 24)
    out = tmp_path / "map.tif"
    args = ["predict", "--weights", str(tmp_path / "run"), "--s2", *map(str, s2), "--s2-offset", "0",
            "--window", "16", "--overlap", "4", "--block", "16", "--no-progress", "--json"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extra"]["classes"] == list(CLASSES)
    assert classes_path(out).is_file() and out.is_file()
    with s2_scene(model, tmp_path / "again") as scene:
        library = predict_scene(model, scene, tmp_path / "library.tif",
                                EmbedOptions(window=16, overlap=4, block=16, progress=False, preview=False))
    np.testing.assert_allclose(_read(out)[0], _read(library.out)[0], atol=1e-5)
    assert main([*args, "--out", str(out)]) == 2  # a finished output is not overwritten
    assert "exists" in capsys.readouterr().err


def test_predict_writes_the_class_maps_regions_as_polygons(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main
    from skysense.data.geojson_regions import read_regions

    save_finetuned(segmentation_model(("s2",)), tmp_path / "run", {"dataset": "manifest"}, step=1)
    s2 = write_s2_series(tmp_path / "s2", 16, 24)
    out = tmp_path / "map.tif"
    args = ["predict", "--weights", str(tmp_path / "run"), "--s2", *map(str, s2), "--s2-offset", "0",
            "--window", "16", "--overlap", "4", "--no-progress", "--out", str(out)]
    assert main([*args, "--min-pixels", "3"]) == 2
    assert "--min-pixels applies to --polygons" in capsys.readouterr().err
    assert main([*args, "--polygons", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    polygons = tmp_path / "map.classes.geojson"
    assert report["extra"]["polygons"]["out"] == str(polygons) and report["extra"]["polygons"]["polygons"] >= 1
    labels, profile, _ = _read(classes_path(out))
    back = read_regions(polygons, CLASSES, profile["crs"], profile["transform"], labels.shape[1:])
    np.testing.assert_array_equal(back.numpy(), labels[0].astype(np.int64))  # every pixel, exactly
    # a multi-label classifier has no class map to vectorise
    save_finetuned(classifier_model(("s2",), multilabel=True), tmp_path / "multi", {"dataset": "manifest"}, step=1)
    assert main(["predict", "--weights", str(tmp_path / "multi"), "--s2", *map(str, s2), "--s2-offset", "0",
                 "--no-progress", "--out", str(tmp_path / "tiles.tif"), "--polygons"]) == 2
    assert "a multi-label classifier writes none" in capsys.readouterr().err


def test_predict_command_tiles_with_the_classifiers_training_size(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    model = classifier_model(("s2",), sentinel_size=10)  # tiles of 12 S2 pixels: 10 rounded up to the patch
    save_finetuned(model, tmp_path / "run", {"dataset": "manifest"}, step=1)
    s2 = write_s2_series(tmp_path / "s2", 24, 36)
    out = tmp_path / "tiles.tif"
    assert main(["predict", "--weights", str(tmp_path / "run"), "--s2", *map(str, s2), "--s2-offset", "0",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 tiles of 12 x 12 fusion-grid pixels x 2 x 3" in printed and "classes:" in printed
    with s2_scene(model, tmp_path / "again", height=24, width=36) as scene:
        library = predict_scene(model, scene, tmp_path / "library.tif",
                                EmbedOptions(window=12, overlap=0, progress=False, preview=False))
    np.testing.assert_allclose(_read(out)[0], _read(library.out)[0], atol=1e-5)
    assert np.isfinite(_read(out)[0]).all()


def finetuned_run(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, dataset: str,
                  *options: str) -> Path:
    """A ``tiny`` model fine-tuned for 2 steps on a real dataset under ``data_root``: its run folder."""
    from skysense.cli import main

    monkeypatch.setenv("SKYSENSE_DATA", str(data_root))
    run = tmp_path / "run"
    assert main(["finetune", "--task", task, "--dataset", dataset, "--preset", "tiny", "--out", str(run),
                 "--max-steps", "2", *options, "--decoder-channels", "8", "--threads", "1", "--no-progress"]) == 0
    return run


@pytest.mark.real_data
@pytest.mark.slow
def test_a_model_finetuned_on_loveda_maps_a_real_naip_quad(data_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from skysense.cli import main

    run = finetuned_run(data_root, tmp_path, monkeypatch, "segmentation", "loveda", "--batch-size", "1",
                        "--crop-size", "64", "--train-split", "all")
    naip = data_root / "samples/naip_series/m_4709963_se_14_1_20180716.tif"  # R, G, B, NIR: the first three read
    out = tmp_path / "naip_classes.tif"
    assert main(["predict", "--weights", str(run), "--hr", str(naip), "--out", str(out), "--window", "8",
                 "--overlap", "2", "--block", "256", "--no-progress", "--no-preview", "--polygons",
                 "--min-pixels", "16"]) == 0
    with rasterio.open(naip) as src:
        crs, transform, (height, width) = src.crs, src.transform, src.shape
    labels, profile, tags = _read(classes_path(out))
    assert profile["crs"] == crs and profile["transform"] == transform
    assert labels.shape == (1, height, width) and (labels < 7).all()  # the quad's own grid, every pixel mapped
    assert len(json.loads(tags["skysense_classes"])) == 7
    # its regions of at least 16 pixels, in the quad's CRS, cover the quad
    regions = json.loads(out.with_name("naip_classes.classes.geojson").read_text())
    assert regions["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{crs.to_epsg()}"
    pixels = [f["properties"]["pixels"] for f in regions["features"]]
    assert min(pixels) >= 16 and sum(pixels) == height * width and regions["skysense"]["dropped"] == 0


@pytest.mark.real_data
@pytest.mark.slow
def test_a_classifier_finetuned_on_aid_labels_tiles_of_a_real_naip_quad(data_root: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from skysense.cli import main

    run = finetuned_run(data_root, tmp_path, monkeypatch, "classification", "aid", "--batch-size", "2",
                        "--image-size", "64", "--limit-train", "4")
    naip = data_root / "samples/naip_series/m_4709963_se_14_1_20180716.tif"
    out = tmp_path / "naip_tiles.tif"
    assert main(["predict", "--weights", str(run), "--hr", str(naip), "--out", str(out), "--no-progress",
                 "--no-preview"]) == 0
    with rasterio.open(naip) as src:
        crs, transform, (height, width) = src.crs, src.transform, src.shape
    labels, profile, _ = _read(classes_path(out))
    probabilities, _, tags = _read(out)
    # tiles of the classifier's 64 px (2 fusion-grid pixels): whole ones labelled, the partial last row nodata
    assert tags["skysense_tile"] == "2" and profile["crs"] == crs and profile["transform"] == transform @ transform.scale(64)
    assert labels.shape == (1, -(-height // 64), -(-width // 64))
    whole = (slice(0, height // 64), slice(0, width // 64))
    assert (labels[0][whole] < 30).all() and np.isfinite(probabilities[(slice(None), *whole)]).all()
    assert (labels[0, height // 64:] == CLASS_NODATA).all()  # 724 px = 11 tiles and 20 px
    np.testing.assert_allclose(probabilities[(slice(None), *whole)].sum(0), 1.0, atol=1e-5)


def change_model(modalities: tuple[str, ...]) -> torch.nn.Module:
    torch.manual_seed(1)
    spec = TaskSpec(task="change", num_classes=2, modalities=modalities, class_names=("no_change", "change"),
                    decoder_channels=8)
    return build_task_model(SkySense.from_preset("tiny"), spec).eval()


def test_change_maps_from_two_s2_dates_equal_the_model_on_the_whole_scene(tmp_path: Path) -> None:
    model = change_model(("s2",))
    with s2_scene(model, tmp_path / "s2") as scene:
        report = predict_scene(model, scene, tmp_path / "change.tif",
                               EmbedOptions(window=32, overlap=0, block=32, progress=False, preview=False))
        batch = normalized_batch([scene.read(Window(0, 0, 32, 32), ["s2"])], model.encoder.config, ["s2"])
    with torch.no_grad():
        expected = torch.softmax(model(batch)["change"], 1)[0, :, :16, :24].numpy()
    probabilities, _, tags = _read(report.out)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert tags["skysense_task"] == "change" and report.extra["classes"] == ["no_change", "change"]
    np.testing.assert_array_equal(_read(classes_path(report.out))[0][0], expected.argmax(0))
    one_date = resolve_frames("s2", write_s2_series(tmp_path / "one", 16, 24)[:1], S2_BANDS)
    with Scene(model.encoder.config, s2=one_date, s2_offsets=[0.0]) as scene:
        with pytest.raises(ValueError, match="the change model reads s2 at two dates .*; the scene has 1 s2 frames"):
            predict_scene(model, scene, tmp_path / "x.tif")


def test_semantic_change_maps_each_dates_classes(tmp_path: Path) -> None:
    torch.manual_seed(2)
    spec = TaskSpec(task="change", num_classes=2, modalities=("s2",), class_names=("no_change", "change"),
                    decoder_channels=8, semantic_classes=3)
    model = build_task_model(SkySense.from_preset("tiny"), spec).eval()
    with s2_scene(model, tmp_path / "s2") as scene:
        report = predict_scene(model, scene, tmp_path / "change.tif",
                               EmbedOptions(window=32, overlap=0, block=32, progress=False, preview=False))
        batch = normalized_batch([scene.read(Window(0, 0, 32, 32), ["s2"])], model.encoder.config, ["s2"])
    with torch.no_grad():
        found = model(batch)
    expected = {k: torch.softmax(found[k], 1)[0, :, :16, :24].numpy() for k in ("change", "mask", "mask_post")}
    probabilities, _, tags = _read(report.out)
    assert probabilities.shape == (2 + 3 + 3, 16, 24) and json.loads(tags["skysense_semantic_classes"]) == ["0", "1", "2"]
    np.testing.assert_allclose(probabilities, np.concatenate(list(expected.values())), atol=1e-5)
    np.testing.assert_array_equal(_read(classes_path(report.out))[0][0], expected["change"].argmax(0))
    before, after = semantic_paths(report.out)
    np.testing.assert_array_equal(_read(before)[0][0], expected["mask"].argmax(0))
    np.testing.assert_array_equal(_read(after)[0][0], expected["mask_post"].argmax(0))
    dates = report.extra["finish"]["semantic"]
    assert dates["after"]["classes_path"] == str(after) and sum(dates["before"]["pixels_per_class"].values()) == 16 * 24


def test_hr_change_reads_the_image_after(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    model = change_model(("hr",))
    save_finetuned(model, tmp_path / "run", {"dataset": "manifest"}, step=1)
    transform = from_origin(*ORIGIN, 0.3125, 0.3125)
    rng = np.random.default_rng(2)
    before = rng.integers(0, 200, (3, 64, 64), dtype=np.uint8)
    after = before.copy()
    after[:, :, 32:] = 255 - after[:, :, 32:]
    hr, hr_post = (write_raster(tmp_path / f"{n}.tif", a, transform) for n, a in (("a", before), ("b", after)))
    out = tmp_path / "change.tif"
    args = ["predict", "--weights", str(tmp_path / "run"), "--hr", str(hr), "--window", "2", "--overlap", "0",
            "--no-progress", "--no-preview"]
    assert main([*args, "--hr-post", str(hr_post), "--out", str(out)]) == 0
    with Scene(model.encoder.config, hr=hr, hr_post=hr_post) as scene:
        window = scene.read(Window(0, 0, 2, 2), ["hr"])
        batch = normalized_batch([window], model.encoder.config, ["hr"])
    np.testing.assert_array_equal(window.inputs["hr_post"], after.astype(np.float32))
    with torch.no_grad():
        expected = torch.softmax(model(batch)["change"], 1)[0].numpy()
    np.testing.assert_allclose(_read(out)[0], expected, atol=1e-5)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "missing.tif")]) == 2
    assert "give the image after (--hr-post)" in capsys.readouterr().err


@pytest.mark.real_data
@pytest.mark.slow
def test_an_oscd_change_model_maps_a_real_city_from_its_two_dates(data_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from skysense.cli import main

    run = finetuned_run(data_root, tmp_path, monkeypatch, "change", "oscd", "--batch-size", "2", "--crop-size", "32",
                        "--limit-train", "2")
    city = data_root / "oscd/images/paris"
    out = tmp_path / "paris_change.tif"
    assert main(["predict", "--weights", str(run), "--s2", str(city / "imgs_1"), str(city / "imgs_2"),
                 "--s2-offset", "0", "--s2-level", "L1C", "--out", str(out), "--window", "32", "--overlap", "8",
                 "--no-progress", "--no-preview"]) == 0
    (b02,) = sorted((city / "imgs_1").glob("*_B02.tif"))
    with rasterio.open(b02) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    labels, profile, tags = _read(classes_path(out))
    assert profile["crs"] == crs and profile["transform"] == transform and labels.shape[1:] == shape
    assert json.loads(tags["skysense_classes"]) == ["no_change", "change"] and (labels < 2).all()
