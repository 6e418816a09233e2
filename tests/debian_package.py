"""Debian packages unpacked into a cache, never installed: Xen's real tools
(xenstored, verify-stream-v2, xenalyze) without the hypervisor their
packages' dependencies pull in. `apt-get download` and `dpkg -x`, once.

A package this release no longer ships (Python 2, which Debian's
xentrace_format still needs) comes from an older release's archive: apt reads
that release's index into a private state directory in the cache, so the
machine's own sources and lists are never touched."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CACHE", "Unavailable", "unpacked"]

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xenlike"
ARCHIVE = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class Unavailable(Exception):
    """A tool cannot be had on this machine; the message says why."""


def unpacked(
    package: str, hint: str = "", *, also: tuple[str, ...] = (), suite: str | None = None
) -> Path:
    """Where `package` (and the packages `also` names, in the same tree) is unpacked,
    fetched on first use from the machine's sources or, with `suite`, from that Debian
    release's archive; `hint` is added to the reason when the machine cannot fetch it."""
    root = CACHE / (f"{package}-{suite}" if suite else package)
    if root.exists():
        return root
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise Unavailable(f"no {tool}: cannot fetch {package}{hint}")
    options = _release_options(suite) if suite else []
    with tempfile.TemporaryDirectory(prefix=f"{package}-") as tmp:
        debs = []
        for name in (package, *also):
            download = subprocess.run(
                ["apt-get", *options, "download", name],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            found = list(Path(tmp).glob(f"{name}_*.deb"))
            if not found:
                reason = download.stderr.strip().splitlines()[-1:]
                raise Unavailable(f"apt-get download {name} failed: {reason}{hint}")
            debs += found
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=CACHE))
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(partial)], check=True)
        try:
            partial.rename(root)  # atomic: a concurrent fetch either wins or finds it
        except OSError:
            shutil.rmtree(partial)
    return root


def _release_options(suite: str) -> list[str]:
    """apt-get options that see only `suite`'s main archive, its index read once into
    the cache (by a private `apt-get update`)."""
    state = CACHE / f"apt-{suite}"
    sources = state / "sources.list"
    options = [
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "Debug::NoLocking=1",
    ]  # fmt: skip
    if not (state / "lists" / "ready").exists():
        (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        sources.write_text(f"deb [signed-by={KEYRING}] {ARCHIVE} {suite} main\n")
        update = subprocess.run(
            ["apt-get", *options, "update"], capture_output=True, text=True, check=False
        )
        if update.returncode != 0:
            reason = update.stderr.strip().splitlines()[-1:]
            raise Unavailable(f"cannot read Debian {suite}'s archive index: {reason}")
        (state / "lists" / "ready").touch()
    return options
