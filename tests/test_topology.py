"""Topology files: xl's disk and vif specs, and mistakes reported with their lines."""

from pathlib import Path

import pytest

from xenlike.topology import (
    TopologyError,
    default_topology,
    load_topology,
    parse_disk_spec,
    parse_size,
    parse_topology,
    parse_vif_spec,
    vdev_number,
)

GOOD = """\
[host]
name = "demo"

[dom0]
memory = 128
images = { "web.img" = "64M", "db.img" = "1G" }

[[domain]]
name = "web"
memory = 32
init = "myapp.guest:main"
disk = ["format=raw, vdev=xvda, access=rw, target=web.img"]
vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0, ip=10.0.0.2/24"]

[[domain]]
name = "db"
memory = 64
on_crash = "preserve"
disk = ["db.img,raw,xvdb,ro"]
vif = ["bridge=xenbr0"]
"""


def test_a_good_topology_parses() -> None:
    topo = parse_topology(GOOD)
    assert topo.name == "demo"
    assert topo.dom0.images == {"web.img": 64 << 20, "db.img": 1 << 30}
    web, db = topo.domains
    assert web.disks[0].devid == 51712 and web.disks[0].target == "web.img"
    assert web.vifs[0].ip == "10.0.0.2/24" and web.vifs[0].mac == "00:16:3e:00:00:01"
    assert db.disks[0].readonly and db.disks[0].vdev == "xvdb" and db.disks[0].devid == 51728
    assert db.vifs[0].mac.startswith("00:16:3e:") and db.on_crash == "preserve"
    assert web.kernel == "domains.guest:main" and web.init == "myapp.guest:main"


@pytest.mark.parametrize(
    ("vdev", "number"),
    [
        ("xvda", 51712),
        ("xvdb", 51728),
        ("xvda1", 51713),
        ("xvdp", 51952),
        ("xvdq", 268439552),
        ("xvdaa", 268442112),
        ("hda", 768),
        ("hdc", 5632),
        ("sda", 2048),
        ("sdb3", 2067),
    ],
)
def test_vdev_numbers_follow_vbd_interface_txt(vdev: str, number: int) -> None:
    assert vdev_number(vdev) == number


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("format=qcow2, vdev=xvda, target=a.img", "only format=raw"),
        ("vdev=xvda, access=x, target=a.img", "access=x"),
        ("format=raw, target=a.img, vdev=xvda", "target= must come last"),
        ("format=raw, vdev=xvda", "needs target"),
        ("colour=red, vdev=xvda, target=a.img", "unknown disk key 'colour'"),
        ("format=raw, vdev=floppy, target=a.img", "vdev 'floppy'"),
        ("vdev=xvda, script=block, target=a.img", "script=block: not supported: no hotplug"),
        ("vdev=xvda, backendtype=qdisk, target=a.img", "backendtype=qdisk: not supported"),
        ("vdev=xvda, trusted, target=a.img", "trusted: not supported"),
        ("vdev=xvda, direct-io-safe, target=a.img", "direct-io-safe: not supported"),
    ],
)
def test_bad_disk_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_disk_spec(spec)


def test_positional_disk_spec_and_cdrom() -> None:
    disk = parse_disk_spec("/srv/x.iso,,hdc,cdrom")
    assert (disk.target, disk.vdev, disk.devtype, disk.access) == (
        "/srv/x.iso",
        "hdc",
        "cdrom",
        "ro",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mac=01:16:3e:00:00:01", "multicast"),
        ("mac=00:16:3e:00:00", "six hex bytes"),
        ("ip=10.0.0.300", "IPv4"),
        ("speed=fast", "unknown vif setting"),
        ("type=ioemu", "only PV vifs"),
        ("rate=10Mb/s", "rate=10Mb/s: not supported: no bandwidth limit"),
        ("model=e1000", "model=e1000: not supported: emulated NIC models"),
        ("script=vif-bridge", "script=vif-bridge: not supported: no hotplug scripts"),
        ("gatewaydev=eth0", "gatewaydev=eth0: not supported"),
        ("mtu=9001", "mtu=9001: a number of bytes from 68 to 9000"),
        ("mtu=big", "mtu=big"),
    ],
)
def test_bad_vif_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_vif_spec(spec, default_mac="00:16:3e:00:00:09")


def test_vif_mtu_is_kept_for_both_ends() -> None:
    assert parse_vif_spec("mtu=9000", default_mac="00:16:3e:00:00:09").mtu == 9000
    assert parse_vif_spec("bridge=xenbr0", default_mac="00:16:3e:00:00:09").mtu is None


def test_a_refused_key_names_the_file_line_domain_and_key() -> None:
    text = GOOD.replace('name = "db"', 'name = "db"\ntype = "hvm"')
    text = text.replace('ip=10.0.0.2/24"', 'ip=10.0.0.2/24, rate=1Mb/s"')
    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "demo.toml")
    lines = text.splitlines()
    found = {str(problem) for problem in caught.value.problems}
    rate = next(i for i, line in enumerate(lines, 1) if "rate=1Mb/s" in line)
    kind = next(i for i, line in enumerate(lines, 1) if line == 'type = "hvm"')
    assert any(f"demo.toml:{rate}: domain 'web': vif " in p and "rate=1Mb/s" in p for p in found)
    assert f"demo.toml:{kind}: domain 'db': type = 'hvm': every domain here is PV" in "".join(found)


def test_sizes() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("2g") == 2 << 30 and parse_size(512) == 512
    with pytest.raises(ValueError):
        parse_size("lots")


def test_every_mistake_is_reported_with_its_line() -> None:
    text = (
        GOOD.replace("memory = 64", 'memory = "lots"')
        .replace('on_crash = "preserve"', 'on_crash = "explode"\ncolour = "blue"')
        .replace('name = "db"', 'name = "web"')
    )
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "demo.toml")
    report = str(info.value)
    lines = text.splitlines()
    problems = {p.message.split(":")[0].split(" =")[0]: p for p in info.value.problems}
    assert "memory" in problems and lines[problems["memory"].line - 1].startswith("memory")
    assert lines[problems["on_crash"].line - 1].startswith("on_crash")
    assert "unknown key 'colour'" in report
    assert "used twice" in report
    assert all(p.path == "demo.toml" for p in info.value.problems)


def test_disk_must_name_an_image_dom0_owns() -> None:
    text = GOOD.replace("target=web.img", "target=nope.img")
    with pytest.raises(TopologyError, match="'nope.img' is not one of Dom0's images"):
        parse_topology(text)


def test_broken_toml_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"demo.toml:3: not valid TOML"):
        parse_topology("[host]\nname = 'x'\nmemory = = 3\n", "demo.toml")
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")


def test_unknown_sections_and_dom0_keys() -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology("[hosts]\n[dom0]\nnic = 'wifi'\n")
    report = str(info.value)
    assert "unknown section [hosts]" in report and "nic = 'wifi'" in report


def test_embedded_default_topology() -> None:
    topo = default_topology()
    assert topo.name == "default"
    assert [d.name for d in topo.domains] == ["alpha", "beta"]


def test_an_xl_cfg_style_domain_file() -> None:
    from xenlike.topology import parse_domain_file

    config = parse_domain_file("name = 'extra'\nmemory = 16\nvif = [ 'bridge=xenbr0' ]\n")
    assert (config.name, config.memory, len(config.vifs)) == ("extra", 16, 1)
    with pytest.raises(TopologyError) as info:
        parse_domain_file("name = 'x'\nmemory = 16\nvcpus = 4\n", "x.cfg")
    assert str(info.value).startswith("x.cfg:3: vcpus = 4")


ONE = '[[domain]]\nname = "a"\nmemory = 16\n'


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[dom0]\nimages = "a.img"\n', 2, "images = 'a.img': a table of file name = size"),
        ("dom0 = 5\n", 1, "dom0 = 5: [dom0] is a table of keys"),
        ('host = "x"\n', 1, "host = 'x': [host] is a table of keys"),
        ('[dom0]\nimages = { "/etc/passwd" = "1M" }\n', 2, "an absolute path"),
        ('[dom0]\nimages = { "../x.img" = "1M" }\n', 2, "'..', '.' and empty parts"),
        ('[dom0]\nimages = { "a.img" = 1000 }\n', 2, "not a whole number of 512-byte sectors"),
        ('[dom0]\nimages = { "a.img" = "99999999T" }\n', 2, "more than the 4 TiB"),
        ('[dom0]\nimages = { "a.img" = "0" }\n', 2, "0 bytes is not a whole number"),
        ('[dom0]\nnic = "pcap:/tmp/x.pcap"\n', 2, "an absolute path"),
        ('[dom0]\nnic = "pcap:../x.pcap"\n', 2, "'..'"),
        ('[dom0]\nnic = "tap:much-too-long-a-name"\n', 2, "an interface name of 1 to 15"),
        (
            ONE
            + 'vif = ["mac=00:16:3e:00:00:01"]\n'
            + ONE.replace('"a"', '"b"')
            + 'vif = ["mac=00:16:3e:00:00:01"]\n',
            8,
            "mac=00:16:3e:00:00:01 is used twice (a and b)",
        ),
        (
            '[dom0]\nimages = { "s.img" = "1M" }\n'
            + ONE
            + 'disk = ["vdev=xvda, target=s.img"]\n'
            + ONE.replace('"a"', '"b"')
            + 'disk = ["vdev=xvda, access=ro, target=s.img"]\n',
            10,
            "image 's.img' is attached to a, b, and read-write",
        ),
        (
            ONE
            + 'devices = [{ type = "k", driver = "p.one:D" }, { type = "k", driver = "p.two:D", '
            "devid = 1 }]\n",
            4,
            "type 'k' has two drivers, 'p.one:D' and 'p.two:D'",
        ),
        (ONE + 'devices = [{ type = "k", devid = "x" }]\n', 4, "devid = 'x': a number"),
        (
            ONE + 'devices = [{ type = "k" }, { type = "k", devid = 0 }]\n',
            4,
            "k devid 0 is used twice",
        ),
        (
            ONE + 'devices = [{ type = "vbd", params = "/etc/shadow" }]\n',
            4,
            "type = 'vbd' is built in",
        ),
        (
            ONE + 'devices = [{ type = "k", params = "/etc/shadow" }]\n',
            4,
            "params = '/etc/shadow' is not one of Dom0's images",
        ),
        (
            ONE + 'devices = [{ type = "k", frontend = "/local/domain/0" }]\n',
            4,
            "'frontend': the toolstack writes that key itself",
        ),
        (
            ONE + 'disk = ["vdev=xvda, backend=3, target=a.img"]\n',
            4,
            "only Dom0 (0) runs back ends",
        ),
        ("[dom0]\nmemory = 4096\n" + (ONE.replace("16", "4096")) * 2000, 2, "this host has"),
    ],
)
def test_mistakes_that_once_crashed_or_slipped_through_are_line_errors(
    text: str, line: int, message: str
) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "t.toml")
    found = [p for p in info.value.problems if message in p.message]
    assert found, info.value
    if "this host has" not in message:
        assert found[0].line == line, found[0]


def test_create_cannot_name_host_files_either() -> None:
    from xenlike.topology import parse_domain_file

    with pytest.raises(TopologyError, match="not one of Dom0's images"):
        parse_domain_file(
            'name = "x"\nmemory = 16\ndevices = [{ type = "k", params = "/etc/shadow" }]\n',
            images={"a.img": 1 << 20},
        )
    with pytest.raises(TopologyError, match="not one of Dom0's images"):
        parse_domain_file(
            'name = "x"\nmemory = 16\ndisk = ["vdev=xvda, target=/etc/shadow"]\n',
            images={"a.img": 1 << 20},
        )


def test_the_host_pool_and_maxmem_are_read() -> None:
    topo = parse_topology(GOOD.replace('name = "demo"', 'name = "demo"\nmemory = 512'))
    assert topo.memory == 512
    assert parse_topology(GOOD).memory == 1024  # the documented default
    assert default_topology().memory == 1024
    web, db = parse_topology(GOOD.replace("memory = 32", "memory = 32\nmaxmem = 96")).domains
    assert (web.memory, web.maxmem, web.max_memory) == (32, 96, 96)
    assert (db.maxmem, db.max_memory) == (None, 64)


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("memory = 32", "memory = 32\nmaxmem = 16"), 11, "maxmem = 16: MiB as a whole number"),
        (("memory = 32", 'memory = 32\nmaxmem = "64M"'), 11, "from memory (32) to 4096"),
        (('name = "demo"', 'name = "demo"\nmemory = 200'), 3, "boot with 224 MiB; the host's"),
        (('name = "demo"', 'name = "demo"\nmemory = 8'), 3, "memory = 8: MiB as a whole number"),
    ],
)
def test_pool_and_maxmem_mistakes_are_line_errors(
    change: tuple[str, str], line: int, message: str
) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(GOOD.replace(*change))
    found = [p for p in info.value.problems if message in p.message]
    assert found and found[0].line == line, info.value
