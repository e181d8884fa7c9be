"""corral net: the network debugging CLI's logic (see docs/net.md)."""
