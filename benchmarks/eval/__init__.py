"""ovseg-eval: mIoU of an ovseg bundle on the standard semantic-segmentation benchmarks.

datasets.py reads each benchmark from its usual on-disk layout, metrics.py accumulates confusion
matrices, protocols.py turns Segmenter results into class maps (guided, guidance-free, oracle),
cli.py runs a dataset with a progress bar, resumable state and JSON output.
"""
