"""Views of the same shapes are encoded in one pass and give the features of one pass per view."""

from __future__ import annotations

import copy

import pytest
import torch

from skysense import SkySense
from skysense.config import preset_config
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.heads import DINOHead, apply_per_view
from skysense.pretrain.model import PretrainingModel
from skysense.pretrain.view_batching import encode_views, group_views, stack_views
from tests.model_inputs import tiny_inputs

HEAD = {"head": {"hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 128}, "num_clusters": 2, "cluster_rounds": 1,
        "sinkhorn_iterations": 20}


def two_views(batch: int = 2) -> list[dict[str, torch.Tensor]]:
    """Two global views of different content; the first with an invalid S2 frame, the second without masks."""
    first = tiny_inputs(batch)
    second = {k: (v.flip(-1) + 0.5 if v.is_floating_point() and v.ndim > 2 else v) for k, v in tiny_inputs(batch).items()}
    first["s2_mask"] = torch.tensor([[True, False, True], [True, True, True]][:batch])
    first["overlap"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * batch)  # not a model input: ignored
    return [first, second]


class CountingEncoder:
    """Wraps ``forward_features`` and records each call's batch size."""

    def __init__(self, model: SkySense) -> None:
        self.model, self.batches = model, []

    def __call__(self, **inputs):
        self.batches.append(inputs["hr"].shape[0])
        return self.model.forward_features(**inputs)


def assert_same_features(batched: list[dict], separate: list[dict]) -> None:
    for one, other in zip(batched, separate, strict=True):
        assert one.keys() == other.keys()
        for key in one:
            pairs = zip(one[key], other[key], strict=True) if isinstance(one[key], list) else [(one[key], other[key])]
            for a, b in pairs:
                assert a.shape == b.shape, key
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_views_group_by_shape_and_masks_are_filled_for_the_views_without():
    views = two_views() + [tiny_inputs(2, frames=(2, 2)), tiny_inputs(1)]  # other frame counts; a smaller batch still stacks
    assert group_views(views) == [[0, 1, 3], [2]]
    stacked = stack_views([views[0], views[1]])
    assert stacked["hr"].shape[0] == 4 and "overlap" not in stacked and "s1_mask" not in stacked
    assert stacked["s2_mask"].tolist() == [[True, False, True], [True, True, True]] + [[True] * 3] * 2


def test_one_pass_gives_the_features_of_one_pass_per_view():
    torch.manual_seed(0)
    model = SkySense(preset_config("tiny")).eval()
    views = two_views() + [tiny_inputs(2, frames=(2, 2))]
    counter = CountingEncoder(model)
    with torch.no_grad():
        batched = encode_views(counter, views)
        separate = encode_views(model.forward_features, views, batched=False)
    assert counter.batches == [4, 2]  # the two global views together, the crop alone
    assert_same_features(batched, separate)
    assert "geo" in batched[0] and len(batched[0]["hr_pyramid"]) == 4


@pytest.mark.parametrize("local_views", [0, 2])
def test_pretraining_loss_and_gradients_do_not_depend_on_batching(local_views):
    config = PretrainConfig.from_dict({"preset": "tiny", "objective": HEAD})
    torch.manual_seed(0)
    batched = PretrainingModel(config).train()
    separate = copy.deepcopy(batched)
    separate.batch_views = False
    views = two_views() + [tiny_inputs(2, frames=(2, 2)) for _ in range(local_views)]
    results = []
    for module in (batched, separate):
        total, terms = module(tuple(views))
        total.backward()
        results.append((total, terms, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (total_a, terms_a, grads_a), (total_b, terms_b, grads_b) = results
    torch.testing.assert_close(total_a, total_b, rtol=1e-4, atol=1e-5)
    assert terms_a.keys() == terms_b.keys() and "geo" in terms_a
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_head_runs_once_on_views_of_one_shape_with_the_outputs_of_one_call_each():
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    maps = [torch.randn(2, 16, 4, 4), torch.randn(3, 16, 4, 4), torch.randn(2, 16, 2, 2)]
    for inputs, expected_calls in ((maps[:2], [5]), (maps, [2, 3, 2])):  # a crop of another size: one call each
        calls.clear()
        outputs = apply_per_view(head, inputs)
        assert calls == expected_calls
        for out, x in zip(outputs, inputs, strict=True):
            torch.testing.assert_close(out, head(x), rtol=1e-5, atol=1e-6)
