"""Grant maps: 32 pages in one batched hypercall against 32 single-page calls.

    python bench/grant.py [--quick]

A hypervisor runs in this process with two guests: one grants 32 pages to
the other, which then maps and unmaps them through `domain.grants` (the
library a driver uses, mmap of the granted frames included), either as one
GNTTABOP_map_grant_ref of 32 refs plus one GNTTABOP_unmap_grant_ref, or as
32 maps of one ref followed by 32 unmaps of one handle. Rounds interleave
(batched, single, batched, ...) and the figures are medians of rounds.

Then, per page mapped and unmapped, the mapping guest's CPU time and
voluntary context switches for each kind (see bench/_cost.py).
The last line is `ratio batched_vs_single: VALUE`: how many times faster
the batched map and unmap of 32 pages is than the single calls.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cost import Costs, Usage, own_usage  # noqa: E402
from xenlike.domain import Domain  # noqa: E402
from xenlike.hypervisor import Hypervisor  # noqa: E402

PAGES = 32


def _params(domain: Domain) -> dict[str, str]:
    return dict(word.split("=", 1) for word in domain.cmdline.split())


async def granter(domain: Domain) -> None:
    """Grants PAGES consecutive pages to `peer`, says which refs, and waits."""
    peer = int(_params(domain)["peer"])
    first_gfn = domain.allocator.allocate_run(PAGES)
    refs = [domain.grants.grant_access(peer, gfn) for gfn in range(first_gfn, first_gfn + PAGES)]
    await domain.console_write(f"granted refs={','.join(map(str, refs))}")
    await trio.sleep_forever()


async def mapper(domain: Domain) -> None:
    """Times `iterations` map+unmap cycles of both kinds per round; logs each round."""
    p = _params(domain)
    peer = int(p["peer"])
    refs = [int(ref) for ref in p["refs"].split(",")]
    grants = domain.grants

    async def batched() -> None:
        await grants.unmap(await grants.map(peer, refs))

    async def single() -> None:
        mappings = [await grants.map(peer, [ref]) for ref in refs]
        for mapping in mappings:
            await grants.unmap(mapping)

    iterations = int(p["iterations"])
    await batched()  # the first map brings the granter's memory fd: not part of the figures
    for number in range(int(p["rounds"])):
        words = [f"round {number}"]
        for name, cycle in (("batched", batched), ("single", single)):
            before = own_usage()
            start = time.perf_counter()
            for _ in range(iterations):
                await cycle()
            per_cycle = (time.perf_counter() - start) / iterations * 1e6
            used = own_usage() - before
            words += [
                f"{name}_us={per_cycle:.1f}",
                f"{name}_cpu={used.cpu:.6f}",
                f"{name}_vcsw={used.vcsw}",
            ]
        await domain.console_write(" ".join(words))
    await domain.console_write("bench done")


async def wait_for(hv: Hypervisor, text: str, timeout: float = 120) -> str:
    with trio.fail_after(timeout):
        while True:
            for line in hv.log_lines:
                if text in line:
                    return line
            await trio.sleep(0.05)


async def measure(rounds: int, iterations: int) -> list[dict[str, float]]:
    # The guests import this file as `bench.grant`.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    with tempfile.TemporaryDirectory() as tmp:
        hv = Hypervisor(Path(tmp) / "run")
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            granting, mapping = hv.create_domain(), hv.create_domain()
            for domain in (granting, mapping):
                domain.max_pages = 1024
            hv.build_domain(granting, "bench.grant:granter", cmdline=f"peer={mapping.domid}")
            hv.unpause(granting)
            line = await wait_for(hv, f"(d{granting.domid}) granted refs=")
            refs = line.split("granted refs=", 1)[1]
            hv.build_domain(
                mapping,
                "bench.grant:mapper",
                cmdline=f"peer={granting.domid} refs={refs} rounds={rounds} "
                f"iterations={iterations}",
            )
            hv.unpause(mapping)
            await wait_for(hv, f"(d{mapping.domid}) bench done")
            results = []
            for line in hv.log_lines:
                if f"(d{mapping.domid}) round " in line:
                    fields = dict(word.split("=") for word in line.split() if "=" in word)
                    results.append({k: float(v) for k, v in fields.items()})
            nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    iterations = 5 if args.quick else 50
    results = trio.run(measure, rounds, iterations)
    batched = statistics.median(r["batched_us"] for r in results)
    single = statistics.median(r["single_us"] for r in results)
    costs = Costs()
    for r in results:
        for name in ("batched", "single"):
            costs.add(
                "mapper", name, Usage(r[f"{name}_cpu"], int(r[f"{name}_vcsw"])), iterations * PAGES
            )
    print(f"rounds: {rounds} (medians), {iterations} map+unmap cycles of {PAGES} pages each")
    print(f"batched map+unmap of {PAGES} pages (2 hypercalls): {batched:.0f} us")
    print(f"single map+unmap of {PAGES} pages ({2 * PAGES} hypercalls): {single:.0f} us")
    print(f"batched per page: {batched / PAGES:.1f} us")
    print(f"single per page: {single / PAGES:.1f} us")
    print("\n".join(costs.lines()))
    print(f"ratio batched_vs_single: {single / batched:.3f}")


if __name__ == "__main__":
    main()
