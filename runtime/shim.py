"""The per-container init wrapper (stdlib only: run as `python -I -S shim.py SPEC`).

It starts once per container, so it imports only builtins and ctypes (json, signal
and contextlib would double its start-up cost through re and enum): the spec and
the records it writes are `marshal`-encoded dicts.

It joins the container's cgroups, enters the pod's network namespace, unshares
UTS/IPC/PID namespaces and forks the container's PID 1, which unshares a mount
namespace, mounts its root (overlayfs over the image dir, when there is one),
binds the pod's resolv.conf and hosts, mounts /proc and execs the command. The wrapper stays
outside the PID namespace: it forwards SIGTERM/SIGINT/SIGHUP, records the
child's PID (`pid_file`) and its exit (`status_file`), and exits with its code.
If the wrapper is killed, the child gets SIGKILL (PR_SET_PDEATHSIG), and with
it every process of the PID namespace.
"""

import _signal
import ctypes
import marshal
import os
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)


def check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, target, fstype, flags, data=None) -> None:  # type: ignore[no-untyped-def]
    def enc(s):
        return s.encode() if s is not None else None

    check(
        libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {src} on {target}"
    )


def start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[19])


def write_record(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        marshal.dump(doc, f)
    os.replace(tmp, path)


def child(spec: dict) -> None:
    """PID 1 of the container: set up its filesystem view and exec."""
    libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    # A mount namespace of the child's own: its /proc and binds must not change what
    # the wrapper sees (it reads the child's host /proc entry).
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = "/"
    if spec.get("image"):
        root = spec["rootfs"]
        opts = f"lowerdir={spec['image']},upperdir={spec['upper']},workdir={spec['work']}"
        mount("overlay", root, "overlay", 0, opts)
        if os.path.isdir("/dev"):
            os.makedirs(root + "/dev", exist_ok=True)
            mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
    for src, dst in spec.get("binds", []):
        target = os.path.join(root, dst.lstrip("/"))
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        mount(src, target, None, MS_BIND)
    proc = os.path.join(root, "proc")
    if spec.get("pidns"):
        os.makedirs(proc, exist_ok=True)
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if root != "/":
        os.chroot(root)
    os.chdir(spec.get("workingDir") or "/")
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as e:
        sys.stderr.write(f"corral: cannot run {argv[0]!r}: {e.strerror}\n")
        sys.stderr.flush()
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)


def main() -> int:
    with open(sys.argv[1], "rb") as f:
        spec = marshal.load(f)
    started = time.time()
    for procs in spec.get("cgroups", []):
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            sys.stderr.write(f"corral: cannot join cgroup {procs}: {e}\n")
            return 125
    try:
        fd = os.open(spec["netns"], os.O_RDONLY)
        check(libc.setns(fd, CLONE_NEWNET), f"setns {spec['netns']}")
        os.close(fd)
        flags = CLONE_NEWUTS | CLONE_NEWIPC
        if libc.unshare(flags | CLONE_NEWPID) == 0:
            spec["pidns"] = True
        else:
            check(libc.unshare(flags), "unshare")
        host = spec.get("hostname", "").encode()
        if host:
            check(libc.sethostname(host, len(host)), "sethostname")
    except OSError as e:
        sys.stderr.write(f"corral: sandbox setup failed: {e}\n")
        return 125

    pid = os.fork()
    if pid == 0:
        try:
            child(spec)
        except BaseException as e:
            sys.stderr.write(f"corral: container setup failed: {e}\n")
            sys.stderr.flush()
        os._exit(125)

    def forward(sig: int, _frame: object) -> None:
        try:  # noqa: SIM105 - contextlib would cost start-up time (see above)
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for s in (
        _signal.SIGTERM,
        _signal.SIGINT,
        _signal.SIGHUP,
        _signal.SIGQUIT,
        _signal.SIGUSR1,
        _signal.SIGUSR2,
    ):
        _signal.signal(s, forward)
    try:
        write_record(
            spec["pid_file"],
            {
                "shim": os.getpid(),
                "init": pid,
                "initStarted": start_ticks(pid),
                "startedAt": started,
            },
        )
    except OSError as e:
        sys.stderr.write(f"corral: cannot record the container's PID: {e}\n")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        code = 128 + sig
    else:
        sig, code = 0, os.WEXITSTATUS(status)
    write_record(
        spec["status_file"],
        {"exitCode": code, "signal": sig, "startedAt": started, "finishedAt": time.time()},
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
