"""Confusion-matrix metrics (mIoU, pixel accuracy, per-class IoU), oracle segment labels and boundary recall.

Conventions (those of detectron2's SemSegEvaluator and mmseg, and of TAG's evaluation):
- ground-truth pixels labelled 255 are ignored: they count nowhere, whatever is predicted there;
- a pixel whose prediction is no class (255, e.g. a segment labelled "unknown") is a miss for its
  ground-truth class and a hit for none: the matrix has one extra "no class" column;
- IoU_c = TP_c / (GT_c + Pred_c - TP_c); a class absent from both the ground truth and the
  predictions (0 / 0) has no IoU and is left out of the mean; a class only predicted has IoU 0;
- pixel accuracy = correct / all non-ignored pixels; mean accuracy averages TP_c / GT_c over the
  classes present in the ground truth;
- no Hungarian matching: prediction k is class k.
All numbers are accumulated over the whole dataset (one matrix), not averaged per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

IGNORE = 255


@dataclass
class Scores:
    """Percentages; per-class arrays hold NaN where a class is undefined (absent from both)."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: np.ndarray  # (C,)
    accuracy: np.ndarray  # (C,)
    gt_pixels: np.ndarray  # (C,) int64
    pred_pixels: np.ndarray  # (C,) int64


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


class ConfusionMatrix:
    """counts[g, p]: pixels of ground-truth class g predicted as p; column C = predicted as no class."""

    def __init__(self, num_classes: int, counts: np.ndarray | None = None):
        self.num_classes = num_classes
        shape = (num_classes, num_classes + 1)
        self.counts = np.zeros(shape, np.int64) if counts is None else np.asarray(counts, np.int64)
        if self.counts.shape != shape:
            raise ValueError(f"confusion matrix of {num_classes} classes must be {shape}, got {self.counts.shape}")

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
        c = self.num_classes
        valid = gt != IGNORE
        g = gt[valid].astype(np.int64)
        if g.size and g.max() >= c:
            raise ValueError(f"ground truth has class {int(g.max())}, the dataset has {c} classes")
        p = pred[valid].astype(np.int64)
        p[(p < 0) | (p >= c)] = c
        self.counts += np.bincount(g * (c + 1) + p, minlength=c * (c + 1)).reshape(c, c + 1)

    def scores(self) -> Scores:
        c = self.num_classes
        tp = np.diag(self.counts[:, :c]).astype(np.float64)
        gt = self.counts.sum(axis=1)
        pred = self.counts[:, :c].sum(axis=0)
        union = gt + pred - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = gt.sum()
        return Scores(
            miou=100 * _nanmean(iou),
            pixel_accuracy=100 * float(tp.sum() / total) if total else float("nan"),
            mean_accuracy=100 * _nanmean(acc),
            iou=100 * iou,
            accuracy=100 * acc,
            gt_pixels=gt,
            pred_pixels=pred,
        )


def oracle_prediction(segments: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Each segment takes the ground-truth class most of its non-ignored pixels have (ties: the lower class index).

    A segment that covers only ignored pixels predicts no class (255); it is never scored anyway.
    """
    ids, inverse = np.unique(segments, return_inverse=True)
    inverse = inverse.reshape(segments.shape)
    valid = gt != IGNORE
    hist = np.bincount(inverse[valid] * num_classes + gt[valid].astype(np.int64), minlength=len(ids) * num_classes)
    hist = hist.reshape(len(ids), num_classes)
    majority = hist.argmax(axis=1).astype(np.uint8)
    majority[hist.sum(axis=1) == 0] = IGNORE
    return majority[inverse]


def boundary_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every edge)."""
    edge = np.zeros(labels.shape, bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` pixels (a disk) of ``mask``."""
    if tolerance <= 0:
        return mask
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    return cv2.dilate(mask.astype(np.uint8), disk).astype(bool)


@dataclass
class BoundaryCounts:
    """Boundary recall and precision of segment candidates, accumulated over a dataset (pixel counts).

    Ground-truth boundaries are the non-ignored pixels next to a pixel of another label, ignore
    counted as a label: the edge of an unlabelled region is an edge, and PASCAL VOC's 5-pixel void
    outlines put a boundary on each side of the true contour, about 3 pixels from it. Precision
    counts the segment edges on non-ignored pixels (an unlabelled region has no edges to find).
    """

    tolerance: int
    gt_total: int = 0
    gt_matched: int = 0
    pred_total: int = 0
    pred_matched: int = 0

    def update(self, segments: np.ndarray, gt: np.ndarray) -> None:
        labelled = gt != IGNORE
        gt_edge = boundary_mask(gt) & labelled
        pred_edge = boundary_mask(segments) & labelled
        self.gt_total += int(gt_edge.sum())
        self.gt_matched += int((gt_edge & _near(pred_edge, self.tolerance)).sum())
        self.pred_total += int(pred_edge.sum())
        self.pred_matched += int((pred_edge & _near(gt_edge, self.tolerance)).sum())

    @property
    def recall(self) -> float:
        return 100 * self.gt_matched / self.gt_total if self.gt_total else float("nan")

    @property
    def precision(self) -> float:
        return 100 * self.pred_matched / self.pred_total if self.pred_total else float("nan")
