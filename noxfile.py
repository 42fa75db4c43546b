"""Test sessions, one virtualenv per transformers / torch release: `nox -s floor`, `nox -s newest`, ...

    floor         transformers and torch at the floors declared in setup.cfg (install_requires): the release suite
    middle        a transformers release between floor and newest: the compatibility subset
    newest        what a fresh `pip install` resolves today (the canary `.ci/run` also runs): the release suite
    next          transformers NEXT_TRANSFORMERS installed with `--no-deps` (see `next` below): the release suite
    torch_newest  the newest torch release (TORCH_NEWEST) with the newest transformers: the release suite

"The release suite" is the README's test command (`-m "not slow"`) plus the slow tests marked `release`: the ones
that are too slow for every run but say whether a release works (benchmarks end to end, the compile fallback).
Each session installs CPU torch with pip first (an unpinned torch would pull a multi-GB CUDA build), then the package
with its test extras. Extra arguments go to pytest: `nox -s floor -- -k remote_code`.
"""

import configparser
import os
import re
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["floor", "newest"]

MIDDLE_RELEASE = "5.20.2"
# Released, but a fresh install here still resolves the one before: 5.25 requires kernels>=0.19.1, which some package
# indexes do not carry yet. `next` tests it with --no-deps so the break shows before users elsewhere hit it.
NEXT_TRANSFORMERS = "5.25.0"
# The newest torch on PyPI. PyPI has no CPU-only build of it (only download.pytorch.org has), so this session installs
# the default build, whose CUDA libraries (about 3 GB) load and then stay unused on a CPU machine.
TORCH_NEWEST = "2.15.0"
RELEASE_SUITE = "not slow or release"
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


def declared_floor(package: str) -> str:
    """The lowest release of `package` that setup.cfg admits (a `package>=X` line of install_requires)."""
    config = configparser.ConfigParser()
    config.read(Path(__file__).parent / "setup.cfg")
    match = re.search(rf"^{package}>=([\w.]+)", config["options"]["install_requires"], re.MULTILINE)
    if match is None:
        raise ValueError(f"setup.cfg's install_requires has no '{package}>=X' line; declare the floor there.")
    return match.group(1)


def run_tests(
    session: nox.Session, transformers: str, paths: list[str], marks: str = RELEASE_SUITE,
    torch: str | None = None, transformers_no_deps: str | None = None,
) -> None:
    session.install(torch or f"torch=={declared_floor('torch')}")
    session.install("-e", ".[test]", transformers)
    if transformers_no_deps:
        session.install("--no-deps", transformers_no_deps)
    session.run("python", "-c", "import torch, transformers; "
                "print('torch', torch.__version__, '| transformers', transformers.__version__)")
    if torch:  # the session exists to test exactly this release: fail if the resolver put another one in
        wanted = torch.split("==")[1]
        session.run("python", "-c", f"import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '{wanted}' "
                    f"else 'torch ' + torch.__version__ + ' was installed, not {wanted}')")
    session.run("python", "-m", "pytest", "-q", "-m", marks, "-p", "no:cacheprovider", *(session.posargs or paths))


@nox.session
def floor(session: nox.Session) -> None:
    """The oldest supported transformers and torch: the release suite."""
    run_tests(session, f"transformers=={declared_floor('transformers')}", ["tests"])


@nox.session
def middle(session: nox.Session) -> None:
    """A transformers release between the floor and the newest: the compatibility subset."""
    run_tests(session, f"transformers=={MIDDLE_RELEASE}", COMPATIBILITY_SUBSET, marks="not slow")


@nox.session
def newest(session: nox.Session) -> None:
    """The newest transformers a fresh install resolves: the release suite."""
    run_tests(session, "transformers", ["tests"])


@nox.session(name="next")
def next_release(session: nox.Session) -> None:
    """transformers NEXT_TRANSFORMERS over the newest resolvable one's dependencies, with hub kernels switched off.

    5.25 requires the `kernels` package and turns `use_kernels` on in every `from_pretrained`; without `kernels`
    installed that raises "Kernels are not available". The tests switch kernels off (USE_HUB_KERNELS=NO, set by
    tests/conftest.py when `kernels` is missing, never by the package) and say so in pytest's header; what kernels
    change is not tested here.
    """
    session.log(f"installing transformers=={NEXT_TRANSFORMERS} with --no-deps (its kernels>=0.19.1 may be missing "
                "from this index); tests/conftest.py sets USE_HUB_KERNELS=NO when kernels is not installed")
    run_tests(session, "transformers", ["tests"], transformers_no_deps=f"transformers=={NEXT_TRANSFORMERS}")


@nox.session
def torch_newest(session: nox.Session) -> None:
    """The newest torch (TORCH_NEWEST, PyPI's default build) with the newest transformers: the release suite."""
    # A machine-wide pip constraint that caps torch (some CI images cap it at the wheels they keep on disk) would
    # otherwise install another torch here, or reinstall one when the package's requirements are resolved.
    session.env["PIP_CONSTRAINT"] = os.devnull
    run_tests(session, "transformers", ["tests"], torch=f"torch=={TORCH_NEWEST}")
