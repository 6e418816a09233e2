"""The user's tools: the `xenlike` command line (xl's commands), `top`,
packet capture and the pcap format, and the session that finds a running
topology from outside it. Nothing under `xenlike/` imports from here but
the CLI entry point and Dom0's emulated NICs (which write pcap)."""
