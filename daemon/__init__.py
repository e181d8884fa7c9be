"""What every corral daemon shares: start-up, supervision, metrics, health, debug endpoint.

`corral.daemon.core.Daemon` is the skeleton (see docs/internals.md, "Daemons");
`corral.daemon.metrics` holds every metric on the registry it serves.
"""
