"""ovseg-eval metrics against confusion matrices and IoUs computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ovseg.benchmarks.eval.metrics import IGNORE, BoundaryCounts, ConfusionMatrix, boundary_mask, oracle_prediction

X = IGNORE


def test_confusion_matrix_by_hand():
    # 4 classes; class 3 is in neither map. One pixel of class 1 gets no class (255): a miss, nobody's hit.
    gt = np.array([[0, 0, 1, 1], [1, 2, X, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, X]], np.uint8)
    cm = ConfusionMatrix(4)
    cm.update(gt, pred)
    # (gt, pred) pairs over the 7 labelled pixels: (0,0) (0,1) (1,1) (1,1) (1,0) (2,0) (1,none); the pred 2 sits on ignore.
    expected = np.array([[1, 1, 0, 0, 0], [1, 2, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(cm.counts, expected)
    s = cm.scores()
    # IoU = TP / (GT + Pred - TP): class 0: 1 / (2 + 3 - 1); class 1: 2 / (4 + 3 - 2); class 2: 0 / (1 + 0 - 0); class 3: 0/0.
    iou = [1 / 4, 2 / 5, 0.0]
    np.testing.assert_allclose(s.iou[:3], 100 * np.array(iou))
    assert math.isnan(s.iou[3])
    assert s.miou == pytest.approx(100 * sum(iou) / 3)  # the undefined class 3 is left out of the mean
    assert s.pixel_accuracy == pytest.approx(100 * 3 / 7)
    assert s.mean_accuracy == pytest.approx(100 * (1 / 2 + 2 / 4 + 0 / 1) / 3)
    np.testing.assert_array_equal(s.gt_pixels, [2, 4, 1, 0])
    np.testing.assert_array_equal(s.pred_pixels, [3, 3, 0, 0])


def test_class_only_predicted_counts_as_zero():
    gt = np.array([[0, 0]], np.uint8)
    pred = np.array([[0, 1]], np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    s = cm.scores()
    # class 0: 1 / (2 + 1 - 1); class 1 predicted, never true: 0 / (0 + 1 - 0) = 0, in the mean; class 2: undefined.
    assert s.iou[0] == pytest.approx(50.0) and s.iou[1] == 0.0 and math.isnan(s.iou[2])
    assert s.miou == pytest.approx(25.0)
    assert s.mean_accuracy == pytest.approx(50.0)  # accuracy only over classes in the ground truth


def test_accumulates_over_images_not_per_image_mean():
    a_gt, a_pred = np.array([[0, 0, 0, 0]], np.uint8), np.array([[0, 0, 0, 1]], np.uint8)
    b_gt, b_pred = np.array([[1, 1]], np.uint8), np.array([[1, 0]], np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(a_gt, a_pred)
    cm.update(b_gt, b_pred)
    # one matrix: [[3, 1], [1, 1]] -> IoU0 = 3 / (4 + 4 - 3), IoU1 = 1 / (2 + 2 - 1)
    np.testing.assert_array_equal(cm.counts[:, :2], [[3, 1], [1, 1]])
    assert cm.scores().miou == pytest.approx(100 * (3 / 5 + 1 / 3) / 2)


def test_all_ignored_and_bad_input():
    cm = ConfusionMatrix(2)
    cm.update(np.full((2, 2), X, np.uint8), np.zeros((2, 2), np.uint8))
    s = cm.scores()
    assert cm.counts.sum() == 0 and math.isnan(s.miou) and math.isnan(s.pixel_accuracy)
    with pytest.raises(ValueError, match="differ in size"):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="has class 5"):
        cm.update(np.full((1, 1), 5, np.uint8), np.zeros((1, 1), np.uint8))
    with pytest.raises(ValueError, match="must be"):
        ConfusionMatrix(2, np.zeros((2, 2)))


def test_oracle_majority_by_hand():
    segments = np.array([[0, 0, 0, 1], [0, 2, 2, 1], [3, 3, 2, 1]])
    gt = np.array([[1, 1, 2, 0], [X, 2, 2, 0], [X, X, 1, 2]], np.uint8)
    # segment 0: gt {1, 1, 2, ignore} -> 1; segment 1: {0, 0, 2} -> 0; segment 2: {2, 2, 1} -> 2; segment 3: only ignore -> none
    expected = np.array([[1, 1, 1, 0], [1, 2, 2, 0], [X, X, 2, 0]], np.uint8)
    np.testing.assert_array_equal(oracle_prediction(segments, gt, 3), expected)
    # ties go to the lower class index; segment ids need not be small or contiguous
    tie = oracle_prediction(np.array([[70, 70]]), np.array([[2, 1]], np.uint8), 3)
    np.testing.assert_array_equal(tie, [[1, 1]])


def test_boundary_mask_marks_both_sides():
    labels = np.array([[0, 0, 1, 1]])
    np.testing.assert_array_equal(boundary_mask(labels), [[False, True, True, False]])


def test_boundary_recall_and_precision_by_hand():
    gt = np.zeros((6, 8), np.uint8)
    gt[:, 4:] = 1  # one vertical edge: columns 3 and 4 are boundary pixels, 12 of them
    exact = gt.astype(np.int32)
    shifted = np.zeros((6, 8), np.int32)
    shifted[:, 6:] = 1  # the segment edge two columns to the right: columns 5 and 6
    b = BoundaryCounts(tolerance=0)
    b.update(exact, gt)
    assert (b.gt_total, b.gt_matched, b.pred_total, b.pred_matched) == (12, 12, 12, 12)
    b0 = BoundaryCounts(tolerance=0)
    b0.update(shifted, gt)
    assert b0.recall == 0.0 and b0.precision == 0.0
    b1 = BoundaryCounts(tolerance=1)  # column 4 is 1 px from column 5; column 5 is 1 px from column 4
    b1.update(shifted, gt)
    assert (b1.gt_matched, b1.pred_matched) == (6, 6) and b1.recall == pytest.approx(50.0)
    b2 = BoundaryCounts(tolerance=2)
    b2.update(shifted, gt)
    assert b2.recall == pytest.approx(100.0) and b2.precision == pytest.approx(100.0)


def test_boundary_ignore_counts_as_a_label_but_not_as_pixels():
    gt = np.zeros((1, 7), np.uint8)
    gt[0, 3] = X  # a 1-pixel void outline between two parts of class 0
    b = BoundaryCounts(tolerance=0)
    b.update(np.zeros((1, 7), np.int32), gt)
    # the labelled pixels next to the outline (columns 2 and 4) are ground-truth boundary; the outline itself is not counted
    assert b.gt_total == 2 and b.pred_total == 0
    assert math.isnan(b.precision) and b.recall == 0.0
