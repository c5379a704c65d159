"""open_clip's BPE tokenizer rebuilt as a `tokenizers` JSON, so the runtime can tokenise with no torch."""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ovseg.runtime.pipeline.text import EOT, SOT

from .errors import ExportError

# open_clip's pre-tokenisation pattern (without its special-token alternatives, which are never in user text).
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def build_clip_tokenizer() -> Tokenizer:
    simple = SimpleTokenizer()
    if simple.encoder.get(SOT) is None or simple.encoder.get(EOT) is None:
        raise ExportError(f"open_clip's tokenizer has no {SOT}/{EOT} tokens: this open_clip version is not supported")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    bpe = models.BPE(
        vocab=dict(simple.encoder), merges=merges, end_of_word_suffix="</w>", unk_token=None, fuse_unk=False
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([SOT, EOT])
    return tokenizer
