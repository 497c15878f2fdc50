"""Fine-tuning on your own places: a manifest with labels (classification) or masks (segmentation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
import torch
import yaml
from rasterio.transform import from_origin

from skysense.cli import main
from skysense.data.datasets import ManifestDataset
from skysense.data.sample import collate

CLASSES = ["cropland", "forest", "water"]
ORIGIN = (690000.0, 5340000.0)


def _tif(path: Path, data: np.ndarray, res: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32632", transform=from_origin(*ORIGIN, res, res)) as dst:
        dst.write(data)
    return str(path)


def write_labelled_manifest(root: Path, modalities: tuple[str, ...] = ("hr", "s2", "s1"), side: int = 4,
                            masks: bool = False) -> list[dict]:
    """Six places (4 train, 2 val): HR of 32 * ``side`` px, 2-3 S2 and 1-2 S1 frames of ``side`` px;
    a class per place whose S2 bands are brighter with the class index; with ``masks`` a mask of
    class indices on the S2 grid (255 on the first row: unlabelled)."""
    rng = np.random.default_rng(0)
    records = []
    for p in range(6):
        label = p % 3
        record = {"id": f"place-{p}", "split": "train" if p < 4 else "val", "lat": 46.0 + p, "lon": 8.0,
                  "label": CLASSES[label] if p % 2 else label}
        if "hr" in modalities:
            hr = rng.integers(0, 256, (3, 32 * side, 32 * side), dtype=np.uint8)
            record["hr"] = _tif(root / "hr" / f"{p}.tif", hr, 10.0 / 32)
        if "s2" in modalities:
            record["s2"] = []
            for t in range(2 + p % 2):
                s2 = (rng.integers(300, 600, (10, side, side)) + 1000 * label).astype(np.uint16)
                record["s2"].append({"path": _tif(root / "s2" / f"{p}_{t}.tif", s2, 10.0),
                                     "date": f"2021-0{t + 4}-1{p}"})
        if "s1" in modalities:
            record["s1"] = [{"path": _tif(root / "s1" / f"{p}_{t}.tif",
                                          rng.uniform(-22, -4, (2, side, side)).astype(np.float32), 10.0),
                             "date": f"2021-0{t + 5}-0{p + 1}"} for t in range(1 + p % 2)]
        if masks:
            mask = np.full((1, side, side), label, np.uint8)
            mask[0, 0] = 255
            record["mask"] = _tif(root / "masks" / f"{p}.tif", mask, 10.0)
        records.append(record)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_labels_masks_and_georeference(tmp_path: Path) -> None:
    write_labelled_manifest(tmp_path, modalities=("s2",), side=8, masks=True)
    ds = ManifestDataset(tmp_path, modalities=("s2",), classes=CLASSES)
    samples = [ds[i] for i in range(len(ds))]
    assert [int(s["label"]) for s in samples] == [0, 1, 2, 0, 1, 2]  # indices and names alike
    mask = samples[1]["mask"]
    assert mask.shape == (8, 8) and mask.dtype == torch.int64
    assert (mask[0] == -1).all() and (mask[1:] == 1).all()
    assert samples[0]["crs"].to_epsg() == 32632 and samples[0]["transform"].c == ORIGIN[0]
    batch = collate(samples[:2])
    assert batch["label"].tolist() == [0, 1] and batch["mask"].shape == (2, 8, 8)
    assert "label" not in ManifestDataset(tmp_path, modalities=("s2",))[0]  # no classes: no targets read
    hot = ManifestDataset.__new__(ManifestDataset)
    hot.classes, hot.multilabel = tuple(CLASSES), True
    assert hot._label(["water", 0], "x").tolist() == [1.0, 0.0, 1.0]


def test_bad_labels_and_masks_name_the_record(tmp_path: Path) -> None:
    records = write_labelled_manifest(tmp_path, modalities=("s2",), side=8, masks=True)
    manifest = tmp_path / "manifest.jsonl"

    def rewrite(index: int, **changes: object) -> None:
        edited = [dict(r) for r in records]
        edited[index].update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del edited[index][key]
        manifest.write_text("".join(json.dumps(r) + "\n" for r in edited))

    rewrite(2, label="desert")
    with pytest.raises(ValueError, match=r"line 3: record 'place-2': label 'desert': expected one of "
                                         r"\['cropland', 'forest', 'water'\] or an index 0..2"):
        ManifestDataset(tmp_path, classes=CLASSES)
    rewrite(3, label=None)
    with pytest.raises(ValueError, match=r"record 'place-3': targets \['mask'\]; the first train record has "
                                         r"\['label', 'mask'\]"):
        ManifestDataset(tmp_path, classes=CLASSES)
    bad = np.full((1, 8, 8), 7, np.uint8)
    rewrite(0, mask=_tif(tmp_path / "masks" / "bad.tif", bad, 10.0))
    ds = ManifestDataset(tmp_path, modalities=("s2",), classes=CLASSES)
    with pytest.raises(ValueError, match=r"record 'place-0': mask .*bad.tif: values \[7\] outside 0..2"):
        ds.load(0)
    with pytest.raises(ValueError, match="multilabel: needs the class names"):
        ManifestDataset(tmp_path, multilabel=True)
    with pytest.raises(ValueError, match=r"classes: expected distinct class names, got \['a', 'a'\]"):
        ManifestDataset(tmp_path, classes=["a", "a"])


def _region(corners: list[tuple[float, float]], **properties: object) -> dict:
    ring = [list(c) for c in corners + corners[:1]]
    return {"type": "Feature", "properties": properties, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def test_masks_drawn_as_regions_in_a_gis(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One GeoJSON in longitude / latitude for every record, burnt onto each record's HR grid."""
    data = tmp_path / "data"
    records = write_labelled_manifest(data, modalities=("hr", "s2"), masks=True)
    hr_transform = from_origin(*ORIGIN, 10.0 / 32, 10.0 / 32)
    # a forest rectangle over HR pixels x 0..64, y 0..32, and a water one over x 96..128, y 96..128
    utm = [[hr_transform * c for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
           for x0, y0, x1, y1 in ((0, 0, 64, 32), (96, 96, 128, 128))]
    lonlat = [list(zip(*rasterio.warp.transform("EPSG:32632", "EPSG:4326", *zip(*ring)))) for ring in utm]
    regions = {"type": "FeatureCollection", "features": [_region(lonlat[0], **{"class": "forest"}),
                                                         _region(lonlat[1], **{"class": 2})]}
    (data / "regions.geojson").write_text(json.dumps(regions))
    for record in records:
        record["mask"] = "regions.geojson"
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sample = ManifestDataset(data, classes=CLASSES, mask_background="cropland")[0]
    expected = torch.zeros(128, 128, dtype=torch.int64)
    expected[0:32, 0:64], expected[96:, 96:] = 1, 2
    torch.testing.assert_close(sample["mask"], expected)
    unlabelled = ManifestDataset(data, classes=CLASSES)[0]["mask"]  # no background: outside the regions
    assert (unlabelled == -1).sum() == 128 * 128 - 32 * 64 - 32 * 32
    assert main(["datasets", "check", "manifest", "--data-root", str(data), "--json", "--option",
                 "classes=[cropland, forest, water]", "--option", "mask_background=0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pixels"]["train mask"] == {"cropland": 4 * (128 * 128 - 3072), "forest": 4 * 2048,
                                              "water": 4 * 1024}
    assert report["pixels"]["val mask"]["water"] == 2 * 1024 and not report["errors"]
    with pytest.raises(ValueError, match=r"mask_background 'desert': expected one of \['cropland'"):
        ManifestDataset(data, classes=CLASSES, mask_background="desert")
    # the model trains on the burnt masks
    config = _config(tmp_path, "segmentation", ["hr", "s2"], crop_size=128)
    options = yaml.safe_load(config.read_text())
    options["dataset_options"]["mask_background"] = "cropland"
    config.write_text(yaml.safe_dump(options))
    assert main(["finetune", "--config", str(config), "--out", str(tmp_path / "run"), "--evaluate", "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and 0.0 <= result["miou"] <= 1.0


def _config(tmp_path: Path, task: str, modalities: list[str], **extra: object) -> Path:
    config = {"task": task, "dataset": "manifest", "data_root": str(tmp_path / "data"), "preset": "tiny",
              "dataset_options": {"modalities": modalities, "classes": CLASSES}, "batch_size": 2, "max_steps": 2,
              "num_threads": 1, "decoder_channels": 8, **extra}
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_classification_on_hr_s2_s1_time_series(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_labelled_manifest(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(_config(tmp_path, "classification", ["hr", "s2", "s1"])),
                 "--out", str(out), "--geo-context", "--evaluate", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "manifest" and report["split"] == "val" and report["samples"] == 2
    assert 0.0 <= report["oa"] <= 1.0
    task = json.loads((out / "task.json").read_text())
    assert task["spec"]["class_names"] == CLASSES and task["spec"]["num_classes"] == 3
    assert task["spec"]["modalities"] == ["hr", "s2", "s1"] and task["spec"]["geo_context"]


def test_segmentation_on_s2_with_georeferenced_predictions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_labelled_manifest(tmp_path / "data", modalities=("s2",), side=16, masks=True)
    out, predictions = tmp_path / "run", tmp_path / "predictions"
    assert main(["finetune", "--config", str(_config(tmp_path, "segmentation", ["s2"], crop_size=16)),
                 "--out", str(out), "--evaluate", "--json", "--predictions", str(predictions), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and set(report["iou_per_class"]) == set(CLASSES)
    written = sorted(predictions.rglob("*.tif"))
    assert len(written) == 2
    with rasterio.open(written[0]) as src:
        assert src.crs.to_epsg() == 32632 and src.transform.c == ORIGIN[0] and src.shape == (16, 16)


def test_a_manifest_without_classes_or_targets_is_refused(tmp_path: Path) -> None:
    write_labelled_manifest(tmp_path / "data", modalities=("s2",), side=8)
    config = _config(tmp_path, "segmentation", ["s2"], crop_size=8)
    data = yaml.safe_load(config.read_text())
    with pytest.raises(ValueError, match=r"manifest: segmentation needs a 'mask' in every training sample; the "
                                         r"first \(place-0\) has none"):
        from skysense.downstream.finetune import FinetuneConfig, finetune
        finetune(FinetuneConfig.from_dict(data), tmp_path / "a", progress=False)
    del data["dataset_options"]["classes"]
    with pytest.raises(ValueError, match=r"manifest: no class list; give the dataset option classes"):
        finetune(FinetuneConfig.from_dict(data), tmp_path / "b", progress=False)


def test_the_example_config_reads(tmp_path: Path) -> None:
    from skysense.downstream.finetune import FinetuneConfig

    config = FinetuneConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs/finetune/manifest-example.yaml")
    assert config.dataset == "manifest" and config.task == "classification"
    write_labelled_manifest(tmp_path)
    options = {**config.dataset_options, "classes": CLASSES}
    assert int(ManifestDataset(tmp_path, **options)[1]["label"]) == 1


def test_multilabel_classification_is_scored_by_map(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = write_labelled_manifest(tmp_path / "data", modalities=("s2",))
    for r in records:  # every place: its own class and water
        r["label"] = sorted({CLASSES[int(r["id"][-1]) % 3], "water"})
    (tmp_path / "data" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _config(tmp_path, "classification", ["s2"])
    data = yaml.safe_load(config.read_text())
    data["dataset_options"]["multilabel"] = True
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(config), "--out", str(out), "--evaluate", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["map"] <= 1.0 and "oa" not in report
    assert json.loads((out / "task.json").read_text())["spec"]["multilabel"] is True


def write_change_manifest(root: Path, side: int = 4) -> list[dict]:
    """Six places (4 train, 2 val), each an HR pair of 32 * ``side`` px, two S2 frames of
    ``side`` px and a change map on the HR grid: the after image is brighter where it changed."""
    rng = np.random.default_rng(1)
    records = []
    for p in range(6):
        before = rng.integers(0, 200, (3, 32 * side, 32 * side), dtype=np.uint8)
        change = np.zeros((1, 32 * side, 32 * side), np.uint8)
        change[0, : 16 * side] = 1
        change[0, -1] = 255
        after = before.copy()
        after[:, change[0] == 1] += 50
        records.append({
            "id": f"pair-{p}", "split": "train" if p < 4 else "val",
            "hr": _tif(root / "hr" / f"{p}_a.tif", before, 10.0 / 32),
            "hr_post": _tif(root / "hr" / f"{p}_b.tif", after, 10.0 / 32),
            "s2": [{"path": _tif(root / "s2" / f"{p}_{t}.tif",
                                 rng.integers(300, 3000, (10, side, side)).astype(np.uint16), 10.0),
                    "date": f"202{t}-06-01"} for t in range(2)],
            "change": _tif(root / "change" / f"{p}.tif", change, 10.0 / 32),
        })
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_change_detection_on_hr_pairs_and_two_s2_dates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = write_change_manifest(tmp_path / "data")
    sample = ManifestDataset(tmp_path / "data")[0]
    assert sample["hr_post"].shape == sample["hr"].shape == (3, 128, 128) and sample["s2"].shape[0] == 2
    assert sample["change"].dtype == torch.int64 and set(sample["change"].unique().tolist()) == {-1, 0, 1}
    config = {"task": "change", "dataset": "manifest", "data_root": str(tmp_path / "data"), "preset": "tiny",
              "dataset_options": {"modalities": ["hr", "s2"]}, "batch_size": 2, "max_steps": 2, "crop_size": 128,
              "num_threads": 1, "decoder_channels": 8}
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["finetune", "--config", str(path), "--out", str(tmp_path / "run"), "--evaluate", "--json",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and report["samples"] == 2 and 0.0 <= report["f1"] <= 1.0
    # errors name the record
    records[3]["change"] = _tif(tmp_path / "data" / "change" / "bad.tif", np.full((1, 128, 128), 2, np.uint8), 10.0 / 32)
    del records[4]["hr_post"]
    manifest = tmp_path / "data" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"line 5: record 'pair-4': every record or none must have an hr_post"):
        ManifestDataset(tmp_path / "data")
    records[4]["hr_post"] = records[4]["hr"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"record 'pair-3': change .*bad.tif: values \[2\] outside 0..1 \(0 no_change, "
                                         r"1 change; unlabelled: 255\)"):
        ManifestDataset(tmp_path / "data").load(3)
    # the changed areas drawn in a GIS: changed inside, unchanged everywhere else
    transform = from_origin(*ORIGIN, 10.0 / 32, 10.0 / 32)
    outline = [transform * c for c in ((8, 8), (40, 8), (40, 24), (8, 24))]
    changes = {"type": "FeatureCollection", "features": [_region(outline)],
               "crs": {"type": "name", "properties": {"name": "EPSG:32632"}}}
    (tmp_path / "data" / "changes.geojson").write_text(json.dumps(changes))
    records[3]["change"] = "changes.geojson"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    change = ManifestDataset(tmp_path / "data").load(3)["change"]
    assert change.shape == (128, 128) and change.sum() == 32 * 16 and change[8:24, 8:40].all()


def test_dataset_options_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_labelled_manifest(tmp_path / "data", modalities=("s2",))
    assert main(["datasets", "check", "manifest", "--data-root", str(tmp_path / "data"), "--json",
                 "--option", "classes=[cropland, forest, water]", "--option", "modalities=[s2]"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels"] == {"train": {"cropland": 2, "forest": 1, "water": 1}, "val": {"forest": 1, "water": 1}}
    assert not report["errors"]
    assert main(["finetune", "--task", "classification", "--dataset", "manifest", "--data-root",
                 str(tmp_path / "data"), "--option", "classes=[cropland, forest, water]", "--preset", "tiny",
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--threads", "1",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "task.json").read_text())["dataset_options"]["classes"] == CLASSES
    assert main(["datasets", "check", "manifest", "--data-root", str(tmp_path / "data"), "--option", "classes"]) == 2
    assert "--option 'classes': expected KEY=VALUE" in capsys.readouterr().err


OBJECT_CLASSES = ["hut", "pond"]


def write_object_manifest(root: Path, side: int = 128) -> list[dict]:
    """Four places (3 train, 1 val): HR of ``side`` px on 0.5 m pixels with bright huts and dark ponds,
    outlined in a GeoJSON per place: UTM with a crs member, or longitude / latitude (the last place)."""
    rng = np.random.default_rng(1)
    transform = from_origin(*ORIGIN, 0.5, 0.5)
    records = []
    for p in range(4):
        hr = rng.integers(90, 130, (3, side, side), dtype=np.uint8)
        features = []
        for k in range(3):
            x, y = int(rng.integers(4, side - 36)), int(rng.integers(4, side - 36))
            w, h = int(rng.integers(16, 32)), int(rng.integers(16, 32))
            label = k % 2
            hr[:, y:y + h, x:x + w] = 240 if label == 0 else 10
            corners = [transform * c for c in ((x, y), (x + w, y), (x + w, y + h), (x, y + h))]
            if p == 3:
                xs, ys = rasterio.warp.transform("EPSG:32632", "EPSG:4326", *zip(*corners))
                corners = list(zip(xs, ys))
            features.append({"type": "Feature", "properties": {"class": OBJECT_CLASSES[label]},
                             "geometry": {"type": "Polygon", "coordinates": [[list(c) for c in corners + corners[:1]]]}})
        collection = {"type": "FeatureCollection", "features": features}
        if p < 3:
            collection["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32632"}}
        path = root / "objects" / f"{p}.geojson"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(collection))
        hr_path = root / "hr" / f"{p}.tif"
        hr_path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(hr_path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8",
                           crs="EPSG:32632", transform=transform) as dst:
            dst.write(hr)
        records.append({"id": f"place-{p}", "split": "train" if p < 3 else "val", "hr": f"hr/{p}.tif",
                        "objects": f"objects/{p}.geojson"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_objects_drawn_in_a_gis_are_boxes_of_the_hr_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    records = write_object_manifest(data)
    assert main(["datasets", "check", "manifest", "--data-root", str(data), "--json", "--option",
                 "classes=[hut, pond]"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels"] == {"train": {"hut": 6, "pond": 3}, "val": {"hut": 2, "pond": 1}} and not report["errors"]
    dataset = ManifestDataset(data, classes=OBJECT_CLASSES)
    for sample in (dataset[0], dataset[3]):  # outlined in UTM, and in longitude / latitude
        assert sample["boxes"].shape == (3, 8) and sample["labels"].tolist() == [0, 1, 0]
        assert (sample["boxes"] - sample["boxes"].round()).abs().max() < 1e-3  # on whole pixels
        assert not sample["difficult"].any()
    records[0].pop("hr")
    records[0]["s2"] = [{"path": "x.tif", "date": "2021-01-01"}]
    (data / "bad").mkdir()
    (data / "bad" / "manifest.jsonl").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match="record 'place-0': objects lie on the HR image, and the record has no hr"):
        ManifestDataset(data / "bad", classes=OBJECT_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detection", "oriented_detection"])
def test_detectors_train_on_objects_drawn_in_a_gis_and_find_them_in_a_scene(tmp_path: Path, task: str,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from skysense.data.geojson_objects import read_objects

    data = tmp_path / "data"
    write_object_manifest(data)
    classes = "classes=[hut, pond]"
    run = tmp_path / "run"
    assert main(["finetune", "--task", task, "--dataset", "manifest", "--data-root", str(data), "--option", classes,
                 "--preset", "tiny", "--out", str(run), "--max-steps", "2", "--batch-size", "2", "--crop-size", "128",
                 "--decoder-channels", "32", "--threads", "1", "--evaluate", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["objects"] == 3 and 0.0 <= result["map50"] <= 1.0
    out = tmp_path / "found.geojson"
    assert main(["predict", "--weights", str(run), "--hr", str(data / "hr/3.tif"), "--out", str(out),
                 "--no-progress"]) == 0
    collection = json.loads(out.read_text())
    assert collection["skysense"]["classes"] == OBJECT_CLASSES and collection["crs"]["properties"]["name"].endswith("32632")
    # what predict writes reads back as objects of the image (the property class names them)
    with rasterio.open(data / "hr/3.tif") as src:
        back = read_objects(out, OBJECT_CLASSES, src.crs, src.transform, src.shape)
    assert len(back["labels"]) == len(collection["features"])
    hulls = torch.tensor([f["properties"]["pixel_box"] for f in collection["features"]]).reshape(-1, 4)
    if len(hulls):
        from skysense.downstream.boxes import horizontal_boxes
        torch.testing.assert_close(horizontal_boxes(back["boxes"]), hulls, atol=0.02, rtol=0)


@pytest.mark.real_data
@pytest.mark.slow
def test_own_data_benchmark_on_the_real_sen1floods11_chip(data_root: Path, tmp_path: Path) -> None:
    """benchmarks/own_data.py for 2 steps: the manifest of real quadrants trains, scores and maps."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from own_data import CHIP, run

    result = run(data_root / CHIP, tmp_path, steps=2, lr=1e-3, batch_size=2, crop=32, window=64, overlap=0,
                 progress=False)
    assert 0.0 <= result["evaluate_val"]["miou"] <= 1.0 and 0.0 <= result["predict_val"]["miou"] <= 1.0
    assert result["predict_val"]["pixels_scored"] > 0.9 * 256 * 256
    assert 0.1 < result["water_fraction_val"] < 0.3
    records = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "train", "val"]
    with rasterio.open(records[3]["mask"]) as src:  # the quadrants keep their place on the ground
        assert src.crs.to_epsg() == 4326 and src.shape == (256, 256)
    # the same labels drawn as regions: one GeoJSON in longitude / latitude burns into the same masks
    regions = run(data_root / CHIP, tmp_path / "regions", steps=2, lr=1e-3, batch_size=2, crop=32, window=64,
                  overlap=0, progress=False, labels="regions")
    assert regions["regions_burnt"] == {"pixels_equal": 512 * 512, "pixels": 512 * 512}
    assert regions["evaluate_val"]["miou"] == pytest.approx(result["evaluate_val"]["miou"], abs=1e-6)
    polygons = regions["predict_polygons"]
    assert polygons["pixels_equal_class_map"] == polygons["pixels"] == 512 * 512
    assert polygons["val_miou_burnt_back"] == pytest.approx(regions["predict_val"]["miou"], abs=1e-9)
    # no file cut: each record names the chip's rasters and its quadrant's window
    windows = run(data_root / CHIP, tmp_path / "windows", steps=2, lr=1e-3, batch_size=2, crop=32, window=64,
                  overlap=0, progress=False, layout="windows")
    assert not (tmp_path / "windows" / "data" / "s2").exists()
    assert windows["evaluate_val"] == result["evaluate_val"] and windows["train_loss_last10"] == result["train_loss_last10"]


@pytest.mark.real_data
@pytest.mark.slow
def test_own_objects_benchmark_on_the_real_naip_quad(data_root: Path, tmp_path: Path) -> None:
    """benchmarks/own_objects.py for 2 steps: objects painted on the NAIP quad and outlined in longitude /
    latitude train a detector, are scored, and are searched for over the whole quad."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import own_objects

    result = own_objects.run(data_root / own_objects.QUAD, tmp_path, steps=2, lr=5e-4, batch_size=2, crop=256,
                             progress=False)
    assert result["objects_painted"] == own_objects.OBJECTS and 0 < result["objects_val"] < own_objects.OBJECTS
    assert 0.0 <= result["evaluate_val"]["map50"] <= 1.0 and 0.0 <= result["predict_val"]["map50"] <= 1.0
    assert result["predict"]["windows"] == 20 and result["predict"]["coordinates"] == "EPSG:26914"
    assert result["predict"]["before_merge"] >= result["predict"]["detections"]
