"""PV split drivers: one package per device type (protocol, front end, back end)."""
