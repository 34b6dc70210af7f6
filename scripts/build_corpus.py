#!/usr/bin/env python3
"""Build the embedded multi-domain text corpus shipped in ``src/moekit/data/corpus/``.

Run from the repository root (see DATA.md)::

    .venv/bin/python scripts/build_corpus.py

Inputs (all offline, from Debian 12 packages that must be installed first)::

    apt-get install --no-install-recommends \\
        developers-reference developers-reference-de developers-reference-fr \\
        developers-reference-ru developers-reference-ja \\
        debian-faq debian-faq-de debian-faq-fr debian-faq-ru debian-faq-ja \\
        maint-guide maint-guide-de maint-guide-fr maint-guide-ru maint-guide-ja \\
        libpython3.11-stdlib libpython3.11-minimal

* ``python``: pure-Python modules of the CPython 3.11 standard library as packaged by Debian
  (PSF licence).
* ``english``, ``german``, ``french``, ``russian``, ``japanese``: the plain-text renderings of
  three Debian manuals that Debian ships in all five languages (Developer's Reference, Debian
  FAQ, New Maintainers' Guide).  The manuals are hard-wrapped and the translations are partial,
  so each paragraph is unwrapped and kept only if it is prose in the domain's language (code
  blocks, tables of contents and untranslated English paragraphs are dropped).

Outputs (each written atomically: temp file + rename)::

    DOMAIN.txt.xz   one per domain: UTF-8 samples joined by the record separator U+001E
    bpe.json        byte-level BPE tokenizer (``tokenizers``) trained on the train split
    NOTICE.txt      the copyright/licence notices of every source package
    MANIFEST.json   sha256 + sizes of every file above, sample counts, source versions

The build is deterministic: the same package versions give byte-identical outputs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_loader_module():
    """Import src/moekit/data/corpus.py by path: the split rule and special tokens live there.

    Loading the file directly (instead of ``import moekit``) keeps the build independent of the
    rest of the package (torch etc.) and of whether moekit is installed.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("_moekit_corpus", REPO_ROOT / "src/moekit/data/corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


_loader = _load_loader_module()
BPE_SPECIAL_TOKENS: tuple[str, ...] = _loader.BPE_SPECIAL_TOKENS
DOMAINS: tuple[str, ...] = _loader.DOMAINS
split_of = _loader.split_of

DEFAULT_OUT = REPO_ROOT / "src" / "moekit" / "data" / "corpus"

# Samples are cut at paragraph (prose) or line (code) boundaries once they reach this size.
CHUNK_BYTES = 1024
# A sample never grows past this many bytes unless a single paragraph/line is already larger.
MAX_CHUNK_BYTES = 4 * CHUNK_BYTES
# Raw-size budget for the python domain, so that it is comparable to the prose domains.
PYTHON_BUDGET_BYTES = 900_000
# Modules larger than this are skipped so that no single file dominates the code domain.
PYTHON_MAX_FILE_BYTES = 100_000
BPE_VOCAB_SIZE = 4096
SEPARATOR: str = _loader.SEPARATOR  # U+001E record separator; never inside a sample (checked)
XZ_PRESET = 9 | lzma.PRESET_EXTREME

PY_STDLIB = Path("/usr/lib/python3.11")
PY_PACKAGES = ("libpython3.11-minimal", "libpython3.11-stdlib")
# Test suites, vendored/generated data and demo code are not representative library code.
PY_EXCLUDED_PARTS = {
    "test", "tests", "idle_test", "idlelib", "lib2to3", "ensurepip", "pydoc_data", "encodings",
    "__phello__", "turtledemo", "site-packages", "dist-packages", "__pycache__",
}

_DR = "/usr/share/developers-reference"
_FAQ = "/usr/share/doc/debian/FAQ"
# domain -> ISO code, [(Debian package, file)]; the order fixes the sample order.
PROSE_SOURCES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "english": ("en", [
        ("developers-reference", f"{_DR}/developers-reference.txt.gz"),
        ("debian-faq", f"{_FAQ}/debian-faq.en.txt.gz"),
        ("maint-guide", "/usr/share/doc/maint-guide/maint-guide.en.txt.gz"),
    ]),
}
for _domain, _code in (("german", "de"), ("french", "fr"), ("russian", "ru"), ("japanese", "ja")):
    PROSE_SOURCES[_domain] = (_code, [
        (f"developers-reference-{_code}", f"{_DR}/{_code}/developers-reference.txt.gz"),
        (f"debian-faq-{_code}", f"{_FAQ}/debian-faq.{_code}.txt.gz"),
        (f"maint-guide-{_code}", f"/usr/share/doc/maint-guide-{_code}/maint-guide.{_code}.txt.gz"),
    ])

# Frequent function words that are (nearly) unique to one language; words that are common in
# two of the three languages ("in", "an", "des", "on", "so"...) are left out on purpose.
STOPWORDS = {
    "en": set("the and of to is that for it with as are be this you your can not from have if which "
              "will should would there their they what when has was been also these may must".split()),
    "de": set("der die das und ist nicht zu den mit sich auf für ein eine einen dem sie wird werden "
              "auch von im oder wenn können kann sind wie nur bei diese dieser diesem wir ihr einem "
              "eines noch nach über zum zur dass daß es dies falls ihre ihren ihrem um aus als vom "
              "beim durch muss müssen soll sollte sollten haben hat wurde".split()),
    "fr": set("le la les et est une du pour dans que qui pas sur vous il ce avec ou être sont peut par "
              "au aux cette ces leur plus votre vos nous mais sa son ses été fait en se ne elle ils "
              "doit faut lorsque si".split()),
}
_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)
_RULE_RE = re.compile(r"^\s*([=\-*~^#_+.])\1{2,}\s*$")  # heading underlines and separators
_FOOTNOTE_RE = re.compile(r"\s?\^\[\d+\]")  # w3m footnote markers such as ^[26]
_SECTION_NUMBER_RE = re.compile(r"(?:^|\s)\d+(?:\.\d+)*\.\s")  # "1.2. Title" (tables of contents)
_NUMBERED_LISTING_RE = re.compile(r"(?:^|\s)1 \S.*\s2 \S.*\s3 \S")  # "1 Format: ... 2 Source: ..."
MIN_PARAGRAPH_CHARS = 40


def looks_like_markup(paragraph: str) -> bool:
    """Tables of contents, ASCII tables and line-numbered listings: text, but not prose."""
    return (len(_SECTION_NUMBER_RE.findall(paragraph)) >= 4 or "+--" in paragraph
            or paragraph.count("|") >= 4 or _NUMBERED_LISTING_RE.search(paragraph) is not None)


def _is_cjk(ch: str) -> bool:
    """True for characters of scripts written without spaces between words (Japanese, Chinese)."""
    cp = ord(ch)
    return (0x3000 <= cp <= 0x30FF or 0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF
            or 0xFF00 <= cp <= 0xFFEF)


def _script_fraction(text: str, code: str) -> float:
    """Fraction of the letters in ``text`` that belong to the script of language ``code``."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    if code == "ru":
        hits = sum(1 for ch in letters if "\u0400" <= ch <= "\u04ff")
    elif code == "ja":
        hits = sum(1 for ch in letters if _is_cjk(ch))
    else:
        hits = sum(1 for ch in letters if ch.isascii() or "\u00c0" <= ch <= "\u024f")
    return hits / len(letters)


def is_prose_in(paragraph: str, code: str) -> bool:
    """Whether an (unwrapped) paragraph is prose written in language ``code``."""
    if len(paragraph) < MIN_PARAGRAPH_CHARS or looks_like_markup(paragraph):
        return False  # headings, TOC entries, tables, stray fragments
    if code in ("ru", "ja"):
        # Non-Latin scripts: most letters must be in the script (rejects English + code).
        return _script_fraction(paragraph, code) >= 0.2
    if _script_fraction(paragraph, code) < 0.95:
        return False
    words = [w.lower() for w in _WORD_RE.findall(paragraph)]
    scores = {lang: sum(1 for w in words if w in stop) for lang, stop in STOPWORDS.items()}
    own = scores[code]
    # Enough function words to be a sentence, and more than any other language has.
    return own >= 2 and own >= 0.08 * len(words) and all(own > s for lang, s in scores.items() if lang != code)


def unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines into one; no space is inserted inside CJK text."""
    out = ""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        # The renderer only breaks lines at spaces, hyphens and slashes, so a line that ends in
        # "word-" or "path/" continues the same word ("command-line", "/usr/share").
        glued = len(out) >= 2 and (out[-1] == "-" and out[-2].isalnum() or out[-1] == "/" and out[-2] != " ")
        if out and not glued and not (_is_cjk(out[-1]) and _is_cjk(line[0])):
            out += " "
        out += line
    return out


def prose_paragraphs(raw: str, code: str) -> list[str]:
    """Unwrap the plain-text rendering of a manual into paragraphs and keep the prose ones."""
    raw = unicodedata.normalize("NFC", raw.replace("\r\n", "\n"))
    block: list[str] = []
    paragraphs: list[str] = []
    for line in raw.split("\n") + [""]:
        if _RULE_RE.match(line):
            line = ""  # a rule ends the paragraph (and the heading above it)
        if line.strip():
            block.append(_FOOTNOTE_RE.sub("", line))
            continue
        if block:
            text = re.sub(r"\s+", " ", unwrap(block)).strip()
            if is_prose_in(text, code):
                paragraphs.append(text)
            block = []
    return paragraphs


def chunk(units: Iterable[str], joiner: str) -> list[str]:
    """Group consecutive units (paragraphs or lines) into samples of about CHUNK_BYTES bytes."""
    samples: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        n = len(unit.encode("utf-8")) + len(joiner)
        if current and size + n > MAX_CHUNK_BYTES:
            samples.append(joiner.join(current))
            current, size = [], 0
        current.append(unit)
        size += n
        if size >= CHUNK_BYTES:
            samples.append(joiner.join(current))
            current, size = [], 0
    if current:
        samples.append(joiner.join(current))
    return samples


def chunk_python(source: str) -> list[str]:
    """Split one module into samples at blank lines (between definitions) once CHUNK_BYTES is reached."""
    samples: list[str] = []
    current: list[str] = []
    size = 0
    for line in source.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        at_blank = not line.strip()
        if current and (size >= CHUNK_BYTES and at_blank or size + n > MAX_CHUNK_BYTES):
            samples.append("".join(current))
            current, size = [], 0
        if not current and at_blank:
            continue  # samples start with code, not with blank lines
        current.append(line)
        size += n
    if current:
        samples.append("".join(current))
    return [s for s in samples if s.strip()]


def dpkg_version(package: str) -> str:
    """Installed version of a Debian package (fails loudly if it is not installed)."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout:
        sys.exit(f"error: Debian package {package!r} is not installed (see the docstring of {__file__})")
    return result.stdout


def python_files() -> list[Path]:
    """The stdlib modules to use: the packages' .py files, in a fixed pseudo-random order.

    Ordering by a hash of the relative path (rather than alphabetically) spreads the size budget
    over the whole standard library instead of only the modules starting with 'a'..'c'.
    """
    files: list[Path] = []
    for package in PY_PACKAGES:
        listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=True)
        for name in listing.stdout.splitlines():
            path = Path(name)
            if path.suffix != ".py" or not path.is_relative_to(PY_STDLIB) or not path.is_file() or path.is_symlink():
                continue
            rel = path.relative_to(PY_STDLIB)
            if PY_EXCLUDED_PARTS.intersection(rel.parts) or rel.parts[0].startswith("config-"):
                continue
            files.append(path)
    return sorted(set(files), key=lambda p: hashlib.sha256(str(p.relative_to(PY_STDLIB)).encode()).hexdigest())


def build_python() -> tuple[list[str], dict]:
    samples: list[str] = []
    used: list[str] = []
    total = 0
    for path in python_files():
        data = path.read_bytes()
        if len(data) > PYTHON_MAX_FILE_BYTES:
            continue
        try:
            source = data.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
        if SEPARATOR in source:
            continue
        samples.extend(chunk_python(source))
        used.append(str(path.relative_to(PY_STDLIB)))
        total += len(data)
        if total >= PYTHON_BUDGET_BYTES:
            break
    provenance = {
        "packages": {p: dpkg_version(p) for p in PY_PACKAGES},
        "licence": "PSF-2.0 (Python Software Foundation License)",
        "files": [f"{PY_STDLIB}/{name}" for name in sorted(used)],
    }
    return samples, provenance


def build_prose(domain: str) -> tuple[list[str], dict]:
    code, sources = PROSE_SOURCES[domain]
    seen: set[str] = set()
    samples: list[str] = []
    for _package, path in sources:
        raw = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
        paragraphs = []
        for paragraph in prose_paragraphs(raw, code):
            # Licence boilerplate and FAQ answers repeat across the manuals: keep one copy so
            # that the same paragraph cannot land in both train and validation.
            if paragraph not in seen and SEPARATOR not in paragraph:
                seen.add(paragraph)
                paragraphs.append(paragraph)
        # Each paragraph is a single line, so "\n" separates them unambiguously.
        samples.extend(s + "\n" for s in chunk(paragraphs, "\n"))
    provenance = {
        "packages": {package: dpkg_version(package) for package, _ in sources},
        "licence": "GPL-2.0-or-later (Developer's Reference, New Maintainers' Guide); "
                   "Debian FAQ permissive licence (copyright SPI, see NOTICE.txt)",
        "files": [path for _, path in sources],
    }
    return samples, provenance


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def train_bpe(texts: list[str], vocab_size: int) -> bytes:
    """Train a byte-level BPE tokenizer (lossless round trip) and return its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BPE_SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str(pretty=False).encode("utf-8") + b"\n"


def build_notice(provenance: dict[str, dict]) -> bytes:
    """Concatenate the Debian copyright files of every source package (licence notices travel along)."""
    parts = [
        "moekit embedded corpus: copyright and licence notices of the sources.\n"
        "The corpus texts are derived (converted to plain text, filtered, re-chunked) from the\n"
        "Debian packages below; see DATA.md for how. Each section reproduces the package's\n"
        "/usr/share/doc/PACKAGE/copyright file. The complete sources are available from\n"
        "the Debian archive as the source packages of these binary packages.\n"
    ]
    first_with: dict[bytes, str] = {}
    for domain, info in provenance.items():
        for package, version in info["packages"].items():
            text = Path(f"/usr/share/doc/{package}/copyright").read_bytes()
            if text in first_with:  # translations share the copyright file of the original
                parts.append(f"\n==== {package} {version} ({domain}): copyright file identical to "
                             f"that of {first_with[text]} above ====\n")
                continue
            first_with[text] = package
            parts.append(f"\n==== {package} {version} ({domain}) ====\n\n" + text.decode("utf-8"))
    return "".join(parts).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    manifest: dict = {"format": 1, "separator": "U+001E", "chunk_bytes": CHUNK_BYTES,
                      "files": {}, "domains": {}}
    provenance: dict[str, dict] = {}
    train_texts: list[str] = []
    for domain in DOMAINS:
        samples, prov = build_python() if domain == "python" else build_prose(domain)
        assert all(SEPARATOR not in s for s in samples)
        raw = SEPARATOR.join(samples).encode("utf-8")
        packed = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
        name = f"{domain}.txt.xz"
        write_atomic(out / name, packed)
        manifest["files"][name] = {"sha256": sha256(packed), "bytes": len(packed),
                                   "raw_sha256": sha256(raw), "raw_bytes": len(raw)}
        manifest["domains"][domain] = {"file": name, "samples": len(samples), **prov}
        provenance[domain] = prov
        # The BPE tokenizer sees exactly the train split that the loader will produce.
        train_texts.extend(s for i, s in enumerate(samples) if split_of(i) == "train")
        print(f"{domain:9s} {len(samples):5d} samples  raw {len(raw):9,d} B  xz {len(packed):9,d} B")

    bpe = train_bpe(train_texts, BPE_VOCAB_SIZE)
    write_atomic(out / "bpe.json", bpe)
    manifest["files"]["bpe.json"] = {"sha256": sha256(bpe), "bytes": len(bpe)}
    print(f"bpe.json  vocab {BPE_VOCAB_SIZE}  {len(bpe):,d} B")

    notice = build_notice(provenance)
    write_atomic(out / "NOTICE.txt", notice)
    manifest["files"]["NOTICE.txt"] = {"sha256": sha256(notice), "bytes": len(notice)}

    # The manifest goes last, so a crash earlier leaves no manifest that vouches for new files.
    write_atomic(out / "MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"total shipped {total:,d} B in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
