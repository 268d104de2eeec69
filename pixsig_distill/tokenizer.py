"""A T5 tokenizer built locally for a known vocabulary (no sentencepiece model download).

Every word of the vocabulary becomes one Unigram piece ("▁red"); single characters are added as a
fallback so unseen words still tokenize (into characters) instead of collapsing to <unk>.
"""

from __future__ import annotations

import string

from transformers import T5Tokenizer


def build_t5_tokenizer(words: list[str], model_max_length: int = 64) -> T5Tokenizer:
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    word_pieces = [(f"\u2581{w}", -1.0) for w in sorted(set(words))]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    char_pieces = [("\u2581", -5.0)] + [(c, -10.0) for c in chars] + [(f"\u2581{c}", -10.0) for c in chars]
    seen, vocab = set(), []
    for piece, score in specials + word_pieces + char_pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
