"""``skysense predict`` with a detector: objects of a whole scene, window by window, as GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from embed_helpers import ORIGIN, UTM, write_raster
from skysense import SkySense
from skysense.downstream.boxes import cut_by_window, horizontal_boxes
from skysense.downstream.detection import EDGE_MARGIN
from skysense.downstream.finetune import save_finetuned
from skysense.downstream.rotated_boxes import rbox_to_corners
from skysense.downstream.tasks import TaskSpec, build_task_model
from skysense.inference import Scene
from skysense.inference.detect import (DetectOptions, _RowDetector, detect_scene, merge_scene_detections, parts_path)
from skysense.inference.scene import normalized_batch
from skysense.inference.writers import progress_path

CLASSES = ("plane", "ship", "tank")
TASKS = ("detection", "oriented_detection")
SLOW_ORIENTED = ("detection", pytest.param("oriented_detection", marks=pytest.mark.slow))
"""The oriented head's rotated NMS over 2,000 candidates a window takes seconds at random init."""
HR_TRANSFORM = from_origin(*ORIGIN, 0.3125, 0.3125)


def detector(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = TaskSpec(task=task, num_classes=3, modalities=("hr",), class_names=CLASSES, decoder_channels=32)
    return build_task_model(SkySense.from_preset("tiny"), spec).eval()


def hr_scene(model: torch.nn.Module, folder: Path, height: int = 128, width: int = 160,
             nodata_box: tuple[int, int, int, int] | None = None) -> Scene:
    data = np.random.default_rng(0).integers(1, 256, (3, height, width), dtype=np.uint8)
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        data[:, r0:r1, c0:c1] = 0
    path = write_raster(folder / "hr.tif", data, HR_TRANSFORM, nodata=0 if nodata_box else None)
    return Scene(model.encoder.config, hr=path)


def _features(path: Path) -> tuple[dict, torch.Tensor, torch.Tensor, list[int]]:
    collection = json.loads(path.read_text())
    features = collection["features"]
    boxes = torch.tensor([f["properties"]["pixel_box"] for f in features]).reshape(-1, 4)
    scores = torch.tensor([f["properties"]["score"] for f in features])
    return collection, boxes, scores, [f["properties"]["label"] for f in features]


@pytest.mark.parametrize("task", SLOW_ORIENTED)
def test_a_scene_gives_what_the_detector_finds_over_the_same_windows(tmp_path: Path, task: str) -> None:
    """Windows of 64 px every 32 px over a 128 x 160 px image: the detections of
    ``DetectionModel.detect`` on the whole image (same windows, fragments, NMS), which caps them
    (horizontal: 100 per image) where a scene keeps all."""
    model = detector(task)
    with hr_scene(model, tmp_path) as scene:
        report = detect_scene(model, scene, tmp_path / "objects.geojson",
                              DetectOptions(window=2, overlap=1, progress=False))
        batch = normalized_batch([scene.read(Window(0, 0, 5, 4), ["hr"])], model.encoder.config, ["hr"])
    with torch.no_grad():
        expected = model.detect(batch, window=64, stride=32)[0]
    collection, boxes, scores, labels = _features(report.out)
    n = len(expected["scores"])
    assert report.windows == report.windows_computed == 12 and report.extra["before_merge"] > report.detections >= n
    assert report.coordinates == "EPSG:32631" and collection["crs"]["properties"]["name"].endswith("EPSG::32631")
    torch.testing.assert_close(boxes[:n], horizontal_boxes(expected[model.outline_key]).float(), atol=0.006, rtol=0)
    torch.testing.assert_close(scores[:n], expected["scores"].float(), atol=6e-6, rtol=0)
    assert labels[:n] == expected["labels"].tolist()
    assert sum(report.per_class.values()) == report.detections == len(collection["features"])
    feature = collection["features"][0]
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]))
    assert area > 0  # counter-clockwise
    x0, y0, x1, y1 = feature["properties"]["pixel_box"]
    np.testing.assert_allclose(ring.min(0), [ORIGIN[0] + 0.3125 * x0, ORIGIN[1] - 0.3125 * y1], atol=0.01)
    if task == "oriented_detection":
        assert len(feature["properties"]["pixel_rbox"]) == 5


@pytest.mark.parametrize("task", TASKS)
def test_the_merge_by_groups_equals_fragments_and_nms_over_the_whole_scene(task: str) -> None:
    """40 random boxes per window of a 3 x 3 lattice (windows of 100 px every 60 px): the merge run on the
    groups of overlapping detections keeps exactly what fragments + NMS over all of them keep."""
    model = detector(task)
    rng = torch.Generator().manual_seed(3)
    starts = (0, 60, 120)
    pieces, windows = [], {}
    for r, y in enumerate(starts):
        for c, x in enumerate(starts):
            windows[3 * r + c] = (x, y, x + 100, y + 100)
            size = 6 + 40 * torch.rand(40, 2, generator=rng)
            low = (100 - size) * torch.rand(40, 2, generator=rng)
            boxes = torch.cat([low, low + size], 1)
            if task == "oriented_detection":
                angle = torch.rand(40, 1, generator=rng) * 0.3
                rbox = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, size * 0.8, angle], 1)
                found = {"boxes": rbox, "corners": rbox_to_corners(rbox).float()}
            else:
                found = {"boxes": boxes}
            found.update(scores=torch.rand(40, generator=rng), labels=torch.randint(0, 2, (40,), generator=rng))
            cut = cut_by_window(horizontal_boxes(found[model.outline_key]), (x, y, 100, 100), (220, 220), EDGE_MARGIN)
            pieces.append({**model.moved(found, x, y), "cut": cut, "window": torch.full((40,), 3 * r + c)})
    found = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    merged = merge_scene_detections(model, found, windows)
    whole = ~model.fragments({k: v for k, v in found.items() if k not in ("cut", "window")}, found["cut"])
    assert 0 < int((~whole).sum())  # some fragments to drop
    expected = model.merged({k: v[whole] for k, v in found.items() if k not in ("cut", "window")}, cap=False)
    assert 30 < len(expected["scores"]) < int(whole.sum())  # NMS removes some
    order = torch.argsort(expected["scores"], descending=True)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key][order])
    plain = merge_scene_detections(model, found, windows, drop_fragments=False)
    assert len(plain["scores"]) == len(model.merged({k: v for k, v in found.items() if k not in ("cut", "window")},
                                                   cap=False)["scores"])


def test_no_detections_on_nodata_and_lon_lat_on_request(tmp_path: Path) -> None:
    model = detector("detection")
    with hr_scene(model, tmp_path, nodata_box=(0, 64, 0, 96)) as scene:
        report = detect_scene(model, scene, tmp_path / "objects.geojson",
                              DetectOptions(window=2, overlap=1, progress=False, wgs84=True, min_score=0.3))
    collection, boxes, scores, _ = _features(report.out)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert len(boxes) > 0 and not ((centres[:, 0] < 96) & (centres[:, 1] < 64)).any()
    assert (scores >= 0.3).all() and report.coordinates == "EPSG:4326" and "crs" not in collection
    ring = np.array(collection["features"][0]["geometry"]["coordinates"][0])
    x0, _, _, y1 = collection["features"][0]["properties"]["pixel_box"]
    lon, lat = rasterio.warp.transform(UTM, "EPSG:4326", [ORIGIN[0] + 0.3125 * x0], [ORIGIN[1] - 0.3125 * y1])
    np.testing.assert_allclose(ring.min(0), [lon[0], lat[0]], atol=1e-6)
    assert 2.0 < lon[0] < 3.0 and 48.0 < lat[0] < 49.5  # near Paris


def test_a_killed_run_resumes_to_the_same_geojson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = detector("detection")
    options = DetectOptions(window=2, overlap=1, progress=False)
    with hr_scene(model, tmp_path) as scene:
        whole = detect_scene(model, scene, tmp_path / "whole.geojson", options)
        out = tmp_path / "killed.geojson"
        run = _RowDetector.run
        calls = []

        def dying(self, row, y):
            calls.append(row)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return run(self, row, y)

        monkeypatch.setattr(_RowDetector, "run", dying)
        with pytest.raises(KeyboardInterrupt):
            detect_scene(model, scene, out, options)
        monkeypatch.setattr(_RowDetector, "run", run)
        assert not out.exists() and progress_path(out).is_file() and (parts_path(out) / "row_00000.safetensors").is_file()
        with pytest.raises(ValueError, match="a partial run with other settings .*differs in: options"):
            detect_scene(model, scene, out, DetectOptions(window=2, overlap=0, progress=False))
        resumed = detect_scene(model, scene, out, options)
        assert resumed.rows_skipped == 1 and resumed.windows_computed == whole.windows_computed - 4
        assert out.read_text() == whole.out.read_text()
        assert not progress_path(out).exists() and not parts_path(out).exists()
        with pytest.raises(ValueError, match="exists .* --overwrite"):
            detect_scene(model, scene, out, options)


def test_predict_command_writes_geojson_with_the_runs_crop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    model = detector("detection")
    save_finetuned(model, tmp_path / "run", {"dataset": "dior", "crop_size": 64}, step=1)
    hr = hr_scene(model, tmp_path).hr_path
    out = tmp_path / "objects.geojson"
    args = ["predict", "--weights", str(tmp_path / "run"), "--hr", str(hr), "--no-progress", "--out", str(out)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    collection = json.loads(out.read_text())
    assert collection["skysense"]["window_pixels"] == 64 and collection["skysense"]["overlap_pixels"] == 0
    assert report["windows"] == 2 * 3 and report["detections"] == len(collection["features"]) > 0
    with hr_scene(model, tmp_path / "again") as scene:
        library = detect_scene(model, scene, tmp_path / "library.geojson", DetectOptions(window=2, overlap=0,
                                                                                        progress=False))
    _, boxes, scores, labels = _features(out)
    _, library_boxes, library_scores, library_labels = _features(library.out)
    torch.testing.assert_close(boxes, library_boxes, atol=0.011, rtol=0)  # the loaded weights' float noise
    torch.testing.assert_close(scores, library_scores, atol=2e-5, rtol=0)
    assert labels == library_labels
    assert main([*args, "--overwrite", "--format", "cog"]) == 2
    assert "a detector writes a GeoJSON of boxes; --format do not apply" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--hr-post", str(hr)]) == 2
    assert "--hr-post (the HR image after) is for change models; this is a detection model" in capsys.readouterr().err


def test_the_command_line_and_inference_import_without_torchvision() -> None:
    """torchvision is the detection extra: ``pip install -e .`` and ``skysense demo`` / ``embed`` must not need it."""
    import subprocess
    import sys

    code = ("import sys, skysense.cli, skysense.inference, skysense.commands.predict; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"


@pytest.mark.real_data
@pytest.mark.slow
def test_a_detector_finetuned_on_dota_finds_objects_in_a_real_naip_quad(data_root: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    run = tmp_path / "run"
    assert main(["finetune", "--task", "detection", "--dataset", "dota", "--data-root", str(data_root / "samples/dota"),
                 "--preset", "tiny", "--out", str(run), "--max-steps", "2", "--batch-size", "2", "--crop-size", "256",
                 "--train-split", "all", "--eval-split", "all", "--decoder-channels", "32", "--threads", "1",
                 "--no-progress"]) == 0
    naip = data_root / "samples/naip_series/m_4709963_se_14_1_20180716.tif"  # 724 x 934 px, R, G, B, NIR
    out = tmp_path / "naip_objects.geojson"
    assert main(["predict", "--weights", str(run), "--hr", str(naip), "--out", str(out), "--no-progress",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    collection = json.loads(out.read_text())
    with rasterio.open(naip) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    # windows of the 256 px training crop every 192 px: 4 rows x 5 columns over 736 x 960 px
    assert collection["skysense"]["window_pixels"] == 256 and report["windows"] == 20
    assert report["coordinates"] == f"EPSG:{crs.to_epsg()}" == "EPSG:26914"
    assert report["detections"] == len(collection["features"]) and report["extra"]["before_merge"] >= report["detections"]
    for feature in collection["features"]:
        ring = np.array(feature["geometry"]["coordinates"][0])
        centre = ring[:4].mean(0)
        assert left <= centre[0] <= right and bottom <= centre[1] <= top
        assert feature["properties"]["class"] in collection["skysense"]["classes"]


def test_a_detector_fusing_s2_reads_both_over_the_same_windows(tmp_path: Path) -> None:
    """HR (128 x 192 px) with an S2 series on the fusion grid (4 x 6 px): the scene gives what the
    detector finds over the same windows of the whole image, both modalities cut together."""
    from embed_helpers import write_s2_series

    from skysense.config import S2_BANDS
    from skysense.inference import resolve_frames

    torch.manual_seed(0)
    spec = TaskSpec(task="detection", num_classes=3, modalities=("hr", "s2"), class_names=CLASSES,
                    decoder_channels=32)
    model = build_task_model(SkySense.from_preset("tiny"), spec).eval()
    hr = write_raster(tmp_path / "hr.tif", np.random.default_rng(4).integers(1, 256, (3, 128, 192), dtype=np.uint8),
                      from_origin(*ORIGIN, 10 / 32, 10 / 32))
    frames = resolve_frames("s2", write_s2_series(tmp_path / "s2", 4, 6), S2_BANDS)
    with Scene(model.encoder.config, hr=hr, s2=frames, s2_offsets=[0.0] * len(frames)) as scene:
        report = detect_scene(model, scene, tmp_path / "objects.geojson",
                              DetectOptions(window=4, overlap=2, progress=False))
        batch = normalized_batch([scene.read(Window(0, 0, 6, 4), ["hr", "s2"])], model.encoder.config, ["hr", "s2"])
    with torch.no_grad():
        expected = model.detect(batch, window=128, stride=64)[0]
    _, boxes, scores, labels = _features(report.out)
    n = len(expected["scores"])
    assert report.windows == report.windows_computed == 2 and len(scores) >= n > 0
    torch.testing.assert_close(boxes[:n], expected["boxes"].float(), atol=0.006, rtol=0)
    torch.testing.assert_close(scores[:n], expected["scores"].float(), atol=6e-6, rtol=0)
    assert labels[:n] == expected["labels"].tolist()
