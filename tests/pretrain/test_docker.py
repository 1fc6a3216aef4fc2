"""docker/Dockerfile parses and installs the same package set as `make setup` (no Docker engine here)."""

from __future__ import annotations

import re
import shlex

from dockerfile_parse import DockerfileParser
from helpers import ROOT


def pip_install_args(command: str) -> list[str]:
    """The arguments after `pip install` in a shell command line (the last such install)."""
    words = shlex.split(command.replace("\\\n", " "))
    starts = [i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"]]
    assert starts, f"no pip install in {command!r}"
    args = words[starts[-1] + 2 :]
    return args[: args.index("&&")] if "&&" in args else args


def package_set(args: list[str]) -> tuple[str, str]:
    """(constraints file, requirement) of an install, ignoring flags such as --quiet."""
    constraints = args[args.index("-c") + 1]
    editable = args[args.index("-e") + 1]
    return constraints, editable


def makefile_install() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    line = next(ln for ln in text.splitlines() if "pip install" in ln and "-e" in ln)
    return pip_install_args(line.replace("$(PY)", "python"))


def test_dockerfile_parses_with_a_cuda_pytorch_base_and_a_non_root_user():
    parser = DockerfileParser(path=str(ROOT / "docker/Dockerfile"))
    instructions = [i["instruction"] for i in parser.structure if i["instruction"] != "COMMENT"]
    assert instructions[0] in ("ARG", "FROM") and "FROM" in instructions
    base = parser.baseimage  # the FROM line with build ARG defaults substituted
    assert re.search(r"pytorch.*cuda", base), base
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "CMD" in instructions or "ENTRYPOINT" in instructions


def test_dockerfile_installs_the_same_package_set_as_make_setup():
    parser = DockerfileParser(path=str(ROOT / "docker/Dockerfile"))
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN" and "pip install" in i["value"]]
    installs = [pip_install_args(r) for r in runs if "-e" in pip_install_args(r)]
    assert len(installs) == 1, runs
    assert package_set(installs[0]) == package_set(makefile_install()) == ("constraints.txt", ".[dev]")
    copied = " ".join(i["value"] for i in parser.structure if i["instruction"] == "COPY")
    packages = ("pretrain", "data_tools", "webshards")
    for needed in ("pyproject.toml", "constraints.txt", *packages, "configs", "launch"):
        assert needed in copied, f"{needed} is not copied into the image"
