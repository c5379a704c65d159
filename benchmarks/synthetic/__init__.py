"""A world whose semantics are known: generated scenes of coloured shapes on textured floors, with per-pixel labels,
unlabelled instance masks and captions, and a tiny CLIP trained on them. It measures label quality end to end without
downloaded CLIP weights."""
