"""corral.clusterdns: the cluster DNS server (`corral dns`).

The folder is not called `dns/`: a top-level `dns` folder shadows dnspython's `dns`
package whenever the repository root is on sys.path (`python -m ...` from the root).
"""
