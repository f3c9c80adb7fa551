"""The package as users get it: installed, with its CLI, wheel and sdist."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import engine
from helpers import CHILD_CWD

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package():
    if not os.environ.get("HEADRACE_TEST_INSTALLED"):
        pytest.skip("only meaningful under .ci/run")
    assert ROOT not in pathlib.Path(engine.__file__).resolve().parents


def test_cli_prints_version():
    exe = shutil.which("headrace")
    cmds = [[sys.executable, "-m", "engine"]] + ([[exe]] if exe else [])
    for cmd in cmds:
        r = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60, cwd=CHILD_CWD)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"headrace {engine.__version__}"
        # Bare, it names itself and lists the commands, the main job first.
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=CHILD_CWD)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == f"headrace {engine.__version__}"
        for sub in ("demo", "worker", "stats", "inspect", "verify"):
            assert sub in r.stdout


def _source_copy(dst: pathlib.Path) -> pathlib.Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in files.stdout.split():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    return dst


def test_sdist_contains_the_c_sources(tmp_path):
    src = _source_copy(tmp_path / "src")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (sdist,) = (tmp_path / "dist").glob("headrace-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for c in (src / "csrc").glob("*.[ch]"):
        assert f"csrc/{c.name}" in names
    assert "csrc/build_ffi.py" in names and "setup.py" in names and "pyproject.toml" in names
    assert any(n.startswith("csrc/cdef/") for n in names)


def test_pip_wheel_builds_a_working_wheel(tmp_path):
    src = _source_copy(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wh"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp_path / "wh").glob("headrace-*.whl")
    z = zipfile.ZipFile(whl)
    assert any(n.startswith("engine/_core") and n.endswith(".so") for n in z.namelist())
    assert not any(n.startswith(("csrc/", "tests/")) for n in z.namelist())
    z.extractall(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    code = ("import engine, os; from engine.shm import Segment; n='whl-%d' % os.getpid(); "
            "s = Segment.create(n, 8); s.push(1); assert s.pop(1).id == 1; s.verify(); "
            "s.close(); Segment.unlink(n); print(engine.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "site") in r.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc").glob("*.c")))
def test_c_sources_compile_without_warnings(tmp_path, source):
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-c", str(ROOT / "csrc" / source),
                        "-o", str(tmp_path / "x.o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
