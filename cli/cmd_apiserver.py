"""`corral apiserver`: the Kubernetes API over corral's etcd (a daemon), with
kube-apiserver's flag names."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
from typing import Any

from corral.cli.common import CLIError, new_store
from corral.daemon import options, privileges


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < v < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return v


def register(sub: Any) -> None:
    p = sub.add_parser(
        "apiserver",
        help="run the Kubernetes API server over corral's etcd, for kubectl and client "
        "libraries (a daemon)",
    )
    p.add_argument(
        "--etcd-servers",
        "--etcd",
        dest="etcd",
        metavar="URL[,URL...]",
        default=argparse.SUPPRESS,
        help="etcd endpoints (default: $CORRAL_ETCD, else the local cluster's); TLS to "
        "etcd with --etcd-cafile, --etcd-certfile, --etcd-keyfile",
    )
    p.add_argument(
        "--bind-address",
        default="0.0.0.0",
        help="the address to serve HTTPS on (default 0.0.0.0, as kube-apiserver)",
    )
    p.add_argument(
        "--advertise-address",
        metavar="IP",
        help="the address in the `kubernetes` Service's endpoints (default: --bind-address "
        "unless that is 0.0.0.0; then the Service gets no endpoints from this server)",
    )
    p.add_argument(
        "--endpoint-reconciler-type",
        choices=("lease", "none"),
        default="lease",
        help="lease (default): keep the `kubernetes` Service in `default` and this server "
        "in its endpoints while it runs; none: leave both alone",
    )
    p.add_argument("--secure-port", type=_port, default=6443, help="the HTTPS port (default 6443)")
    p.add_argument("--tls-cert-file", metavar="FILE", help="the server's certificate (required)")
    p.add_argument("--tls-private-key-file", metavar="FILE", help="its private key (required)")
    p.add_argument(
        "--client-ca-file",
        metavar="FILE",
        help="clients must present a certificate this CA signed (CN: user, O: groups); "
        "without it no client can authenticate",
    )
    p.add_argument(
        "--kubelet-client-certificate",
        metavar="FILE",
        help="the client certificate for the nodes' API (pods' log and exec); with "
        "--kubelet-client-key and --kubelet-certificate-authority",
    )
    p.add_argument("--kubelet-client-key", metavar="FILE", help="its private key")
    p.add_argument(
        "--kubelet-certificate-authority",
        metavar="FILE",
        help="the CA that signed the nodes' serving certificates",
    )
    options.add_daemon_options(p, "apiserver")
    p.set_defaults(func=cmd_apiserver, daemon=True)


def cmd_apiserver(args: argparse.Namespace) -> int:
    from corral.apiserver.serve import serve

    kubelet = ("kubelet_client_certificate", "kubelet_client_key", "kubelet_certificate_authority")
    for flag in ("tls_cert_file", "tls_private_key_file", "client_ca_file", *kubelet):
        path = getattr(args, flag)
        if flag in ("tls_cert_file", "tls_private_key_file") and not path:
            raise CLIError(f"--{flag.replace('_', '-')} is required (a PEM file)")
        if path and not os.path.isfile(path):
            raise CLIError(f"--{flag.replace('_', '-')} {path}: no such file")
    given = [f for f in kubelet if getattr(args, f)]
    if given and len(given) != len(kubelet):
        raise CLIError(
            "--kubelet-client-certificate, --kubelet-client-key and "
            "--kubelet-certificate-authority go together (pods' log and exec need all three)"
        )
    try:
        ipaddress.ip_address(args.bind_address)
    except ValueError:
        raise CLIError(f"--bind-address {args.bind_address!r} is not an IP address") from None
    if args.advertise_address:
        try:
            ipaddress.ip_address(args.advertise_address)
        except ValueError:
            raise CLIError(
                f"--advertise-address {args.advertise_address!r} is not an IP address"
            ) from None
    try:
        addr = options.http_addr(args, "apiserver", "127.0.0.1")
    except ValueError as e:
        raise CLIError(f"--metrics-addr {e}") from None
    debug = options.debug_socket(args, "/run/corral/apiserver-debug.sock")
    store = new_store(args)
    privileges.apply("apiserver")  # before any thread exists: they inherit what we keep
    try:
        asyncio.run(
            serve(
                store,
                bind_address=args.bind_address,
                secure_port=args.secure_port,
                tls_cert_file=args.tls_cert_file,
                tls_private_key_file=args.tls_private_key_file,
                client_ca_file=args.client_ca_file,
                kubelet_tls=(
                    (
                        args.kubelet_certificate_authority,
                        args.kubelet_client_certificate,
                        args.kubelet_client_key,
                    )
                    if given
                    else None
                ),
                http_addr=addr,
                debug_socket=debug,
                advertise_address=args.advertise_address,
                endpoint_reconciler=args.endpoint_reconciler_type,
            )
        )
    except OSError as e:  # the port taken, a certificate unreadable
        raise CLIError(f"corral apiserver: {e}") from None
    return 0
