"""What every node-side part shares: namespaces, netlink, iptables, the node context."""
