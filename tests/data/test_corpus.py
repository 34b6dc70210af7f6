"""Tests for the embedded multi-domain corpus, its split, checksums and tokenizers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from moekit.data import (
    DOMAINS,
    ByteTokenizer,
    CorpusIntegrityError,
    Sample,
    domain_id,
    encode_samples,
    load_bpe_tokenizer,
    load_corpus,
    read_manifest,
    split_of,
    unigram_bits_per_byte,
)
from moekit.data.corpus import CORPUS_DIR, domain_texts

MIXED_TEXT = (
    "def f(x):\n    return x ** 2  # square\n"
    "The quick brown fox. Größenordnung, naïve café, élève. "
    "Съешь же ещё этих мягких французских булок. 日本語のテキストです。 Ελληνικά 🙂\n"
)


@pytest.fixture(scope="module")
def train() -> list[Sample]:
    return load_corpus("train")


@pytest.fixture(scope="module")
def validation() -> list[Sample]:
    return load_corpus("validation")


def test_domains_required_by_the_issue_are_present():
    assert {"python", "english"} <= set(DOMAINS)
    assert len(DOMAINS) >= 5
    assert set(read_manifest()["domains"]) == set(DOMAINS)


def test_each_domain_has_at_least_200kb_of_text():
    for domain in DOMAINS:
        size = sum(len(t.encode("utf-8")) for t in domain_texts(domain))
        assert size >= 200_000, (domain, size)


def test_shipped_corpus_is_at_most_10mb_compressed():
    total = sum(p.stat().st_size for p in CORPUS_DIR.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024


def test_non_latin_domain_is_really_non_latin(train):
    russian = "".join(s.text for s in train if s.domain == "russian")
    assert sum("\u0400" <= ch <= "\u04ff" for ch in russian) > 0.5 * sum(ch.isalpha() for ch in russian)


def test_every_sample_is_labelled_and_non_empty(train, validation):
    for s in train + validation:
        assert s.domain in DOMAINS
        assert s.text.strip()
        assert "\x1e" not in s.text


def test_train_and_validation_are_disjoint_and_non_empty_per_domain(train, validation):
    for domain in DOMAINS:
        tr = {s.index for s in train if s.domain == domain}
        va = {s.index for s in validation if s.domain == domain}
        assert tr and va, domain
        assert not tr & va, domain
        assert tr | va == set(range(len(tr) + len(va))), domain  # together they are everything
        assert all(split_of(i) == "validation" for i in va)
    # Disjoint by content too (paragraphs are de-duplicated at build time).
    train_texts = {s.text for s in train}
    assert not any(s.text in train_texts for s in validation)


def test_split_is_deterministic(validation):
    again = load_corpus("validation")
    assert again == validation
    all_samples = load_corpus("all", domains=["german"])
    assert [s for s in all_samples if split_of(s.index) == "validation"] == [
        s for s in validation if s.domain == "german"
    ]


def test_domain_selection():
    samples = load_corpus("validation", domains="french")
    assert samples and {s.domain for s in samples} == {"french"}
    two = load_corpus("validation", domains=["japanese", "python"])
    assert [s.domain for s in two][0] == "japanese"
    assert {s.domain for s in two} == {"japanese", "python"}


def test_bad_split_and_domain_names_raise_value_error():
    with pytest.raises(ValueError, match=r"'valid'.*train, validation"):
        load_corpus("valid")
    with pytest.raises(ValueError, match=r"'klingon'.*python"):
        load_corpus("train", domains=["english", "klingon"])
    with pytest.raises(ValueError, match="no domain"):
        load_corpus("train", domains=[])
    with pytest.raises(ValueError, match="'test'"):
        unigram_bits_per_byte("test")


@pytest.fixture()
def corpus_copy(tmp_path: Path) -> Path:
    target = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, target)
    return target


def test_loader_reads_a_corpus_directory(corpus_copy):
    assert load_corpus("validation", domains="russian", directory=corpus_copy) == load_corpus(
        "validation", domains="russian"
    )


def test_checksum_mismatch_is_detected(corpus_copy):
    path = corpus_copy / "german.txt.xz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusIntegrityError, match="german.txt.xz"):
        load_corpus("train", directory=corpus_copy)
    # Other domains are still readable.
    assert load_corpus("validation", domains="french", directory=corpus_copy)


def test_tampered_bpe_file_is_detected(corpus_copy):
    path = corpus_copy / "bpe.json"
    path.write_bytes(path.read_bytes().replace(b'"<|eos|>"', b'"<|EOS|>"', 1))
    with pytest.raises(CorpusIntegrityError, match="bpe.json"):
        load_bpe_tokenizer(corpus_copy)


def test_missing_manifest_is_reported(corpus_copy):
    (corpus_copy / "MANIFEST.json").unlink()
    with pytest.raises(FileNotFoundError, match="MANIFEST.json"):
        load_corpus("train", directory=corpus_copy)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    ids = tok.encode(MIXED_TEXT)
    assert len(ids) == len(MIXED_TEXT.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == MIXED_TEXT
    assert tok.decode([tok.bos_id, *tok.encode("ok"), tok.eos_id, tok.pad_id]) == "ok"
    # A window cut inside a multi-byte character decodes with a replacement character.
    assert tok.decode(tok.encode("日本")[:4]) == "日\ufffd"
    with pytest.raises(ValueError):
        tok.decode([300])


def test_bpe_tokenizer_round_trip(validation):
    tok = load_bpe_tokenizer()
    assert tok.vocab_size == 4096
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    per_domain = {s.domain: s.text for s in validation}
    for domain, text in per_domain.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, domain
        # Trained on this kind of text, BPE must compress it well below one token per byte.
        assert len(ids) < 0.6 * len(text.encode("utf-8")), domain
    assert tok.decode([tok.bos_id, *tok.encode("ok"), tok.eos_id]) == "ok"


def test_encode_samples_labels_every_token():
    samples = load_corpus("validation", domains=["python", "russian"])
    tok = ByteTokenizer()
    tokens, domain_ids = encode_samples(samples, tok)
    assert tokens.dtype == np.int32 and domain_ids.dtype == np.int8
    assert tokens.shape == domain_ids.shape
    expected = sum(len(s.text.encode("utf-8")) + 1 for s in samples)
    assert tokens.size == expected
    assert int((tokens == tok.eos_id).sum()) == len(samples)
    assert set(np.unique(domain_ids).tolist()) == {domain_id("python"), domain_id("russian")}
    # The stream decodes back to the samples, in order, and labels follow sample boundaries.
    first = len(samples[0].text.encode("utf-8"))
    assert tok.decode(tokens[:first].tolist()) == samples[0].text
    assert tokens[first] == tok.eos_id and domain_ids[first] == domain_id(samples[0].domain)
    no_eos, _ = encode_samples(samples, tok, add_eos=False)
    assert no_eos.size == expected - len(samples)


def test_encode_samples_with_bpe():
    samples = load_corpus("validation", domains="japanese")[:5]
    tok = load_bpe_tokenizer()
    tokens, domain_ids = encode_samples(samples, tok)
    assert tokens.max() < tok.vocab_size
    assert (domain_ids == domain_id("japanese")).all()
    assert tok.decode(tokens.tolist()) == "".join(s.text for s in samples)


def test_unigram_bits_per_byte_is_plausible():
    bpb = unigram_bits_per_byte("validation")
    assert 3.0 < bpb < 8.0
    # The baseline is deterministic and a model evaluated on its own training data does better.
    assert unigram_bits_per_byte("validation") == bpb
    assert unigram_bits_per_byte("train") < bpb + 0.5
    assert 3.0 < unigram_bits_per_byte("validation", domains="python") < 8.0
