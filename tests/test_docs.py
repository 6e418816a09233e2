"""The docs are run: generated pages are current, and every console session replays."""

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import xentrace_tools

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def sessions(page: Path) -> list[list[tuple[str, str]]]:
    """Each console block of a page as (command, expected output) pairs."""
    found = []
    for block in BLOCK.findall(page.read_text()):
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        found.append([(command, "\n".join(lines)) for command, lines in steps])
    return found


def matches(expected: str, actual: str) -> bool:
    """`...` stands for any text within a line, or any lines when alone on its line."""
    pattern = []
    for line in expected.splitlines():
        if line == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            pattern.append(".*".join(re.escape(part) for part in line.split("...")) + r"\n")
    return (
        re.fullmatch(
            "".join(pattern), actual if actual.endswith("\n") or not actual else actual + "\n", re.S
        )
        is not None
    )


def test_generated_pages_are_current() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run(
        [sys.executable, "-m", "xenlike._docs", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr


PAGES = [page for page in sorted(DOCS.glob("*.md")) if sessions(page)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_console_sessions_replay(page: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "XENLIKE_RUN_DIR": str(tmp_path / "run"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    if any(
        command.split()[0] in ("xenalyze", "xentrace_format")
        for session in sessions(page)
        for command, _ in session
    ):  # Xen's trace readers, from the cache tests/xentrace_tools.py fills
        try:
            env["PATH"] = f"{xentrace_tools.bin_dir()}:{env['PATH']}"
        except xentrace_tools.Unavailable as exc:
            pytest.skip(f"{page.name} runs Xen's trace readers: {exc}")
    with _machine_wide(page):
        _replay(page, env)


@contextlib.contextmanager
def _machine_wide(page: Path) -> Iterator[None]:
    """A page whose sessions use fixed paths under /tmp (as a reader's would) holds a
    machine-wide lock while it runs: two suites on one machine wait, not collide."""
    if "/tmp/" not in page.read_text():
        yield
        return
    with open("/tmp/xenlike-docs.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _replay(page: Path, env: dict[str, str]) -> None:
    try:
        for session in sessions(page):
            for command, expected in session:
                # Guests print as they go: a command whose output is not there yet
                # is run again, for a while, as a reader would look again.
                deadline = time.monotonic() + 30
                while True:
                    result = subprocess.run(
                        ["bash", "-c", command],
                        capture_output=True,
                        text=True,
                        env=env,
                        cwd=ROOT,
                        timeout=120,
                    )
                    assert result.returncode == 0, f"$ {command}\n{result.stdout}{result.stderr}"
                    if matches(expected, result.stdout) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                assert matches(expected, result.stdout), (
                    f"$ {command}\nexpected:\n{expected}\nactual:\n{result.stdout}"
                )
    finally:
        subprocess.run(
            ["bash", "-c", "xenlike down --grace 2"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )


def test_the_matcher_can_fail() -> None:
    assert matches("a\n...\nc", "a\nb\nb\nc\n")
    assert matches("x ... z", "x y z\n")
    assert not matches("a\nc", "a\nb\nc\n")
    assert not matches("x ... z", "x y\n")


FILE_BLOCK = re.compile(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", re.S)


@pytest.mark.parametrize("name,blocks", [("writing-a-driver.md", 6), ("guest-programs.md", 2)])
def test_pages_show_the_example_code_as_it_is(name: str, blocks: int) -> None:
    shown_files = FILE_BLOCK.findall((DOCS / name).read_text())
    assert len(shown_files) >= blocks
    for file, shown in shown_files:
        assert shown == (DOCS / "examples" / file).read_text(), f"{file} differs from {name}"


def test_the_tutorial_driver_stays_short() -> None:
    lines = sum(
        len((DOCS / "examples" / "kvdev" / f).read_text().splitlines())
        for f in ("protocol.py", "back.py", "front.py", "__init__.py")
    )
    assert lines < 150


RUNNABLE = re.compile(r"```python\n(?!# file:)(.*?)```", re.S)
EXAMPLE_PAGES = [p for p in sorted(DOCS.glob("*.md")) if RUNNABLE.search(p.read_text())]


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=[p.name for p in EXAMPLE_PAGES])
def test_python_examples_run(page: Path) -> None:
    """A page's python blocks run in order, in one namespace, their asserts checked."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for block in RUNNABLE.findall(page.read_text()):
        exec(compile(block, str(page), "exec"), namespace)
