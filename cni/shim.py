"""The CNI binary (`corral-cni`, `corral-ipam`): a thin forwarder to the node daemon.

Installed (precompiled, see install.shim_source) as a script started with
`python -IS` (no site, no venv): it imports
nothing beyond the interpreter's built-ins (`_socket` rather than `socket`,
`posix` rather than `os`, no json: each would add milliseconds) so it starts in
~10 ms, sends the CNI environment and stdin to the daemon
over its unix socket, prints the reply and exits with the daemon's code. VERSION
is answered here. If the daemon is not running the answer is error 11 (50 for
STATUS) at once.

Wire format (both directions NUL-separated, request ended by shutdown(SHUT_WR)):
    request: <plugin>\\0<K=V>\\0<K=V>...\\0\\0<stdin>
    reply:   <exit code>\\0<stderr>\\0<stdout>
"""

import _socket
import posix  # built in; `os` would cost ~1.5 ms of imports (posixpath, stat, ...)
import sys

SOCKET = "/run/corral/cni.sock"  # replaced by the installer with the node's socket
VERSIONS = '["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]'
TIMEOUT = 300.0


def _requested_version(stdin: bytes) -> str:
    """The request's cniVersion without importing json (VERSION only)."""
    text = stdin.decode(errors="replace")
    i = text.find('"cniVersion"')
    if i >= 0:
        rest = text[i + 12 :].lstrip().lstrip(":").lstrip()
        if rest.startswith('"'):
            v = rest[1 : rest.find('"', 1)]
            if v in VERSIONS:
                return v
    return "1.1.0"


def _error(code: int, msg: str, version: str = "1.1.0") -> str:
    msg = msg.replace("\\", "\\\\").replace('"', '\\"')
    return f'{{"cniVersion": "{version}", "code": {code}, "msg": "{msg}"}}'


def main() -> int:
    plugin = sys.argv[0].rsplit("/", 1)[-1]
    environ = posix.environ  # bytes -> bytes
    command = environ.get(b"CNI_COMMAND", b"").decode()
    stdin = sys.stdin.buffer.read() if command != "VERSION" or not sys.stdin.isatty() else b""
    if command == "VERSION":
        v = _requested_version(stdin)
        sys.stdout.write(f'{{"cniVersion": "{v}", "supportedVersions": {VERSIONS}}}\n')
        return 0
    env = b"\0".join(
        k + b"=" + v for k, v in environ.items() if k.startswith(b"CNI_") or k.startswith(b"K8S_")
    )
    path = environ.get(b"CORRAL_CNI_SOCKET", b"").decode() or SOCKET
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        code = 50 if command == "STATUS" else 11
        sys.stdout.write(
            _error(
                code,
                f"the corral node daemon is not answering on {path} "
                f"({e.strerror or e}); is `corral node` running?",
            )
            + "\n"
        )
        return 1
    try:
        s.sendall(plugin.encode() + b"\0" + env + b"\0\0" + stdin)
        s.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except OSError as e:
        sys.stdout.write(_error(11, f"the corral node daemon went away ({e})") + "\n")
        return 1
    finally:
        s.close()
    rc, _, rest = b"".join(chunks).partition(b"\0")
    err, _, out = rest.partition(b"\0")
    if not rc:
        sys.stdout.write(_error(11, "the corral node daemon closed the connection early") + "\n")
        return 1
    sys.stdout.buffer.write(out)
    if err:
        sys.stderr.buffer.write(err)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
