"""tests/run_transformers_suite.py: transformers' own llava_next / llava_onevision tests with our classes swapped in.

The full run needs a transformers checkout (the sdist has no tests/models/): set LLAVA_EXT_TRANSFORMERS_TESTS to one
at the installed release's tag. It takes minutes, so it is marked slow.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).parent / "run_transformers_suite.py"


def _runner():
    spec = importlib.util.spec_from_file_location("run_transformers_suite", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_folder_without_transformers_tests_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no transformers tests tree .*git clone --depth 1 --branch"):
        _runner().build_tree(tmp_path, tmp_path / "out", sdist=None)


def test_help_ends_with_an_example():
    result = subprocess.run([sys.executable, str(RUNNER), "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1].startswith("example: python tests/run_transformers_suite.py")


@pytest.mark.slow
@pytest.mark.skipif(
    "LLAVA_EXT_TRANSFORMERS_TESTS" not in os.environ, reason="set LLAVA_EXT_TRANSFORMERS_TESTS to a transformers checkout"
)
def test_transformers_llava_tests_pass_with_our_classes():
    tree = os.environ["LLAVA_EXT_TRANSFORMERS_TESTS"]
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--transformers-tests", tree, "--", "-q", "-p", "no:warnings"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:]
