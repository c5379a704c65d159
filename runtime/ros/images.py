"""sensor_msgs images to and from numpy frames, without cv_bridge (PyPI's ROS 2 has none). Takes the messages' fields
only, so nothing here imports rclpy.

A message the node cannot read is an OvsegError whose one-line message names the cause without per-message details
(stamps, byte counts of compressed data): the node logs each distinct message once and counts it.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from ovseg.errors import OvsegError

# encoding -> (element type, channels, conversion to a frame the Segmenter takes: gray, BGR or BGRA)
ENCODINGS: dict[str, tuple[type, int, int | None]] = {
    "bgr8": (np.uint8, 3, None),
    "rgb8": (np.uint8, 3, cv2.COLOR_RGB2BGR),
    "bgra8": (np.uint8, 4, None),
    "rgba8": (np.uint8, 4, cv2.COLOR_RGBA2BGRA),
    "mono8": (np.uint8, 1, None),
    "mono16": (np.uint16, 1, None),
}
BIG_ENDIAN = sys.byteorder == "big"


def frame_from_image(msg) -> np.ndarray:
    """A ``sensor_msgs/Image`` as an (H, W[, C]) uint8/uint16 gray, BGR or BGRA frame; OvsegError when the encoding is
    not one of ENCODINGS or step and data do not hold height rows of width pixels."""
    spec = ENCODINGS.get(msg.encoding)
    if spec is None:
        raise OvsegError(
            f"unknown encoding {msg.encoding!r}: ovseg-ros reads {', '.join(ENCODINGS)}, or compressed images with "
            "image_transport:=compressed"
        )
    dtype, channels, convert = spec
    height, width, step, size = int(msg.height), int(msg.width), int(msg.step), np.dtype(dtype).itemsize
    row = width * channels * size
    if not height or not width:
        raise OvsegError(f"an empty {msg.encoding} image ({width}x{height})")
    if step < row or step % size:
        raise OvsegError(f"step {step} cannot hold a row of {width} {msg.encoding} pixels ({row} bytes)")
    data = np.frombuffer(msg.data, np.uint8)
    if data.size != step * height:
        raise OvsegError(
            f"a {width}x{height} {msg.encoding} image of step {step} has {step * height} bytes, the message {data.size}"
        )
    pixels = data.reshape(height, step)[:, :row]
    if size > 1:
        pixels = pixels.view(np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")).astype(dtype, copy=False)
    frame = pixels.reshape((height, width, channels) if channels > 1 else (height, width))
    return cv2.cvtColor(frame, convert) if convert is not None else frame


def frame_from_compressed(msg) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (JPEG, PNG, ...: what OpenCV decodes) as a frame; OvsegError when it cannot
    be decoded."""
    data = np.frombuffer(msg.data, np.uint8)
    frame = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if frame is None:
        raise OvsegError(f"a compressed image (format {msg.format!r}) that OpenCV cannot decode: corrupt or truncated")
    return frame


def fill_image(msg, pixels: np.ndarray, encoding: str):
    """``msg`` (a ``sensor_msgs/Image``) holding ``pixels`` (H, W[, C]) in ``encoding``, rows packed; returns it."""
    pixels = np.ascontiguousarray(pixels)
    msg.height, msg.width = pixels.shape[:2]
    msg.encoding = encoding
    msg.is_bigendian = BIG_ENDIAN
    msg.step = pixels.strides[0]
    msg.data = pixels.tobytes()
    return msg


def label_map_encoding(label_map: np.ndarray) -> tuple[np.ndarray, str]:
    """The label map of segment ids as mono16 (what image viewers show), or 32SC1 where an id does not fit."""
    if label_map.size and (label_map.min() < 0 or label_map.max() > np.iinfo(np.uint16).max):
        return label_map.astype(np.int32, copy=False), "32SC1"
    return label_map.astype(np.uint16), "mono16"
