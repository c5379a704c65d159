"""Inference engines: ONNX Runtime sessions, TensorRT plans, this device, and which precision runs."""
