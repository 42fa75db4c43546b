"""The `llava-ext` command's shape: every subcommand is listed and its `--help` ends with one full example, and the
argparse layer lives in `llava_ext/cli/` only (library modules neither parse arguments nor print)."""

import ast
import re
from pathlib import Path

import pytest

import llava_ext
import llava_ext.cli
import llava_ext.cli.serve

SUBCOMMANDS = ["demo", "train", "merge-lora", "chat", "serve", "eval", "convert", "export", "refresh-code"]
PACKAGE = Path(llava_ext.__file__).parent
CLI = PACKAGE / "cli"


def test_help_lists_every_subcommand_in_order(capsys):
    with pytest.raises(SystemExit) as exit:
        llava_ext.cli.main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    commands = out.split("\n  COMMAND\n", 1)[1].split("\n\n", 1)[0]  # "    demo   train a tiny ...", wrapped
    listed = [line.split()[0] for line in commands.splitlines() if line[4] != " "]
    assert listed == SUBCOMMANDS, out


def test_no_subcommand_prints_help_and_returns_2(capsys):
    assert llava_ext.cli.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: llava-ext")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_exits_0_and_ends_with_one_full_example(command, capsys, monkeypatch):
    # `serve --help` is transformers serve's own; registering llava_ext with it (global state) is not needed to print it
    monkeypatch.setattr(llava_ext.cli.serve, "enable_transformers_serve", lambda: None, raising=False)
    with pytest.raises(SystemExit) as exit:
        llava_ext.cli.main([command, "--help"])
    assert exit.value.code == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert last_line.startswith(f"example: llava-ext {command} "), last_line


def library_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if CLI not in path.parents)


def cli_leaks(path: Path, root: Path = PACKAGE) -> list[str]:
    """'file:line name' for each argparse import, `print` call or import of `llava_ext.cli` in one module."""
    found = []  # (line, name)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from .. import cli` imports "..cli"
            module = "." * node.level + (node.module or "")
            names = [module] + [module + ("." if module.strip(".") else "") + alias.name for alias in node.names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            names = ["print()"]
        else:
            continue
        for name in names:
            bare = name.lstrip(".")
            if name == "print()" or bare.split(".")[0] == "argparse" or \
                    any(bare == cli or bare.startswith(cli + ".") for cli in ("cli", "llava_ext.cli")):
                found.append((node.lineno, name))
                break
    return [f"{path.relative_to(root)}:{line} {name}" for line, name in sorted(found)]


def test_library_modules_neither_parse_arguments_nor_print():
    modules = library_modules()
    assert PACKAGE / "chat.py" in modules and PACKAGE / "convert" / "__init__.py" in modules  # the walk sees them
    leaks = [leak for path in modules for leak in cli_leaks(path)]
    assert leaks == [], "move argument parsing and printing to llava_ext/cli/ (library code logs or returns): " + \
        ", ".join(leaks)


def test_the_leak_check_sees_prints_argparse_and_cli_imports(tmp_path):
    module = tmp_path / "module.py"
    module.write_text('"""print("in a docstring") is fine."""\nimport argparse.x\nfrom .cli import main\n\n\n'
                      'def f():\n    print("hi")\n')
    assert cli_leaks(module, tmp_path) == ["module.py:2 argparse.x", "module.py:3 .cli", "module.py:7 print()"]
    for source in ("from argparse import ArgumentParser", "from ..cli.chat import run", "import llava_ext.cli",
                   "from .. import cli", "from llava_ext import cli"):
        module.write_text(source + "\n")
        assert len(cli_leaks(module, tmp_path)) == 1, source
    for source in ("from transformers import cli", "from .convert import cli", "from . import client"):
        module.write_text(source + "\n")
        assert cli_leaks(module, tmp_path) == [], source


class _Stop(Exception):
    pass


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize(("command", "target", "attribute"), [
    ("chat", "llava_ext.cli.chat", "load_model_and_processor"),
    ("eval", "llava_ext.cli.eval", "evaluate_checkpoint"),
])
def test_quantize_and_dtype_reach_the_loader(command, target, attribute, quantize, monkeypatch, tmp_path, capsys):
    """`--quantize int8|int4 --dtype bfloat16` is handed to the library as given; an unknown choice is refused by
    argparse, which lists the choices."""
    import importlib

    seen = {}

    def record(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _Stop

    monkeypatch.setattr(importlib.import_module(target), attribute, record)
    extra = ["--data", str(tmp_path / "q.jsonl")] if command == "eval" else []
    with pytest.raises(_Stop):
        llava_ext.cli.main([command, "ckpt", *extra, "--quantize", quantize, "--dtype", "bfloat16"])
    assert seen["kwargs"]["quantize"] == quantize
    assert "bfloat16" in [*seen["args"], seen["kwargs"].get("dtype")]
    with pytest.raises(SystemExit) as exit:
        llava_ext.cli.main([command, "ckpt", *extra, "--quantize", "int2"])
    assert exit.value.code == 2
    assert re.search(r"invalid choice: 'int2' \(choose from '?int8'?, '?int4'?\)", capsys.readouterr().err)
