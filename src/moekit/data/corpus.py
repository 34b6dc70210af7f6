"""Loader for the small multi-domain text corpus embedded in the package.

The corpus (built by ``scripts/build_corpus.py``, provenance in ``DATA.md``) has one
xz-compressed UTF-8 file per domain under ``moekit/data/corpus/``; samples inside a file are
separated by the ASCII record separator U+001E.  Every shipped file's sha256 is recorded in
``MANIFEST.json`` and checked whenever the file is read, so a damaged or hand-edited corpus fails
loudly instead of silently changing experiments.

The train/validation split is a fixed function of a sample's index within its domain
(:func:`split_of`): nothing is random at load time, so every run sees the same split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import lzma
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DOMAINS: tuple[str, ...] = ("python", "english", "german", "french", "russian", "japanese")
"""Domain names, in the order that defines their integer ids (see :func:`domain_id`)."""

SPLITS: tuple[str, ...] = ("train", "validation", "all")
VALIDATION_EVERY = 20
"""Every 20th sample of each domain (index 19, 39, ...) is held out for validation."""

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
MANIFEST_NAME = "MANIFEST.json"
BPE_NAME = "bpe.json"
SEPARATOR = "\x1e"
BPE_SPECIAL_TOKENS: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|pad|>")

PathLike = str | os.PathLike[str]


class CorpusIntegrityError(RuntimeError):
    """A shipped corpus file is missing from the manifest or does not match its checksum."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One piece of text (a group of paragraphs, or a chunk of a Python module) and its domain."""

    text: str
    domain: str
    index: int  # position within its domain, over all splits; fixes the split (see split_of)


def split_of(index: int) -> str:
    """The split ("train" or "validation") that the sample with this in-domain index belongs to."""
    return "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"


def domain_id(domain: str) -> int:
    """Integer id of a domain (its position in :data:`DOMAINS`)."""
    return DOMAINS.index(_check_domains([domain])[0])


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _check_domains(domains: str | Iterable[str] | None) -> list[str]:
    """Normalise a domain selection (None = all, a single name, or names) and reject unknown names."""
    if domains is None:
        return list(DOMAINS)
    if isinstance(domains, str):
        domains = [domains]
    selected = list(dict.fromkeys(domains))  # de-duplicate, keep the caller's order
    if not selected:
        raise ValueError(f"no domain selected; expected some of {', '.join(DOMAINS)}")
    for d in selected:
        if d not in DOMAINS:
            raise ValueError(f"unknown domain {d!r}; expected one of {', '.join(DOMAINS)}")
    return selected


def _corpus_dir(directory: PathLike | None) -> Path:
    return CORPUS_DIR if directory is None else Path(directory)


def read_manifest(directory: PathLike | None = None) -> dict[str, Any]:
    """The parsed ``MANIFEST.json`` (checksums, sizes, sample counts, source package versions)."""
    path = _corpus_dir(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"corpus manifest not found: {path} (run scripts/build_corpus.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_verified(name: str, directory: PathLike | None = None) -> bytes:
    """Read a shipped corpus file and check it against the sha256 in the manifest."""
    root = _corpus_dir(directory)
    entry = read_manifest(root)["files"].get(name)
    if entry is None:
        raise CorpusIntegrityError(f"corpus file {name!r} is not listed in {root / MANIFEST_NAME}")
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CorpusIntegrityError(
            f"checksum mismatch for corpus file {path}: sha256 {digest}, manifest says {entry['sha256']}; "
            "the file is damaged or was changed without rebuilding (scripts/build_corpus.py)"
        )
    return data


def domain_texts(domain: str, directory: PathLike | None = None) -> list[str]:
    """All sample texts of one domain, in index order (train and validation together)."""
    (domain,) = _check_domains([domain])
    raw = lzma.decompress(read_verified(f"{domain}.txt.xz", directory))
    return raw.decode("utf-8").split(SEPARATOR)


def load_corpus(
    split: str = "train",
    domains: str | Iterable[str] | None = None,
    directory: PathLike | None = None,
) -> list[Sample]:
    """Load the samples of a split ("train", "validation" or "all") for some or all domains.

    ``directory`` defaults to the corpus shipped in the package; tests point it at a copy.
    Samples come grouped by domain (in the order asked for), each in index order.
    """
    _check_split(split)
    samples: list[Sample] = []
    for domain in _check_domains(domains):
        for index, text in enumerate(domain_texts(domain, directory)):
            if split == "all" or split_of(index) == split:
                samples.append(Sample(text=text, domain=domain, index=index))
    return samples


class Tokenizer(Protocol):
    """What the training code needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS/EOS/PAD specials (256, 257, 258).

    Works for every language and script with no training; decoding drops special tokens and
    replaces invalid UTF-8 (e.g. a window cut inside a multi-byte character) with U+FFFD.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range for vocab_size {self.vocab_size}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """Byte-level BPE tokenizer (``tokenizers`` library) with the :class:`ByteTokenizer` interface.

    Byte-level pre-tokenization makes every string encodable and ``decode(encode(s)) == s``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [tokenizer.token_to_id(t) for t in BPE_SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"BPE tokenizer lacks the special tokens {BPE_SPECIAL_TOKENS}")
        self.bos_id, self.eos_id, self.pad_id = ids

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (what `moekit export` saves as the checkpoint's tokenizer)."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_bpe_tokenizer(directory: PathLike | None = None) -> BPETokenizer:
    """The BPE tokenizer (vocabulary 4096) trained on the train split, checksum-verified."""
    from tokenizers import Tokenizer as HFTokenizer  # optional dependency, imported on use

    data = read_verified(BPE_NAME, directory)
    return BPETokenizer(HFTokenizer.from_str(data.decode("utf-8")))


def encode_samples(
    samples: Sequence[Sample], tokenizer: Tokenizer, add_eos: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the samples' tokens into one stream, with each token's domain id.

    Returns ``(tokens int32[N], domain_ids int8[N])``.  With ``add_eos`` every sample is followed
    by ``tokenizer.eos_id``, labelled with that sample's domain, so fixed-length windows cut from
    the stream keep document boundaries visible and carry a per-token domain label.
    """
    encoded = tokenizer.encode_batch([s.text for s in samples])
    if add_eos:
        encoded = [ids + [tokenizer.eos_id] for ids in encoded]
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=total)
    labels = np.array([domain_id(s.domain) for s in samples], dtype=np.int8)
    return tokens, np.repeat(labels, lengths)


def _byte_counts(samples: Iterable[Sample]) -> np.ndarray:
    data = "".join(s.text for s in samples).encode("utf-8")
    return np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.float64)


def unigram_bits_per_byte(
    split: str = "validation",
    domains: str | Iterable[str] | None = None,
    directory: PathLike | None = None,
) -> float:
    """Bits per byte of a unigram byte model fitted on the train split and evaluated on ``split``.

    Add-one smoothing keeps bytes unseen in training finite.  This is the baseline a language
    model must beat: it knows byte frequencies but no context.
    """
    _check_split(split)
    selected = _check_domains(domains)
    counts = _byte_counts(load_corpus("train", selected, directory)) + 1.0
    log_probs = np.log2(counts / counts.sum())
    eval_counts = _byte_counts(load_corpus(split, selected, directory))
    n = eval_counts.sum()
    if n == 0:
        return math.nan
    return float(-(eval_counts * log_probs).sum() / n)
