"""ovseg on Triton Inference Server: a model repository from a bundle, the launcher, and the client of ovseg-run.

protocol.py    the wire format both sides share: tensor names, per-request options, errors
repository.py  a bundle -> a Triton model repository (config.pbtxt + model.py)
model.py       the Python backend model: one Segmenter per instance, one VideoStream per sequence
server.py      ovseg-serve: finds and runs tritonserver, waits for readiness, stops cleanly
client.py      ovseg-run --server: streams of frames to one or more servers, with retries
"""
