"""What every corral daemon shares: start-up, supervision, metrics, health, debug endpoint."""
