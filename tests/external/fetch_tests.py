"""Place transformers' own tests, for the installed transformers version, in the external-test cache.

    python tests/external/fetch_tests.py --download              # the PyPI sdist (pip download)
    python tests/external/fetch_tests.py --sdist transformers-5.24.0.tar.gz --from-dir ~/src/transformers

The cache (default tests/external/.cache/transformers-<version>/, git-ignored) gets:
  tests/*.py                 the top-level test files from the PyPI source distribution (test_modeling_common.py,
                             test_configuration_common.py, test_pipeline_mixin.py, ...), which match the version;
  tests/causal_lm_tester.py, tests/generation/, tests/exporters/, tests/utils/test_configuration_utils.py,
  tests/models/<family>/     not in the sdist: copied from --from-dir, a transformers checkout at the tag
                             v<version> (`git clone --depth 1 -b v<version> https://github.com/huggingface/transformers`)
                             or a dir assembled by hand whose SOURCES.json names each file's source;
  shims                      for the four helper modules test_modeling_common (and the TP mixin) import, when neither source has
                             them (tests/external/shims: generation and export mixins without tests), and an
                             empty tests/utils/tiny_model_summary.json (the hub-backed pipeline tests skip);
  src/transformers           a link to the installed package (test_pipeline_mixin imports it from there);
  site/                      the test-only dependency `parameterized`, pip-installed here (not into the project);
  conftest.py, pytest.ini    load moekit_wrap_plugin and register transformers' markers;
  MANIFEST.json              where every file came from, with its sha256.
Everything is fetched here, once; nothing is downloaded when the tests run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import transformers

HERE = pathlib.Path(__file__).resolve().parent
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
# Imported by the sdist's top-level files or the model tests, but not shipped in the sdist.
HELPERS = ("causal_lm_tester.py", "generation/test_utils.py", "exporters/test_export.py",
           "utils/test_configuration_utils.py", "distributed_testing_utils.py")
SHIMMED = ("generation/test_utils.py", "exporters/test_export.py", "utils/test_configuration_utils.py",
           "distributed_testing_utils.py")
MARKERS = ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "generate", "torch_compile_test",
           "torch_export_test", "is_training_test", "is_pipeline_test", "is_staging_test", "bitsandbytes",
           "not_device_test", "tensor_parallel_ci", "mixed_precision", "flex_attn_test", "slow")


def default_cache() -> pathlib.Path:
    return HERE / ".cache" / f"transformers-{transformers.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--sdist", type=pathlib.Path, help="transformers-<version>.tar.gz already downloaded")
    src.add_argument("--download", action="store_true", help="pip download the sdist of the installed version")
    ap.add_argument("--from-dir", type=pathlib.Path, help="a transformers checkout (or any dir with its tests/ tree)")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--cache", type=pathlib.Path, default=None)
    ap.add_argument("--no-deps", action="store_true", help="do not pip-install `parameterized` into the cache")
    args = ap.parse_args(argv)
    version = transformers.__version__
    cache = args.cache or default_cache()
    tests = cache / "tests"
    if tests.exists():  # a fresh tree every time, so that MANIFEST.json describes every file
        shutil.rmtree(tests)
    tests.mkdir(parents=True)
    manifest: dict[str, dict] = {}

    sdist = args.sdist
    if args.download:
        dl = cache / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={version}", "-d", str(dl)], check=True)
        sdist = next(dl.glob(f"transformers-{version}.tar.gz"))
    _extract_top_level(sdist, version, tests, manifest)
    if not (tests / "test_modeling_common.py").exists():
        raise SystemExit(f"fetch_tests: {sdist} has no tests/test_modeling_common.py; expected the transformers "
                         f"{version} source distribution")

    wanted = list(HELPERS) + [f"models/{f}/test_modeling_{f}.py" for f in args.families]
    if args.from_dir:
        root = args.from_dir / "tests" if (args.from_dir / "tests").is_dir() else args.from_dir
        # A dir assembled by hand (not a tagged checkout) says where each file came from in SOURCES.json
        # ({path under tests/: source}); MANIFEST.json records that instead of the bare directory.
        notes_file = args.from_dir / "SOURCES.json"
        notes = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
        for rel in wanted:
            if (root / rel).is_file():
                _place(root / rel, tests, rel, manifest, notes.get(rel, f"from-dir:{args.from_dir}"))
        for rel in ("generation", "exporters"):  # sibling modules the helpers import
            for f in sorted((root / rel).glob("*.py")) if (root / rel).is_dir() else []:
                if not (tests / rel / f.name).exists():
                    sub = f"{rel}/{f.name}"
                    _place(f, tests, sub, manifest, notes.get(sub, f"from-dir:{args.from_dir}"))
    for rel in SHIMMED:
        if not (tests / rel).exists():
            _place(HERE / "shims" / rel, tests, rel, manifest, "shim (tests/external/shims)")
    summary = tests / "utils" / "tiny_model_summary.json"
    if not summary.exists():  # test_pipeline_mixin reads it at import; empty: the hub-backed pipeline tests skip
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("{}")
        manifest["utils/tiny_model_summary.json"] = {"source": "shim (empty: pipeline tests skip)", "sha256": ""}
    # test_pipeline_mixin imports transformers from <root>/src/transformers: point it at the installed package.
    link = cache / "src" / "transformers"
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(pathlib.Path(transformers.__file__).parent, target_is_directory=True)
    missing = [rel for rel in wanted if not (tests / rel).exists()]
    packages = {tests} | {d for p in tests.rglob("*.py") for d in p.relative_to(tests).parents if d.parts}
    for d in {tests, *(tests / d for d in packages if d != tests)}:
        if not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("")

    (cache / "conftest.py").write_text(
        "# written by moekit tests/external/fetch_tests.py: moekit's wrap hook (active with --moekit-wrap)\n"
        "import os\nimport sys\n"
        # relative to this conftest: a checkout's absolute path would point another worktree at its own plugin
        f"sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(__file__), {os.path.relpath(HERE, cache)!r})))\n"
        "pytest_plugins = ['moekit_wrap_plugin']\n")
    (cache / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider\nmarkers =\n" + "".join(f"    {m}\n" for m in MARKERS))
    if not args.no_deps:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(cache / "site"),
                        "parameterized"], check=True)
    (cache / "MANIFEST.json").write_text(json.dumps(
        {"transformers": version, "families": args.families, "missing": missing, "files": manifest}, indent=1))
    print(f"fetch_tests: {len(manifest)} files in {cache}" + (f"; still missing: {missing}" if missing else ""))
    return 1 if missing else 0


def _extract_top_level(sdist: pathlib.Path, version: str, tests: pathlib.Path, manifest: dict) -> None:
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if rel and member.isfile() and rel.endswith(".py") and "/" not in rel:
                data = tar.extractfile(member).read()
                (tests / rel).write_bytes(data)
                manifest[rel] = {"source": f"sdist:{sdist.name}", "sha256": hashlib.sha256(data).hexdigest()}


def _place(src: pathlib.Path, tests: pathlib.Path, rel: str, manifest: dict, source: str) -> None:
    dst = tests / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    manifest[rel] = {"source": source, "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()}


if __name__ == "__main__":
    sys.exit(main())
