"""Test sessions, one virtualenv per transformers release: `nox -s floor`, `nox -s middle`, `nox -s newest`.

    floor   transformers == the floor declared in setup.cfg (install_requires), the whole suite
    middle  a release between floor and newest, the compatibility subset (model, remote code, old checkpoints, chat)
    newest  what a fresh `pip install` resolves today (the canary `.ci/run` also runs), the whole suite

Each session installs CPU torch 2.13.0 with pip first (an unpinned torch would pull a multi-GB CUDA build), then the
package with its test extras. Extra arguments go to pytest: `nox -s floor -- -k remote_code`.
"""

import configparser
import re
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["floor", "newest"]

TORCH = "torch==2.13.0"
MIDDLE_RELEASE = "5.20.2"
# what each old release must keep working: the model, checkpoints with their code, old checkpoints, chat, processor
COMPATIBILITY_SUBSET = [
    "tests/test_compat.py",
    "tests/test_modeling_llava_ext.py",
    "tests/test_configuration_llava_ext.py",
    "tests/test_remote_code.py",
    "tests/test_compat_v010.py",
    "tests/test_refresh_code.py",
    "tests/test_processing_llava_ext.py",
    "tests/test_chat.py",
]


def declared_floor() -> str:
    """The lowest transformers release setup.cfg admits (`transformers>=X,<Y`)."""
    config = configparser.ConfigParser()
    config.read(Path(__file__).parent / "setup.cfg")
    match = re.search(r"^transformers>=([\w.]+)", config["options"]["install_requires"], re.MULTILINE)
    if match is None:
        raise ValueError("setup.cfg's install_requires has no 'transformers>=X' line; declare the floor there.")
    return match.group(1)


def run_tests(session: nox.Session, transformers: str, paths: list[str]) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]", transformers)
    session.run("python", "-c", "import transformers; print('transformers', transformers.__version__)")
    session.run("python", "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *(session.posargs or paths))


@nox.session
def floor(session: nox.Session) -> None:
    """The oldest supported release: the whole suite."""
    run_tests(session, f"transformers=={declared_floor()}", ["tests"])


@nox.session
def middle(session: nox.Session) -> None:
    """A release between the floor and the newest: the compatibility subset."""
    run_tests(session, f"transformers=={MIDDLE_RELEASE}", COMPATIBILITY_SUBSET)


@nox.session
def newest(session: nox.Session) -> None:
    """The newest release a fresh install resolves: the whole suite."""
    run_tests(session, "transformers", ["tests"])
