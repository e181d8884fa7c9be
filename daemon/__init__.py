"""What every corral daemon shares: start-up, supervision, metrics, health, debug endpoint.

`corral.daemon.core.Daemon` is the skeleton (see docs/internals.md, "Daemons");
`corral.daemon.metrics` holds the daemons' metrics, on the registry it serves
(`corral.common.metrics`).
"""
