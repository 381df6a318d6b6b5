"""Segmentation scores from one confusion matrix: hand-computed cases, torchmetrics, accumulation, DDP."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from xception.inference.segmentation_metrics import ConfusionMatrix

IGNORE = 255


def _random_masks(num_classes: int, shape=(4, 32, 32), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions right ~60% of the time, ~10% ignored target pixels, every class in both."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(num_classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(num_classes, shape, generator=g))
    target[torch.rand(shape, generator=g) < 0.1] = IGNORE
    assert set(target.unique().tolist()) == set(range(num_classes)) | {IGNORE}
    assert set(pred.unique().tolist()) == set(range(num_classes))
    return pred, target


def test_hand_computed_three_classes():
    target = torch.tensor([0, 0, 1, 1, 2, 2, IGNORE, IGNORE])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0])  # the last two are ignored whatever they say
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: target, columns: prediction
    scores = cm.compute()
    # class 0: 1 right / (2 in target + 2 predicted - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1)
    expected_iou = [Fraction(1, 3), Fraction(2, 3), Fraction(1, 2)]
    assert scores.iou.tolist() == pytest.approx([float(f) for f in expected_iou], abs=1e-15)
    assert scores.miou == pytest.approx(float(sum(expected_iou) / 3), abs=1e-15)  # 1/2
    assert scores.pixel_accuracy == pytest.approx(float(Fraction(4, 6)), abs=1e-15)
    assert scores.mean_accuracy == pytest.approx(float((Fraction(1, 2) + 1 + Fraction(1, 2)) / 3), abs=1e-15)
    # each class holds 2 of the 6 counted target pixels
    assert scores.frequency_weighted_iou == pytest.approx(float(sum(f / 3 for f in expected_iou)), abs=1e-15)


def test_absent_class_is_nan_and_left_out_predicted_only_class_is_zero():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 predicted, never present; class 3 nowhere
    scores = _scores(pred, target, 4)
    assert scores.iou[:3].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert math.isnan(scores.iou[3])
    assert scores.miou == pytest.approx(0.5)  # (1/2 + 1 + 0) / 3: the absent class does not count as 0
    assert scores.mean_accuracy == pytest.approx(0.75)  # recall of classes 0 and 1 only
    d = scores.to_dict(["bg", "a", "b", "c"])
    assert d["iou"] == {"bg": 0.5, "a": 1.0, "b": 0.0, "c": None}
    json.dumps(d, allow_nan=False)  # NaN never reaches JSON
    with pytest.raises(ValueError, match="4 classes scored but 2 class names"):
        scores.to_dict(["bg", "a"])


def _scores(pred, target, num_classes):
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target)
    return cm.compute()


def test_agrees_with_torchmetrics_jaccard_and_accuracy():
    tm = pytest.importorskip("torchmetrics.classification")
    k = 5
    pred, target = _random_masks(k)
    scores = _scores(pred, target, k)
    per_class = tm.MulticlassJaccardIndex(k, ignore_index=IGNORE, average=None)(pred, target)
    macro = tm.MulticlassJaccardIndex(k, ignore_index=IGNORE, average="macro")(pred, target)
    torch.testing.assert_close(scores.iou.float(), per_class, rtol=1e-6, atol=1e-7)
    assert scores.miou == pytest.approx(macro.item(), rel=1e-6)
    micro_acc = tm.MulticlassAccuracy(k, ignore_index=IGNORE, average="micro")(pred, target)
    macro_acc = tm.MulticlassAccuracy(k, ignore_index=IGNORE, average="macro")(pred, target)
    assert scores.pixel_accuracy == pytest.approx(micro_acc.item(), rel=1e-6)
    assert scores.mean_accuracy == pytest.approx(macro_acc.item(), rel=1e-6)


def test_torchmetrics_reports_zero_where_a_class_is_absent_from_both():
    """The one convention that differs: per class, torchmetrics gives 0 (its zero_division) where we give NaN."""
    tm = pytest.importorskip("torchmetrics.classification")
    k = 5
    pred, target = _random_masks(k - 1)  # class 4 in neither
    scores = _scores(pred, target, k)
    per_class = tm.MulticlassJaccardIndex(k, ignore_index=IGNORE, average=None)(pred, target)
    assert math.isnan(scores.iou[4]) and per_class[4].item() == 0.0
    torch.testing.assert_close(scores.iou[:4].float(), per_class[:4], rtol=1e-6, atol=1e-7)


def test_accumulating_updates_equals_one_update_on_everything():
    k = 4
    batches = [_random_masks(k, shape, seed) for seed, shape in enumerate([(2, 9, 13), (1, 20, 7), (3, 5, 5)])]
    split = ConfusionMatrix(k)
    for pred, target in batches:
        split.update(pred, target)
    whole = ConfusionMatrix(k)
    whole.update(torch.cat([p.flatten() for p, _ in batches]), torch.cat([t.flatten() for _, t in batches]))
    assert torch.equal(split.matrix, whole.matrix)
    assert split.matrix.dtype == torch.int64
    # mIoU over the split's pixels is not the mean of per-image mIoUs
    per_image = sum(_scores(p, t, k).miou for p, t in batches) / len(batches)
    assert split.compute().miou != pytest.approx(per_image, abs=1e-9)

    first, second = ConfusionMatrix(k), ConfusionMatrix(k)
    first.update(*batches[0])
    for pred, target in batches[1:]:
        second.update(pred, target)
    assert torch.equal(first.merge(second).matrix, whole.matrix)
    with pytest.raises(ValueError, match="cannot merge a 3-class"):
        first.merge(ConfusionMatrix(3))


def test_uint8_masks_do_not_wrap():
    # 200 * 250 overflows uint8: the codes must be computed in int64
    target = torch.tensor([200, 10, IGNORE], dtype=torch.uint8)
    pred = torch.tensor([200, 11, 3], dtype=torch.uint8)
    cm = ConfusionMatrix(250)
    cm.update(pred, target)
    assert cm.matrix[200, 200] == 1 and cm.matrix[10, 11] == 1 and cm.matrix.sum() == 2


@pytest.mark.parametrize("pred,target,message", [
    ([0, 1], [0, 7], "target holds class index 7, outside \\[0, 3\\) and not the ignore index 255"),
    ([0, 1], [-1, 0], "target holds class index -1"),
    ([0, 3], [0, 1], "pred holds class index 3, outside \\[0, 3\\)"),
])
def test_values_outside_the_classes_are_refused(pred, target, message):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=message):
        cm.update(torch.tensor(pred), torch.tensor(target))
    assert cm.matrix.sum() == 0  # nothing half-counted


def test_bad_inputs_are_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax the logits first"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        ConfusionMatrix(0)
    empty = ConfusionMatrix(3).compute()
    assert math.isnan(empty.miou) and math.isnan(empty.pixel_accuracy) and math.isnan(empty.frequency_weighted_iou)


def test_all_reduce_is_a_no_op_outside_distributed():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = cm.matrix.clone()
    assert cm.all_reduce() is cm and torch.equal(cm.matrix, before)


def test_all_reduce_runs_through_a_process_group(tmp_path, monkeypatch):
    """A real (one-rank, gloo) all_reduce call, then two ranks' sum with the collective stubbed:
    spawning rank processes costs more than this file's time budget."""
    cm = ConfusionMatrix(3)
    cm.update(*_random_masks(3, (2, 6, 6), seed=0))
    before = cm.matrix.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert torch.equal(cm.all_reduce().matrix, before)
    finally:
        dist.destroy_process_group()
    other = ConfusionMatrix(3)
    other.update(*_random_masks(3, (2, 6, 6), seed=1))
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: calls.append(op) or t.add_(other.matrix))
    assert torch.equal(cm.all_reduce().matrix, before + other.matrix)
    assert calls == [dist.ReduceOp.SUM]
