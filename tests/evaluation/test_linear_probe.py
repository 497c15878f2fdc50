"""Linear probe on frozen features, feature extraction, and ``skysense evaluate linear-probe``."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
from torch.utils.data import Dataset

from skysense.commands import evaluate as command
from skysense.evaluation.features import (
    extract_features,
    feature_dim,
    hr_size,
    per_class_subset,
    pool_features,
    resize_hr,
)
from skysense.evaluation.linear_probe import (
    _average_precision_own,
    holdout_split,
    linear_probe,
    mean_average_precision,
    standardize,
)

# -- linear probe on synthetic features ---------------------------------------------------------


def _blobs(classes: int, per_class: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return features * 7 + 3, labels  # an offset and scale the standardisation must undo


def test_separable_features_reach_full_accuracy():
    x_train, y_train = _blobs(10, 30, 24, 1.0, seed=0)
    x_test, y_test = _blobs(10, 30, 24, 1.0, seed=1)
    result = linear_probe(x_train, y_train, x_test, y_test, seed=0)
    assert result.metric == "accuracy"
    assert result.score >= 0.99 and result.train_score == 1.0
    assert (result.num_train, result.num_test, result.feature_dim, result.num_classes) == (300, 300, 24, 10)
    assert result.num_validation == 60 and set(result.validation) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0}


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(400, 32, generator=g), torch.randn(1000, 32, generator=g)
    y_train, y_test = torch.randint(0, 10, (400,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    result = linear_probe(x_train, y_train, x_test, y_test, seed=0)
    assert 0.05 <= result.score <= 0.16  # chance 0.1; 1000 test samples: std 0.0095


def test_probe_is_deterministic_and_seeded():
    x_train, y_train = _blobs(5, 12, 8, 6.0, seed=0)
    x_test, y_test = _blobs(5, 12, 8, 6.0, seed=1)
    a = linear_probe(x_train, y_train, x_test, y_test, seed=3)
    b = linear_probe(x_train, y_train, x_test, y_test, seed=3)
    assert a.to_dict() == b.to_dict()


def test_holdout_split_is_stratified_and_deterministic():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, val = holdout_split(labels, 0.2, seed=0, multilabel=False)
    assert torch.equal(torch.sort(torch.cat([fit, val])).values, torch.arange(16))
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    fit2, val2 = holdout_split(labels, 0.2, seed=0, multilabel=False)
    assert torch.equal(fit, fit2) and torch.equal(val, val2)


def test_standardize_uses_train_statistics():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    test = torch.tensor([[2.0, 6.0]])
    s_train, s_test = standardize(train, test)
    assert torch.allclose(s_train, torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(s_test, torch.tensor([[0.0, 1.0]], dtype=torch.float64))  # constant column: centred only


def test_probe_rejects_bad_inputs():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(x, torch.zeros(5, dtype=torch.long), x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(x, torch.zeros(6, dtype=torch.long), x * float("nan"), torch.zeros(6, dtype=torch.long))


# -- multi-label ---------------------------------------------------------------------------------


def test_average_precision_by_hand_with_ties():
    # Thresholds 0.9 (1 tp of 1: P 1, R 1/2) and 0.8 (tied pair, 2 tp of 3: P 2/3, R 1).
    scores = torch.tensor([0.9, 0.8, 0.8, 0.1])
    positive = torch.tensor([True, False, True, False])
    assert _average_precision_own(scores, positive) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert _average_precision_own(torch.tensor([0.1, 0.9]), torch.tensor([True, False])) == pytest.approx(0.5)


def test_mean_average_precision_own_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 6, generator=g) < 0.3).long()
    scores = targets * 0.5 + torch.rand(200, 6, generator=g)
    scores[:50] = scores[:50].round(decimals=1)  # some ties
    targets[:, 5] = 0  # a class without positives is left out of the mean
    own = mean_average_precision(scores, targets, use_torchmetrics=False)
    expected = sum(_average_precision_own(scores[:, k], targets[:, k] > 0) for k in range(5)) / 5
    assert own == pytest.approx(expected)
    if importlib.util.find_spec("torchmetrics") is None:
        pytest.skip("torchmetrics not installed: own implementation checked by hand only")
    assert mean_average_precision(scores, targets, use_torchmetrics=True) == pytest.approx(own, abs=1e-6)


def test_multilabel_probe_separable_and_random():
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(16, 5, generator=g)
    x_train, x_test = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    y_train, y_test = (x_train @ directions > 0.3).float(), (x_test @ directions > 0.3).float()
    result = linear_probe(x_train, y_train, x_test, y_test)
    assert result.metric == "mAP" and result.score > 0.97 and result.num_classes == 5
    noise = (torch.rand(300, 5, generator=g) < 0.3).float()
    chance = linear_probe(x_train, (torch.rand(300, 5, generator=g) < 0.3).float(), x_test, noise)
    assert chance.score < 0.45  # chance = prevalence 0.3


# -- features --------------------------------------------------------------------------------------


class _RandomHR(Dataset):
    def __init__(self, n: int, size: int = 150) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 255
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"hr": self.images[i].clone(), "label": self.labels[i], "id": f"s{i}"}


def test_hr_size_rounds_up_to_multiple_of_32():
    assert hr_size(150, 150) == (160, 160) and hr_size(160, 97) == (160, 128)
    assert hr_size(150, 150, image_size=128) == (128, 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        hr_size(150, 150, image_size=150)
    assert resize_hr(torch.zeros(2, 3, 150, 150)).shape == (2, 3, 160, 160)


def test_pool_features_definition():
    out = {"hr_pyramid": [torch.ones(2, 8, 4, 4), torch.full((2, 16, 2, 2), 2.0)], "fused": torch.zeros(2, 4, 2, 2)}
    pooled = pool_features(out)
    # Every HR level pooled, in order, then the fused map.
    assert pooled.shape == (2, 28) and torch.all(pooled[:, :8] == 1) and torch.all(pooled[:, 8:24] == 2)
    assert torch.all(pooled[:, 24:] == 0)
    out["s2"] = torch.zeros(2, 1, 3, 2, 2)
    assert pool_features(out).shape == (2, 4)


def test_extract_features_shape_and_deterministic(tiny_model):
    dataset = _RandomHR(5)
    first, labels = extract_features(tiny_model, dataset, batch_size=2, progress=False)
    second, _ = extract_features(tiny_model, dataset, batch_size=2, progress=False)
    assert first.dtype == torch.float32 and first.shape == (5, feature_dim(tiny_model.config, ["hr"])) == (5, 608)
    assert torch.equal(labels, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and first.std(0).max() > 0
    assert not first.is_inference()  # usable by the (autograd) probe


# -- the command -------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def test_command_needs_random_init_or_weights(tmp_path):
    with pytest.raises(ValueError, match="--random-init"):
        _run(["evaluate", "linear-probe", "--dataset", "aid", "--data-root", str(tmp_path), "--preset", "tiny"])


def test_command_needs_a_data_root(monkeypatch):
    monkeypatch.delenv("SKYSENSE_DATA", raising=False)
    with pytest.raises(ValueError, match="--data-root"):
        _run(["evaluate", "linear-probe", "--dataset", "aid", "--preset", "tiny", "--random-init"])


@pytest.mark.slow
@pytest.mark.real_data
def test_command_end_to_end_on_aid(data_root, monkeypatch, capsys):
    if not (data_root / "aid").is_dir():
        pytest.skip(f"real data not available: no aid folder under {data_root}")
    monkeypatch.setenv("SKYSENSE_DATA", str(data_root))  # --data-root defaults to $SKYSENSE_DATA/aid
    code = _run(["evaluate", "linear-probe", "--dataset", "aid", "--preset", "tiny", "--random-init",
                 "--limit-per-class", "4", "--no-progress", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["train_count"] == report["test_count"] == 120
    assert report["num_classes"] == 30 and report["feature_dim"] == 608
    assert report["data_root"] == str(data_root / "aid")


@pytest.mark.real_data
def test_per_class_subset_takes_the_first_images(data_root):
    from skysense.data.datasets import AID

    if not (data_root / "aid").is_dir():
        pytest.skip(f"real data not available: no aid folder under {data_root}")
    train = AID(data_root / "aid", split="train")
    subset = per_class_subset(train, 2)
    ids = [train.items[i].id for i in subset.indices]
    assert len(ids) == 2 * len(train.classes)
    assert ids[:2] == [f"Airport/{train.items[0].path.stem}", f"Airport/{train.items[1].path.stem}"]


def test_load_model_from_weights_gives_the_same_features(tiny_model, tmp_path):
    tiny_model.save_pretrained(str(tmp_path))
    loaded = command.load_model(tmp_path, None, random_init=False, seed=0)
    dataset = _RandomHR(2)
    assert torch.equal(extract_features(loaded, dataset, progress=False)[0],
                       extract_features(tiny_model, dataset, progress=False)[0])
    with pytest.raises(ValueError, match="--random-init goes with --preset"):
        command.load_model(tmp_path, None, random_init=True, seed=0)


def test_random_init_is_seeded():
    a = command.load_model(None, "tiny", random_init=True, seed=0)
    b = command.load_model(None, "tiny", random_init=True, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
