"""CLIP tokenisation with the `tokenizers` library, shared by the export side and the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

SOT = "<start_of_text>"
EOT = "<end_of_text>"


class ClipTokenizer:
    """Turns text into CLIP token ids, as open_clip's tokenizer does, from a tokenizers JSON file.

    The ids come back trimmed to the longest sequence in the batch (at most ``context_length``):
    CLIP's text transformer is causal and pools at the end-of-text token, so the padding after it
    never changes the embedding, and a short batch costs a fraction of a full 77-token pass.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int = 77):
        self.tokenizer = tokenizer
        self.context_length = context_length
        sot_id, eot_id = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
        if sot_id is None or eot_id is None:
            raise ValueError(f"tokenizer has no {SOT} / {EOT} tokens: it is not a CLIP tokenizer")
        self.sot_id: int = sot_id
        self.eot_id: int = eot_id

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 77) -> ClipTokenizer:
        return cls(Tokenizer.from_file(str(path)), context_length)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch([" ".join(t.split()) for t in texts], add_special_tokens=False)
        rows = []
        for enc in encodings:
            ids = [self.sot_id, *enc.ids][: self.context_length - 1] + [self.eot_id]
            rows.append(ids)
        width = max((len(r) for r in rows), default=2)
        out = np.zeros((len(rows), width), dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = ids
        return out
