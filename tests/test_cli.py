import subprocess
import sys

import xenlike


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenlike", *args], capture_output=True, text=True, timeout=60
    )


def test_version_matches_package() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"xenlike, version {xenlike.__version__}"


def test_help_has_an_example() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "Example:" in result.stdout
