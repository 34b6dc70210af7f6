"""Embedded multi-domain text corpus and tokenizers (see DATA.md for provenance).

>>> from moekit.data import load_corpus, ByteTokenizer, encode_samples
>>> train = load_corpus("train")                       # list[Sample(text, domain, index)]
>>> tokens, domain_ids = encode_samples(train, ByteTokenizer())
"""

from moekit.data.corpus import (
    DOMAINS,
    SPLITS,
    BPETokenizer,
    ByteTokenizer,
    CorpusIntegrityError,
    Sample,
    Tokenizer,
    domain_id,
    encode_samples,
    load_bpe_tokenizer,
    load_corpus,
    read_manifest,
    split_of,
    unigram_bits_per_byte,
)

__all__ = [
    "DOMAINS", "SPLITS", "BPETokenizer", "ByteTokenizer", "CorpusIntegrityError", "Sample", "Tokenizer",
    "domain_id", "encode_samples", "load_bpe_tokenizer", "load_corpus", "read_manifest", "split_of",
    "unigram_bits_per_byte",
]
