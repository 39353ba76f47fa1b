"""The suite's own machinery: `make test` and `make check` run the tests side by side with
pytest-xdist (`--dist loadgroup`), and a file whose tests share a workspace or a module fixture
carries an `xdist_group` mark, which must keep those tests on one worker, in file order. The
installed pytest and pytest-xdist must agree on how a test is named for that (pytest 9.2 and
xdist 3.8 do not: there, each test of a group goes to any worker and builds the fixture again)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: A group of three tests sharing a module fixture, and enough other tests to keep two workers busy.
GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("shared")

@pytest.fixture(scope="module")
def built():
    with open("builds.txt", "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

def test_first(built):
    with open("order.txt", "a") as f:
        f.write("first\\n")

def test_second(built):
    with open("order.txt", "a") as f:
        f.write("second\\n")

def test_third(built):
    with open("order.txt", "a") as f:
        f.write("third\\n")
"""
OTHERS = """
import time
import pytest

@pytest.mark.parametrize("i", range(20))
def test_other(i):
    time.sleep(0.05)
"""


def test_a_groups_tests_run_on_one_worker_in_file_order_building_its_fixture_once(tmp_path: Path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_others.py").write_text(OTHERS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir: not the project's conftest
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "23 passed" in done.stdout
    assert len((tmp_path / "builds.txt").read_text().split()) == 1, "the module fixture was built once"
    assert (tmp_path / "order.txt").read_text().split() == ["first", "second", "third"]
