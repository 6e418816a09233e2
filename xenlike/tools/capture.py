"""`xenlike capture BRIDGE -w FILE`: a pcap of what crosses one of Dom0's bridges.

Dom0 streams each bridge's traffic as pcap on a Unix socket in the run
directory (`xenlike.tools.pcap.capture_socket`); this command connects to it and
writes whole records to FILE (tshark, Wireshark and tcpdump read it) until
Ctrl-C, `--count` frames or `--duration` seconds. The file is flushed after
every batch, so `tshark -r FILE` works while the capture runs.
"""

import sys
from pathlib import Path
from typing import BinaryIO

import click
import trio

from xenlike.rundir import RunDir
from xenlike.tools.pcap import PcapReader, capture_socket
from xenlike.tools.session import NotRunning, find_run_dir

__all__ = ["NoSuchBridge", "Progress", "capture", "capture_bridge"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class NoSuchBridge(LookupError):
    """The run directory has no capture socket for that bridge."""


class Progress:
    """Frames written so far (still right when Ctrl-C ends the capture)."""

    frames = 0


async def capture_bridge(
    run_dir: RunDir,
    bridge: str,
    sink: BinaryIO,
    *,
    count: int | None = None,
    duration: float | None = None,
    progress: Progress | None = None,
) -> int:
    """Copy the bridge's pcap stream to `sink` (whole records only); returns the frames written."""
    path = capture_socket(run_dir.path, bridge)
    if not path.exists():
        bridges = sorted(p.name.removesuffix(".pcap.sock") for p in path.parent.glob("*.pcap.sock"))
        raise NoSuchBridge(
            f"no bridge {bridge!r} in {run_dir.path} (bridges: "
            f"{', '.join(bridges) or 'none: is the topology up?'})"
        )
    reader = PcapReader()
    progress = progress or Progress()
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        with trio.move_on_after(duration if duration is not None else float("inf")):
            while count is None or progress.frames < count:
                data = await stream.receive_some(65536)
                if not data:
                    break
                header_seen = reader.header is not None
                records = reader.feed(data)
                if not header_seen and reader.header is not None:
                    sink.write(reader.header)
                if count is not None:
                    records = records[: count - progress.frames]
                sink.write(b"".join(records))
                sink.flush()
                progress.frames += len(records)
    return progress.frames


@click.command(context_settings=CONTEXT)
@click.argument("bridge", default="xenbr0")
@click.option(
    "-w",
    "--write",
    "output",
    required=True,
    type=click.Path(path_type=Path, allow_dash=True, dir_okay=False),
    help="The pcap file to write (- for stdout).",
)
@click.option("-c", "--count", type=click.IntRange(min=1), help="Stop after COUNT frames.")
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after SECONDS seconds.")
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The topology's run directory (default: the running one; $XENLIKE_RUN_DIR).",
)
def capture(
    bridge: str, output: Path, count: int | None, duration: float | None, run_dir: Path | None
) -> None:
    """Record the frames crossing a Dom0 bridge (xenbr0) to a pcap file.

    Frames are recorded from the moment the command connects, until Ctrl-C,
    --count or --duration.

    \b
    Example:
        xenlike capture xenbr0 -w guests.pcap --count 100
        tshark -r guests.pcap
    """
    try:
        rd = find_run_dir(run_dir)
    except NotRunning as exc:
        click.echo(f"xenlike: {exc}", err=True)
        sys.exit(1)
    sink = sys.stdout.buffer if str(output) == "-" else open(output, "wb")  # noqa: SIM115
    progress = Progress()
    try:
        trio.run(
            lambda: capture_bridge(
                rd, bridge, sink, count=count, duration=duration, progress=progress
            )
        )
    except NoSuchBridge as exc:
        click.echo(f"xenlike: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        if sink is not sys.stdout.buffer:
            sink.close()
    click.echo(f"capture: {progress.frames} frame(s) from {bridge}", err=True)
