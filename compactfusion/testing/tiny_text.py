"""Character-level tokenizers built in memory, for tiny checkpoints that load like real ones.

Real diffusion checkpoints ship their tokenizers; a tiny test checkpoint needs tokenizers too
(so that ``from_pretrained`` and prompt encoding run as they do with real weights) but must not
download any. These build them from a handful of characters: every lowercase letter is a
token, anything else is the unknown token. Both save with ``save_pretrained`` and load back
with ``from_pretrained`` of the same class.
"""

from __future__ import annotations

import string

__all__ = ["char_clip_tokenizer", "char_t5_tokenizer"]


def char_t5_tokenizer():
    """A T5 tokenizer (Unigram, ``\u2581`` word marker) over ``a``-``z``: ids 0-2 are
    ``<pad>``, ``</s>``, ``<unk>``, 30 tokens in all, no extra ids (``<extra_id_N>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -1.0) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_ids=0,
    )  # fmt: skip


def char_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer (byte-level BPE without merges) over ``a``-``z``: id 0 is
    ``<|startoftext|>``, id 1 ``<|endoftext|>`` (also padding and unknown), then each letter
    inside a word and at its end (``a</w>``), 54 tokens in all. ``model_max_length`` is the
    padded prompt length pipelines use (77 in real CLIP checkpoints)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
