"""Frames in and results out: frame sources, result sinks, the live window and the web view."""
