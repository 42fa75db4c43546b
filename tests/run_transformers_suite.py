"""Run transformers' own llava_next / llava_onevision tests against llava_ext's LlavaExtNext* / LlavaExtOnevision*.

transformers' source distribution ships only the top-level common test modules (test_modeling_common.py,
test_processing_common.py, ...), not tests/models/, tests/generation/ or tests/vlm_tester.py. So the runner takes a
transformers tests tree (`--transformers-tests`, a checkout of the release's tag, or its tests/ folder) for those, and
by default overlays the common modules from the sdist of the *installed* transformers release (downloaded once with
pip into the cache), so the mixins match the release under test exactly. It copies what the llava tests import into
a temporary directory, puts tests/tfsuite_plugin.py there as its conftest.py (which swaps the classes in and holds
the skip list with reasons), and runs pytest on it. Extra arguments after `--` go to pytest.

Obtaining the tests tree, with internet:
    git clone --depth 1 --branch v5.25.0 https://github.com/huggingface/transformers /tmp/transformers-v5.25.0

Example:
    python tests/run_transformers_suite.py --transformers-tests /tmp/transformers-v5.25.0 -- -x -q
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava-ext-tfsuite"
MODEL_FOLDERS = ("llava_next", "llava_onevision")
# What the llava tests import besides the top-level modules: the mixin packages and their helpers.
PACKAGES = ("generation", "utils", "exporters", "pipelines")
# Repo-root helpers the common modules put on sys.path (`sys.path.append(.../utils)` in test_*_common.py).
ROOT_HELPERS = ("utils/fetch_hub_objects_for_ci.py", "utils/test_module")
TEST_DEPENDENCIES = ("parameterized", "httpx")  # imported by transformers' tests (and their helper), not by llava_ext


def _tests_root(path: Path) -> Path:
    for candidate in (path / "tests", path):
        if (candidate / "test_modeling_common.py").is_file() and (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no transformers tests tree (tests/test_modeling_common.py and tests/models/); "
        "pass a checkout of the release's tag, e.g. `git clone --depth 1 --branch v5.25.0 "
        "https://github.com/huggingface/transformers`."
    )


def _sdist(version: str, cache: Path) -> Path:
    target = cache / "sdist"
    found = sorted(target.glob(f"transformers-{version}.tar.gz"))
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "-d", str(target), f"transformers=={version}"],
            check=True,
        )  # fmt: skip
        found = sorted(target.glob(f"transformers-{version}.tar.gz"))
    return found[0]


def _overlay_sdist_common(sdist: Path, dest_tests: Path) -> list[str]:
    """Writes the sdist's top-level tests/*.py over dest_tests; returns their names."""
    names = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts  # ("transformers-5.25.0", "tests", "test_x.py")
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                (dest_tests / parts[2]).write_bytes(tar.extractfile(member).read())
                names.append(parts[2])
    return names


def _dependency_path(cache: Path) -> Path | None:
    missing = [name for name in TEST_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    target = cache / f"deps-py{sys.version_info.major}{sys.version_info.minor}"
    if not all((target / name).exists() for name in missing):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), *missing], check=True)
    return target


def build_tree(source: Path, dest: Path, sdist: Path | None) -> Path:
    """Copies what the llava tests need from `source` into dest/tests; returns dest."""
    src = _tests_root(source)
    tests = dest / "tests"
    tests.mkdir(parents=True)
    for path in src.glob("*.py"):
        shutil.copy2(path, tests / path.name)
    for package in PACKAGES:
        if (src / package).is_dir():
            shutil.copytree(src / package, tests / package)
    (tests / "models").mkdir()
    (tests / "models" / "__init__.py").touch()
    for folder in MODEL_FOLDERS:
        shutil.copytree(src / "models" / folder, tests / "models" / folder)
    if sdist is not None:
        _overlay_sdist_common(sdist, tests)
    for helper in ROOT_HELPERS:
        if not (src.parent / helper).exists():
            raise FileNotFoundError(f"{src.parent / helper} is missing; pass the checkout's root, not only its tests/.")
        (dest / helper).parent.mkdir(parents=True, exist_ok=True)
        if (src.parent / helper).is_dir():
            shutil.copytree(src.parent / helper, dest / helper)
        else:
            shutil.copy2(src.parent / helper, dest / helper)
    # test_pipeline_mixin.py reads transformers' source at <root>/src/transformers: point it at the installed release.
    (dest / "src").mkdir()
    (dest / "src" / "transformers").symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    shutil.copy2(HERE / "tfsuite_plugin.py", dest / "conftest.py")
    (dest / "pytest.ini").write_text("[pytest]\naddopts = -ra -p no:cacheprovider\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tests/run_transformers_suite.py --transformers-tests /tmp/transformers-v5.25.0 -- -q",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--transformers-tests", type=Path, required=True, help="transformers checkout (its root)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"sdist cache (default {DEFAULT_CACHE})")
    parser.add_argument("--no-sdist", action="store_true", help="use the tree's own common modules, no download")
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree and print its path")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after `--`: arguments for pytest")
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args

    sdist = None if args.no_sdist else _sdist(transformers.__version__, args.cache_dir)
    deps = _dependency_path(args.cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="llava-ext-tfsuite-"))
    try:
        build_tree(args.transformers_tests, workdir, sdist)
        env = dict(os.environ)
        if deps is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
        targets = [f"tests/models/{folder}" for folder in MODEL_FOLDERS]
        command = [sys.executable, "-m", "pytest", *targets, *pytest_args]
        return subprocess.run(command, cwd=workdir, env=env).returncode
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
