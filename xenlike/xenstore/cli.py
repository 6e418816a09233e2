"""`xenlike xenstore ...`: the xenstore-* tools, against the running topology."""

import sys
from pathlib import Path
from typing import Any

import click
import trio

from xenlike.tools.session import NotRunning, find_run_dir
from xenlike.xenstore.client import open_client
from xenlike.xenstore.wire import XenStoreError

__all__ = ["xenstore"]

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _socket(run_dir: Path | None) -> str:
    try:
        return str(find_run_dir(run_dir).xenstored_socket)
    except NotRunning as exc:
        click.echo(f"xenlike: {exc}", err=True)
        sys.exit(1)


def _run(run_dir: Path | None, body: Any) -> Any:
    async def go() -> Any:
        async with open_client(_socket(run_dir)) as xs:
            return await body(xs)

    try:
        return trio.run(go)
    except XenStoreError as exc:
        click.echo(f"xenlike xenstore: {exc}", err=True)
        sys.exit(1)


run_dir_option = click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The topology's run directory (default: the running one).",
)


@click.group(context_settings=CONTEXT)
def xenstore() -> None:
    """Read and change XenStore, as the xenstore-* tools do.

    \b
    Example:
        xenlike xenstore ls /local/domain/1
        xenlike xenstore read /local/domain/1/name
    """


def _escape(value: bytes) -> str:
    """Non-printable bytes as \\ooo octal, as xenstore-ls prints them."""
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\{b:03o}" for b in value)


@xenstore.command(context_settings=CONTEXT)
@click.argument("path", default="/")
@run_dir_option
def ls(path: str, run_dir: Path | None) -> None:
    """Print the tree under PATH with values (xenstore-ls).

    \b
    Example:
        xenlike xenstore ls /local/domain/0
    """

    async def walk(xs: Any) -> list[str]:
        lines: list[str] = []

        async def visit(node: str, depth: int) -> None:
            for child in await xs.ls(node):
                full = f"{node.rstrip('/')}/{child}"
                try:
                    value = _escape(await xs.read(full))
                except XenStoreError:
                    value = ""
                lines.append(f'{" " * depth}{child} = "{value}"')
                await visit(full, depth + 1)

        await visit(path, 0)
        return lines

    for line in _run(run_dir, walk):
        click.echo(line)


@xenstore.command(context_settings=CONTEXT)
@click.argument("path")
@run_dir_option
def read(path: str, run_dir: Path | None) -> None:
    """Print the value at PATH (xenstore-read).

    \b
    Example:
        xenlike xenstore read /local/domain/1/name
    """
    click.echo(_escape(_run(run_dir, lambda xs: xs.read(path))))


@xenstore.command(context_settings=CONTEXT)
@click.argument("path")
@click.argument("value")
@run_dir_option
def write(path: str, value: str, run_dir: Path | None) -> None:
    """Set PATH to VALUE (xenstore-write).

    \b
    Example:
        xenlike xenstore write /local/domain/1/data/note hello
    """
    _run(run_dir, lambda xs: xs.write(path, value.encode()))


@xenstore.command(context_settings=CONTEXT)
@click.argument("path")
@run_dir_option
def rm(path: str, run_dir: Path | None) -> None:
    """Remove PATH and everything below it (xenstore-rm).

    \b
    Example:
        xenlike xenstore rm /local/domain/1/data/note
    """
    _run(run_dir, lambda xs: xs.rm(path))


@xenstore.command(context_settings=CONTEXT)
@click.argument("path")
@click.argument("perms", nargs=-1, required=True)
@run_dir_option
def chmod(path: str, perms: tuple[str, ...], run_dir: Path | None) -> None:
    """Set PATH's permissions: owner first, then ACL entries like r1 or b2 (xenstore-chmod).

    \b
    Example:
        xenlike xenstore chmod /local/domain/1/data n1 r2
    """
    _run(run_dir, lambda xs: xs.set_perms(path, list(perms)))


@xenstore.command(context_settings=CONTEXT)
@click.argument("path")
@click.option("-n", "count", type=int, default=None, help="Exit after N events.")
@run_dir_option
def watch(path: str, count: int | None, run_dir: Path | None) -> None:
    """Print the path of each change under PATH (xenstore-watch).

    \b
    Example:
        xenlike xenstore watch /local/domain/1/device -n 5
    """

    async def follow(xs: Any) -> None:
        seen = 0
        async with xs.watch(path) as events:
            async for event in events:
                click.echo(event.path)
                seen += 1
                if count is not None and seen >= count:
                    return

    try:
        _run(run_dir, follow)
    except KeyboardInterrupt:
        pass
