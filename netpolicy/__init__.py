"""NetworkPolicy: the pure engine (model.py), its iptables rules (rules.py) and the node
agent component that keeps them (component.py). docs/netpolicy.md."""
