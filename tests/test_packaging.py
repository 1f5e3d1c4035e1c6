"""The package as installed: configs inside it, console commands, and imports that point one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from imsm import CONF_DIR

LIBRARY = REPO / "imsm"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names; ``from . import x`` resolved against the package)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def modules_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "conf" not in p.parts)


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [("model", "imsm.data"), ("data", "imsm.model")],
)
def test_layers_do_not_import_each_other(layer, forbidden):
    bad = {
        str(p.relative_to(REPO)): sorted(
            n for n in imports_of(p) if n == forbidden or n.startswith(f"{forbidden}.")
        )
        for p in modules_under(LIBRARY / layer)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_the_library_does_not_import_the_bench_script():
    users = [str(p.relative_to(REPO)) for p in modules_under(LIBRARY) if p.name != "bench.py"]
    users = [
        u
        for u in users
        if any(n == "imsm.bench" or n.startswith("imsm.bench.") for n in imports_of(REPO / u))
    ]
    assert users == []


def test_every_config_file_ships_in_the_wheel_with_the_console_commands(tmp_path):
    """``pip install .`` (not editable) must carry imsm/conf: Hydra finds its configs inside the package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            REPO,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("imsm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    configs = {f"imsm/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)[:5]
    for command in ("imsm-train", "imsm-evaluate", "imsm-report", "imsm-bench"):
        assert f"{command} = imsm." in entry_points
