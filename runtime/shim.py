"""The per-container init wrapper (stdlib only: run as `python -I -S shim.py SPEC`).

It starts once per container, so it imports only builtins and ctypes (json, signal
and contextlib would double its start-up cost through re and enum): the spec and
the records it writes are `marshal`-encoded dicts.

It joins the container's cgroups, enters the pod's network namespace (and its IPC
namespace, `ipcns`, shared by the pod's containers), unshares UTS/IPC/PID namespaces
and forks the container's PID 1, which unshares a mount namespace, mounts its root
(overlayfs over the image dir, when there is one), binds the pod's resolv.conf and
hosts (and the `mounts`: a system pod's credentials, corral's own files, the pod's
volumes), mounts /proc and execs the command. The wrapper stays outside the PID
namespace: it forwards SIGTERM/SIGINT/SIGHUP, records the child's PID (`pid_file`)
and its exit (`status_file`), and exits with its code. If the wrapper is killed, the
child gets SIGKILL (PR_SET_PDEATHSIG), and with it every process of the PID
namespace.

Unless the spec's `security` says privileged, PID 1's mount namespace hides the
node: the host's mounts read-only, empty read-only tmpfs over the `hidden` paths,
private tmpfs on /tmp, /var/tmp and /run, a minimal /dev, /proc/sys read-only
(an image root is entered with pivot_root, not chroot, so it cannot be left
again). Then, just before exec: the bounding set cut to `caps`, supplementary
groups cleared, `gid`/`uid`, effective = permitted = inheritable = `caps`,
no_new_privs, and (`seccomp`) the RuntimeDefault filter below. `shim.py --exec
PID SPEC -- ARGV` runs ARGV inside that running container's namespaces and root
with the same restrictions (corral exec, exec probes). shim.c does all of it the
same way.
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
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 2, -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_PIVOT_ROOT, SYS_MOUNT_SETATTR = 155, 442  # x86_64
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # x86_64
OPEN_TREE_CLONE, O_CLOEXEC, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH = 1, 0o2000000, 0x1000, 4
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 2, 4, 8
S_IFCHR = 0o020000
# The minimal /dev of a sandboxed container: (name, major, minor), then symlinks.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run")
PROC_READONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
PROC_MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug")
# The RuntimeDefault seccomp filter (x86_64 numbers; shim.c has the same lists): EPERM
# for what a container never needs, for the mount/namespace calls unless it has
# CAP_SYS_ADMIN, for bpf unless CAP_SYS_ADMIN or CAP_BPF; clone with namespace flags
# EPERM and clone3 ENOSYS (libc falls back to clone) unless CAP_SYS_ADMIN; other ABIs
# (i386, x32) refused.
SECCOMP_ALWAYS = (
    *(246, 320, 175, 313, 176),  # kexec_load, kexec_file_load, init/finit/delete_module
    *(304, 169, 167, 168, 163),  # open_by_handle_at, reboot, swapon, swapoff, acct
    *(250, 248, 249, 323, 298),  # keyctl, add_key, request_key, userfaultfd, perf_event_open
    *(212, 172, 173),  # lookup_dcookie, iopl, ioperm
)
SECCOMP_SYS_ADMIN = (
    *(165, 166, 155, 308, 272),  # mount, umount2, pivot_root, setns, unshare
    *(428, 429, 430, 431, 432, 433, 442),  # open_tree .. fspick, mount_setattr
    *(179, 443),  # quotactl, quotactl_fd
)
SECCOMP_BPF, NR_CLONE, NR_CLONE3 = 321, 56, 435
CLONE_NS_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
CAP_SYS_ADMIN, CAP_BPF = 21, 39
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
# An ordinary container's settings (runtime/security.py's Security()), for an exec into
# a container that has no spec.
DEFAULT_SECURITY = {"caps": 0xA80425FB, "no_new_privs": True, "seccomp": True}
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
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        marshal.dump(doc, f)
    os.replace(tmp, path)


def bind_files(spec: dict, root: str, create: bool) -> None:
    """The pod's resolv.conf and hosts over their paths under `root`."""
    for src, dst in spec.get("binds", []):
        target = os.path.join(root, dst.lstrip("/"))
        if create and not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        mount(src, target, None, MS_BIND)


def setup_privileged(spec: dict) -> None:
    """The node's own filesystem as it is (privileged containers; old specs)."""
    root = "/"
    if spec.get("image"):
        root = spec["rootfs"]
        opts = f"lowerdir={spec['image']},upperdir={spec['upper']},workdir={spec['work']}"
        mount("overlay", root, "overlay", 0, opts)
        if os.path.isdir("/dev"):
            os.makedirs(root + "/dev", exist_ok=True)
            mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
    bind_files(spec, root, True)
    proc = os.path.join(root, "proc")
    if spec.get("pidns"):
        os.makedirs(proc, exist_ok=True)
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if root != "/":
        os.chroot(root)


class MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]


def make_dev() -> None:
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name, major, minor in DEVICES:
        os.mknod("/dev/" + name, S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod("/dev/" + name, 0o666)
    for name, target in DEV_LINKS:
        os.symlink(target, "/dev/" + name)
    os.mkdir("/dev/pts")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666")
    os.mkdir("/dev/shm")
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")


def clone_mounts(spec: dict) -> list[tuple[int, str]]:
    """Detached copies of the spec's `mounts` sources, taken before the node's state is
    hidden (a source may live under it), attached by attach_mounts() at the end.

    Each mount is (source, destination, kind), kind as shim.c's flag: "m" read-only
    noexec (credentials), "M" read-only (corral's files), "v" a writable volume, "V" a
    read-only volume; all nosuid, nodev. A source may be a file (a volume's subPath)."""
    out = []
    for src, dst, kind in spec.get("mounts", []):
        fd = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, src.encode(), OPEN_TREE_CLONE | O_CLOEXEC)
        check(fd if fd < 0 else 0, f"open_tree {src}")
        flags = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        if kind == "m":
            flags |= MOUNT_ATTR_NOEXEC
        elif kind == "v":
            flags &= ~MOUNT_ATTR_RDONLY
        attr = MountAttr(flags, MOUNT_ATTR_RDONLY if kind == "v" else 0, 0, 0)
        rc = libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), 32)
        check(rc, f"mount_setattr({src})")
        out.append((fd, dst))
    return out


def mount_point(fd: int, dst: str) -> None:
    """A directory for a directory's mount, an empty file for a file's."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(dst, mode=0o755, exist_ok=True)
    elif not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst) or "/", mode=0o755, exist_ok=True)
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644))


def attach_mounts(clones: list[tuple[int, str]]) -> None:
    for fd, dst in clones:
        mount_point(fd, dst)
        rc = libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH)
        check(rc, f"move_mount onto {dst}")
        os.close(fd)


def setup_sandboxed(spec: dict, sec: dict) -> None:
    """The container's own view: the node's state hidden, its files read-only."""
    clones = clone_mounts(spec)
    image = spec.get("image")
    if image:
        root = spec["rootfs"]
        opts = f"lowerdir={image},upperdir={spec['upper']},workdir={spec['work']}"
        mount("overlay", root, "overlay", 0, opts)
        for d in ("dev", "proc", "tmp"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        bind_files(spec, root, True)
        # pivot_root, not chroot: with CAP_SYS_CHROOT a chroot can be left again.
        os.chdir(root)
        check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        check(libc.umount2(b".", MNT_DETACH), "umount the old root")
        os.chdir("/")
        for fd, dst in clones:  # mount points in the image's layer while it is writable
            mount_point(fd, dst)
    else:
        bind_files(spec, "/", False)  # never create files on the node
    for path in sec.get("hidden", []):
        try:
            is_dir = os.path.isdir(path)
        except OSError:
            continue
        if is_dir:
            # Detach what is mounted there first (e.g. every pod's netns under
            # /run/netns): gone from this namespace, not just covered.
            for _ in range(8):
                if libc.umount2(path.encode(), MNT_DETACH) != 0:
                    break
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            # Mount points for the spec's mounts inside it are made before it turns
            # read-only (corral's files in a checkout under /root: runtime/corralfiles.py).
            inside = [d for _, d, _ in spec.get("mounts", []) if d.startswith(path + "/")]
            mount("tmpfs", path, "tmpfs", flags | (0 if inside else MS_RDONLY), "mode=755,size=4k")
            if inside:
                for d in inside:
                    os.makedirs(d, mode=0o755, exist_ok=True)
                mount(None, path, None, MS_REMOUNT | MS_RDONLY | flags, None)
        elif os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)
    read_only = not image or sec.get("read_only_root")
    if read_only:
        attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        rc = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), 32)
        check(rc, "mount_setattr(/, read-only)")
    make_dev()
    if read_only:
        for d in PRIVATE_DIRS:
            if os.path.isdir(d):
                mode = "755" if d == "/run" else "1777"
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")
    attach_mounts(clones)
    if spec.get("pidns"):
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount("proc", "/proc", "proc", flags)
        for p in PROC_READONLY:
            if os.path.exists(p):
                mount(p, p, None, MS_BIND | MS_REC)
                mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)
        for p in PROC_MASKED:
            if os.path.exists(p):
                mount("/dev/null", p, None, MS_BIND)


def seccomp_program(caps: int) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions for these capabilities."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|.., BPF_RET
    eperm, enosys, allow = 0x00050000 | 1, 0x00050000 | 38, 0x7FFF0000
    admin = caps >> CAP_SYS_ADMIN & 1
    deny = list(SECCOMP_ALWAYS)
    if not admin:
        deny += SECCOMP_SYS_ADMIN
    if not (admin or caps >> CAP_BPF & 1):
        deny.append(SECCOMP_BPF)
    p = [(ld, 0, 0, 4), (jeq, 1, 0, 0xC000003E), (ret, 0, 0, enosys)]  # arch == x86_64
    p += [(ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # nr; no x32
    for nr in deny:
        p += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    if not admin:
        p += [(jeq, 0, 1, NR_CLONE3), (ret, 0, 0, enosys)]
        p += [(jeq, 0, 3, NR_CLONE), (ld, 0, 0, 16), (jset, 0, 1, CLONE_NS_FLAGS)]
        p += [(ret, 0, 0, eperm)]
    return [*p, (ret, 0, 0, allow)]


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_seccomp(caps: int) -> None:
    if os.uname().machine != "x86_64":
        return  # the numbers above are x86_64's
    prog = seccomp_program(caps)
    arr = (SockFilter * len(prog))(*(SockFilter(*i) for i in prog))
    fprog = SockFprog(len(prog), arr)
    rc = libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)
    check(rc, "prctl(PR_SET_SECCOMP)")


def drop_privileges(sec: dict | None) -> None:
    """Capabilities, groups, user and no_new_privs, in the order runc applies them."""
    if sec is None:
        return
    privileged, uid, gid = sec.get("privileged"), sec.get("uid"), sec.get("gid")
    caps = 0
    if not privileged:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        caps = sec["caps"] & ((1 << (last + 1)) - 1)
        if sec.get("seccomp"):  # while we still have CAP_SYS_ADMIN: no_new_privs not needed
            install_seccomp(caps)
        for cap in range(last + 1):
            if not caps >> cap & 1:
                check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)")
        check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
        os.setgroups([])
    if uid is not None or gid is not None:
        check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
        os.setgroups([])
        if gid is not None:
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    if not privileged:
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        lo, hi = caps & 0xFFFFFFFF, caps >> 32
        data = (ctypes.c_uint32 * 6)(lo, lo, lo, hi, hi, hi)  # effective, permitted, inh.
        check(libc.capset(hdr, data), "capset")
    if sec.get("no_new_privs"):
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def run_argv(argv: list, env: dict | None) -> None:
    """execvp's PATH search (os.execvpe imports `warnings`, which an image root lacks)."""
    env = os.environ if env is None else env
    name = argv[0]
    dirs = [""] if "/" in name else (env.get("PATH") or "/usr/bin:/bin").split(":")
    err: OSError = FileNotFoundError(2, "No such file or directory")
    for d in dirs:
        try:
            os.execve(os.path.join(d, name) if d else name, argv, env)
        except OSError as e:
            if not isinstance(e, FileNotFoundError | NotADirectoryError):
                err = e  # e.g. EACCES: reported unless a later directory has it
    sys.stderr.write(f"corral: cannot run {name!r}: {err.strerror}\n")
    sys.stderr.flush()
    os._exit(127 if isinstance(err, FileNotFoundError) else 126)


def child(spec: dict) -> None:
    """PID 1 of the container: set up its filesystem view, drop privileges and exec."""
    libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    # A mount namespace of the child's own: its /proc and binds must not change what
    # the wrapper sees (it reads the child's host /proc entry).
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    sec = spec.get("security")
    if sec is None or sec.get("privileged"):
        setup_privileged(spec)
    else:
        setup_sandboxed(spec, sec)
    os.chdir(spec.get("workingDir") or "/")
    drop_privileges(sec)
    run_argv(spec["argv"], spec["env"])


def join_cgroups(spec: dict) -> bool:
    for procs in spec.get("cgroups", []):
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            sys.stderr.write(f"corral: cannot join cgroup {procs}: {e}\n")
            return False
    return True


def forward_signals(pid: int) -> None:
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


def exit_code(status: int) -> tuple[int, int]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), 0


def exec_main(pid: str, spec_path: str, argv: list) -> int:
    """`--exec PID SPEC -- ARGV`: ARGV in the running container's namespaces and root,
    restricted as the container is (nsenter -t PID -n -m -u -i -p -r -w, then the drop)."""
    try:
        with open(spec_path, "rb") as f:
            spec = marshal.load(f)
    except FileNotFoundError:
        spec = {"security": DEFAULT_SECURITY}
    if not argv or not join_cgroups(spec):
        return 125
    try:
        fds = [os.open(f"/proc/{pid}/ns/{n}", os.O_RDONLY) for n in ("ipc", "uts", "net", "pid")]
        fds.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY))
        root = os.open(f"/proc/{pid}/root", os.O_RDONLY)
        cwd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY)
        for fd in fds:
            check(libc.setns(fd, 0), "setns")
            os.close(fd)
        os.fchdir(root)
        os.chroot(".")
        os.fchdir(cwd)
    except OSError as e:
        sys.stderr.write(f"corral: cannot enter container (PID {pid}): {e}\n")
        return 125
    child_pid = os.fork()
    if child_pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
            drop_privileges(spec.get("security"))
        except BaseException as e:
            sys.stderr.write(f"corral: exec setup failed: {e}\n")
            sys.stderr.flush()
            os._exit(125)
        run_argv(argv, None)
    forward_signals(child_pid)
    while True:
        try:
            _, status = os.waitpid(child_pid, 0)
            return exit_code(status)[0]
        except InterruptedError:
            continue


def read_env_fd(fd: int) -> dict:
    """The environment from the memfd the runtime filled (NAME=VALUE, NUL-separated):
    not in the spec file on disk (it may hold secrets)."""
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    env = {}
    for item in b"".join(chunks).split(b"\0"):
        if item:
            k, _, v = item.decode("utf-8", "surrogateescape").partition("=")
            env[k] = v
    return env


def main() -> int:
    with open(sys.argv[1], "rb") as f:
        spec = marshal.load(f)
    if spec.get("env_fd") is not None:
        spec["env"] = read_env_fd(spec["env_fd"])
    started = time.time()
    if not join_cgroups(spec):
        return 125
    try:
        fd = os.open(spec["netns"], os.O_RDONLY)
        check(libc.setns(fd, CLONE_NEWNET), f"setns {spec['netns']}")
        os.close(fd)
        flags = CLONE_NEWUTS | CLONE_NEWIPC
        if spec.get("ipcns"):  # the pod's IPC namespace, shared by its containers
            fd = os.open(spec["ipcns"], os.O_RDONLY)
            check(libc.setns(fd, CLONE_NEWIPC), f"setns {spec['ipcns']}")
            os.close(fd)
            flags = CLONE_NEWUTS
        sec = spec.get("security")
        if libc.unshare(flags | CLONE_NEWPID) == 0:
            spec["pidns"] = True
        elif sec is not None and not sec.get("privileged"):
            # Without its own PID namespace a container would see the node's /proc.
            check(-1, "unshare(CLONE_NEWPID)")
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

    forward_signals(pid)
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
    code, sig = exit_code(status)
    write_record(
        spec["status_file"],
        {"exitCode": code, "signal": sig, "startedAt": started, "finishedAt": time.time()},
    )
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["--exec"]:
        sys.exit(exec_main(sys.argv[2], sys.argv[3], sys.argv[5:]))
    sys.exit(main())
