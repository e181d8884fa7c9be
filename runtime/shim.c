/* The per-container init wrapper, native build: what runtime/shim.py does, without
 * an interpreter start per container (~1 ms of CPU instead of ~20 ms).
 *
 *   corral-container-shim -p PIDFILE -s STATUSFILE -n NETNS [-I IPCNS] [-h HOSTNAME] [-w DIR]
 *       [-c CGROUP_PROCS]... [-b SRC DST]... [-m|-M|-v|-V SRC DST]...
 *       [-i IMAGE UPPER WORK ROOTFS]
 *       [-e NAME=VALUE]... [-E ENV_FD] [SECURITY] -- ARGV...
 *   corral-container-shim -X PID [-c CGROUP_PROCS]... [SECURITY] -- ARGV...
 *
 * Mounts (sandboxed containers only): -m read-only noexec (credentials), -M read-only
 * (corral's files), -v a writable volume, -V a read-only volume; all nosuid, nodev.
 * SRC may be a file (a subPath): the mount point is then a file.
 *
 * SECURITY: -P (privileged: the node's filesystem as it is, every capability) or
 * -C CAPS_HEX (sandboxed: the node hidden, see shim.py), and [-u UID] [-g GID]
 * [-N] (no_new_privs) [-R] (read-only image root) [-F] (RuntimeDefault seccomp
 * filter, x86_64 only) [-H HIDDEN_PATH]... Without
 * either -P or -C the container runs as -P does. -X runs ARGV inside the running
 * container PID's namespaces and root with the same restrictions (exec).
 *
 * Same steps, messages, exit codes and records as shim.py: the records are
 * marshal-encoded dicts (version 4 subset: dict, short ASCII str, int, long,
 * binary float) so the runtime reads either shim's files the same way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#define MOUNT_ATTR_RDONLY_ 1ULL
#define MOUNT_ATTR_RO_ALL_ 15ULL /* RDONLY NOSUID NODEV NOEXEC */
#define MOUNT_ATTR_NOEXEC_ 8ULL
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#define OPEN_TREE_CLONE_ 1
#define MOVE_MOUNT_F_EMPTY_PATH_ 4

#define MAXN 256

extern char **environ;

struct spec {
    const char *pid_file, *status_file, *netns, *ipcns, *hostname, *workdir;
    const char *image, *upper, *work, *rootfs;
    const char *cgroups[MAXN];
    int ncgroups;
    const char *binds[MAXN][2];
    int nbinds;
    const char *mounts[MAXN][2]; /* directory/file mounts (-m SRC DST, -M -v -V: see usage) */
    char mount_kind[MAXN];
    int nmounts;
    char *env[4096];
    int nenv;
    char **argv;
    int pidns;
    /* security */
    int sandboxed, privileged, nnp, ro_root, seccomp;
    unsigned long long caps;
    long uid, gid; /* -1: unchanged */
    const char *hidden[MAXN];
    int nhidden;
    const char *exec_pid;
};

static pid_t child_pid;

static double now(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

/* ---- marshal records ---- */

static void m_u32(FILE *f, uint32_t v) {
    for (int i = 0; i < 4; i++)
        fputc((int)((v >> (8 * i)) & 0xff), f);
}

static void m_key(FILE *f, const char *s) {
    size_t n = strlen(s);
    fputc('z', f);
    fputc((int)n, f);
    fwrite(s, 1, n, f);
}

static void m_int(FILE *f, const char *key, long long v) {
    m_key(f, key);
    if (v >= INT32_MIN && v <= INT32_MAX) {
        fputc('i', f);
        m_u32(f, (uint32_t)(int32_t)v);
        return;
    }
    /* TYPE_LONG: signed count of 15-bit digits, least significant first. */
    unsigned long long u = v < 0 ? -(unsigned long long)v : (unsigned long long)v;
    uint16_t d[8];
    int n = 0;
    while (u) {
        d[n++] = (uint16_t)(u & 0x7fff);
        u >>= 15;
    }
    fputc('l', f);
    m_u32(f, (uint32_t)(int32_t)(v < 0 ? -n : n));
    for (int i = 0; i < n; i++) {
        fputc(d[i] & 0xff, f);
        fputc(d[i] >> 8, f);
    }
}

static void m_float(FILE *f, const char *key, double v) {
    uint64_t bits;
    m_key(f, key);
    memcpy(&bits, &v, 8);
    fputc('g', f);
    for (int i = 0; i < 8; i++)
        fputc((int)((bits >> (8 * i)) & 0xff), f);
}

struct field { const char *key; int is_float; long long i; double d; };

static int write_record(const char *path, const struct field *fs, int n) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    FILE *f = fd < 0 ? NULL : fdopen(fd, "wb");
    if (!f)
        return -1;
    fputc('{', f);
    for (int i = 0; i < n; i++) {
        if (fs[i].is_float)
            m_float(f, fs[i].key, fs[i].d);
        else
            m_int(f, fs[i].key, fs[i].i);
    }
    fputc('0', f);
    if (fclose(f) != 0)
        return -1;
    return rename(tmp, path);
}

static long long start_ticks(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p += 2; /* fields from the 3rd (state) on; starttime is the 22nd */
    for (int i = 0; i < 19 && p; i++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return p ? strtoll(p, NULL, 10) : -1;
}

/* ---- the container's PID 1 ---- */

static void die_setup(const char *what, const char *a, const char *b) {
    int e = errno;
    if (b)
        fprintf(stderr, "corral: container setup failed: %s %s on %s: %s\n", what, a, b,
                strerror(e));
    else
        fprintf(stderr, "corral: container setup failed: %s%s: %s\n", what, a ? a : "",
                strerror(e));
    fflush(stderr);
    _exit(125);
}

static int mkdir_p(const char *path) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

static void join_root(char *out, const char *root, const char *dst) {
    while (*dst == '/')
        dst++;
    if (strcmp(root, "/") == 0)
        snprintf(out, PATH_MAX, "/%s", dst);
    else
        snprintf(out, PATH_MAX, "%s/%s", root, dst);
}

static void bind_files(struct spec *s, const char *root, int create) {
    char target[PATH_MAX];
    for (int i = 0; i < s->nbinds; i++) {
        join_root(target, root, s->binds[i][1]);
        if (create && access(target, F_OK) != 0) {
            char dir[PATH_MAX];
            snprintf(dir, sizeof dir, "%s", target);
            char *slash = strrchr(dir, '/');
            if (slash && slash != dir) {
                *slash = 0;
                if (mkdir_p(dir) != 0)
                    die_setup("mkdir ", dir, NULL);
            }
            int fd = open(target, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
            if (fd < 0)
                die_setup("create ", target, NULL);
            close(fd);
        }
        if (mount(s->binds[i][0], target, NULL, MS_BIND, NULL) != 0)
            die_setup("mount", s->binds[i][0], target);
    }
}

/* The node's own filesystem as it is (privileged containers). */
static const char *setup_privileged(struct spec *s) {
    char target[PATH_MAX];
    const char *root = "/";
    if (s->image) {
        char opts[3 * PATH_MAX + 64];
        root = s->rootfs;
        snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", s->image, s->upper,
                 s->work);
        if (mount("overlay", root, "overlay", 0, opts) != 0)
            die_setup("mount", "overlay", root);
        struct stat st;
        if (stat("/dev", &st) == 0 && S_ISDIR(st.st_mode)) {
            join_root(target, root, "dev");
            if (mkdir_p(target) != 0)
                die_setup("mkdir ", target, NULL);
            if (mount("/dev", target, NULL, MS_BIND | MS_REC, NULL) != 0)
                die_setup("mount", "/dev", target);
        }
    }
    bind_files(s, root, 1);
    if (s->pidns) {
        join_root(target, root, "proc");
        if (mkdir_p(target) != 0)
            die_setup("mkdir ", target, NULL);
        if (mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
            die_setup("mount", "proc", target);
    }
    if (strcmp(root, "/") != 0 && chroot(root) != 0)
        die_setup("chroot ", root, NULL);
    return root;
}

static void must_mount(const char *src, const char *dst, const char *fs, unsigned long fl,
                       const char *data) {
    if (mount(src, dst, fs, fl, data) != 0)
        die_setup("mount", src ? src : "None", dst);
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static void make_dev(void) {
    static const struct { const char *name; int major, minor; } devs[] = {
        {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}};
    static const char *links[][2] = {{"fd", "/proc/self/fd"},      {"stdin", "/proc/self/fd/0"},
                                     {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"},
                                     {"ptmx", "pts/ptmx"}};
    char p[64];
    must_mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k");
    for (unsigned i = 0; i < sizeof devs / sizeof devs[0]; i++) {
        snprintf(p, sizeof p, "/dev/%s", devs[i].name);
        if (mknod(p, S_IFCHR | 0666, makedev(devs[i].major, devs[i].minor)) != 0 ||
            chmod(p, 0666) != 0)
            die_setup("mknod ", p, NULL);
    }
    for (unsigned i = 0; i < sizeof links / sizeof links[0]; i++) {
        snprintf(p, sizeof p, "/dev/%s", links[i][0]);
        if (symlink(links[i][1], p) != 0)
            die_setup("symlink ", p, NULL);
    }
    if (mkdir("/dev/pts", 0755) != 0 || mkdir("/dev/shm", 01777) != 0)
        die_setup("mkdir ", "/dev/pts and /dev/shm", NULL);
    must_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666");
    must_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "mode=1777,size=65536k");
}

/* Detached read-only copies of the -m sources, taken before the node's state is hidden
 * (a source may live under it); attach_mounts() puts them in place at the end. */
static void clone_mounts(struct spec *s, int *fds) {
    for (int i = 0; i < s->nmounts; i++) {
        fds[i] = syscall(SYS_open_tree, AT_FDCWD, s->mounts[i][0], OPEN_TREE_CLONE_ | O_CLOEXEC);
        if (fds[i] < 0)
            die_setup("open_tree ", s->mounts[i][0], NULL);
        char k = s->mount_kind[i];
        unsigned long long set = MOUNT_ATTR_RO_ALL_;
        if (k == 'M' || k == 'V') /* executable (corral's files; read-only volumes) */
            set &= ~MOUNT_ATTR_NOEXEC_;
        else if (k == 'v') /* a writable volume: nosuid, nodev */
            set &= ~(MOUNT_ATTR_NOEXEC_ | MOUNT_ATTR_RDONLY_);
        unsigned long long attr[4] = {set, k == 'v' ? MOUNT_ATTR_RDONLY_ : 0, 0, 0};
        if (syscall(SYS_mount_setattr, fds[i], "", AT_EMPTY_PATH, attr, sizeof attr) != 0)
            die_setup("mount_setattr ", s->mounts[i][0], NULL);
    }
}

/* The mount point of mount i: a directory, or an empty file for a file (a subPath). */
static void mount_point(struct spec *s, int *fds, int i) {
    struct stat st;
    const char *dst = s->mounts[i][1];
    if (fstat(fds[i], &st) != 0)
        die_setup("stat ", s->mounts[i][0], NULL);
    if (S_ISDIR(st.st_mode)) {
        if (mkdir_p(dst) != 0)
            die_setup("mkdir ", dst, NULL);
        return;
    }
    if (access(dst, F_OK) == 0)
        return;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", dst);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        if (mkdir_p(dir) != 0)
            die_setup("mkdir ", dir, NULL);
    }
    int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        die_setup("create ", dst, NULL);
    close(fd);
}

static void attach_mounts(struct spec *s, int *fds) {
    for (int i = 0; i < s->nmounts; i++) {
        mount_point(s, fds, i);
        if (syscall(SYS_move_mount, fds[i], "", AT_FDCWD, s->mounts[i][1],
                    MOVE_MOUNT_F_EMPTY_PATH_) != 0)
            die_setup("move_mount onto ", s->mounts[i][1], NULL);
        close(fds[i]);
    }
}

/* The container's own view: the node's state hidden, its files read-only (shim.py). */
static void setup_sandboxed(struct spec *s) {
    int mount_fds[MAXN];
    clone_mounts(s, mount_fds);
    if (s->image) {
        char opts[3 * PATH_MAX + 64], target[PATH_MAX];
        snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", s->image, s->upper,
                 s->work);
        must_mount("overlay", s->rootfs, "overlay", 0, opts);
        const char *dirs[] = {"dev", "proc", "tmp"};
        for (int i = 0; i < 3; i++) {
            join_root(target, s->rootfs, dirs[i]);
            if (mkdir_p(target) != 0)
                die_setup("mkdir ", target, NULL);
        }
        bind_files(s, s->rootfs, 1);
        /* pivot_root, not chroot: with CAP_SYS_CHROOT a chroot can be left again. */
        if (chdir(s->rootfs) != 0 || syscall(SYS_pivot_root, ".", ".") != 0)
            die_setup("pivot_root", NULL, NULL);
        if (umount2(".", MNT_DETACH) != 0)
            die_setup("umount the old root", NULL, NULL);
        if (chdir("/") != 0)
            die_setup("chdir ", "/", NULL);
        /* Mount points in the image's layer while it is still writable. */
        for (int i = 0; i < s->nmounts; i++)
            mount_point(s, mount_fds, i);
    } else {
        bind_files(s, "/", 0); /* never create files on the node */
    }
    for (int i = 0; i < s->nhidden; i++) {
        const char *p = s->hidden[i];
        if (is_dir(p)) {
            /* Detach what is mounted there first (e.g. every pod's netns under
             * /run/netns): gone from this namespace, not just covered. */
            for (int k = 0; k < 8 && umount2(p, MNT_DETACH) == 0; k++)
                ;
            /* Mount points for the -m/-M mounts inside it are made before it turns
             * read-only (corral's files in a checkout under /root: runtime/corralfiles.py). */
            size_t plen = strlen(p);
            int inside = 0;
            for (int m = 0; m < s->nmounts; m++)
                if (strncmp(s->mounts[m][1], p, plen) == 0 && s->mounts[m][1][plen] == '/')
                    inside = 1;
            unsigned long fl = MS_NOSUID | MS_NODEV | MS_NOEXEC;
            must_mount("tmpfs", p, "tmpfs", inside ? fl : fl | MS_RDONLY, "mode=755,size=4k");
            if (inside) {
                for (int m = 0; m < s->nmounts; m++)
                    if (strncmp(s->mounts[m][1], p, plen) == 0 && s->mounts[m][1][plen] == '/' &&
                        mkdir_p(s->mounts[m][1]) != 0)
                        die_setup("mkdir ", s->mounts[m][1], NULL);
                must_mount(NULL, p, NULL, MS_REMOUNT | MS_RDONLY | fl, NULL);
            }
        } else if (access(p, F_OK) == 0) {
            must_mount("/dev/null", p, NULL, MS_BIND, NULL);
        }
    }
    int ro = !s->image || s->ro_root;
    if (ro) {
        unsigned long long attr[4] = {MOUNT_ATTR_RDONLY_, 0, 0, 0};
        if (syscall(SYS_mount_setattr, AT_FDCWD, "/", AT_RECURSIVE, attr, sizeof attr) != 0)
            die_setup("mount_setattr(/, read-only)", NULL, NULL);
    }
    make_dev();
    if (ro) {
        const char *dirs[] = {"/tmp", "/var/tmp", "/run"};
        for (int i = 0; i < 3; i++)
            if (is_dir(dirs[i]))
                must_mount("tmpfs", dirs[i], "tmpfs", MS_NOSUID | MS_NODEV,
                           i == 2 ? "mode=755" : "mode=1777");
    }
    attach_mounts(s, mount_fds);
    if (s->pidns) {
        unsigned long fl = MS_NOSUID | MS_NODEV | MS_NOEXEC;
        const char *ro_paths[] = {"/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"};
        const char *masked[] = {"/proc/kcore", "/proc/keys", "/proc/timer_list",
                                "/proc/sched_debug"};
        must_mount("proc", "/proc", "proc", fl, NULL);
        for (int i = 0; i < 4; i++) {
            if (access(ro_paths[i], F_OK) != 0)
                continue;
            must_mount(ro_paths[i], ro_paths[i], NULL, MS_BIND | MS_REC, NULL);
            must_mount(NULL, ro_paths[i], NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | fl, NULL);
        }
        for (int i = 0; i < 4; i++)
            if (access(masked[i], F_OK) == 0)
                must_mount("/dev/null", masked[i], NULL, MS_BIND, NULL);
    }
}

/* The RuntimeDefault seccomp filter: the same lists and program as shim.py's. */
#if defined(__x86_64__)
static const int seccomp_always[] = {246, 320, 175, 313, 176, 304, 169, 167, 168,
                                     163, 250, 248, 249, 323, 298, 212, 172, 173};
static const int seccomp_sys_admin[] = {165, 166, 155, 308, 272, 428, 429,
                                        430, 431, 432, 433, 442, 179, 443};
#define NS_FLAGS 0x7E020000u
#define RET(v) BPF_STMT(BPF_RET | BPF_K, (v))
#define EPERM_ (SECCOMP_RET_ERRNO | EPERM)
#define ENOSYS_ (SECCOMP_RET_ERRNO | ENOSYS)

static int install_seccomp(unsigned long long caps) {
    struct sock_filter p[128];
    int n = 0, admin = caps >> 21 & 1;
    p[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, arch));
    p[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xC000003E, 1, 0);
    p[n++] = (struct sock_filter)RET(ENOSYS_);
    p[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, nr));
    p[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1);
    p[n++] = (struct sock_filter)RET(EPERM_);
    int deny[64], nd = 0;
    for (unsigned i = 0; i < sizeof seccomp_always / sizeof(int); i++)
        deny[nd++] = seccomp_always[i];
    if (!admin)
        for (unsigned i = 0; i < sizeof seccomp_sys_admin / sizeof(int); i++)
            deny[nd++] = seccomp_sys_admin[i];
    if (!admin && !(caps >> 39 & 1))
        deny[nd++] = 321; /* bpf */
    for (int i = 0; i < nd; i++) {
        p[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, deny[i], 0, 1);
        p[n++] = (struct sock_filter)RET(EPERM_);
    }
    if (!admin) {
        p[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 435, 0, 1); /* clone3 */
        p[n++] = (struct sock_filter)RET(ENOSYS_);
        p[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 56, 0, 3); /* clone */
        p[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                              offsetof(struct seccomp_data, args[0]));
        p[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, NS_FLAGS, 0, 1);
        p[n++] = (struct sock_filter)RET(EPERM_);
    }
    p[n++] = (struct sock_filter)RET(SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {(unsigned short)n, p};
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
}
#else
static int install_seccomp(unsigned long long caps) { (void)caps; return 0; }
#endif

static void fail_drop(const char *what) {
    fprintf(stderr, "corral: container setup failed: %s: %s\n", what, strerror(errno));
    fflush(stderr);
    _exit(125);
}

/* Capabilities, groups, user and no_new_privs, in the order runc applies them. */
static void drop_privileges(struct spec *s) {
    unsigned long long caps = 0;
    if (!s->sandboxed && !s->privileged)
        return;
    if (!s->privileged) {
        int last = 40;
        FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
        if (f) {
            if (fscanf(f, "%d", &last) != 1)
                last = 40;
            fclose(f);
        }
        caps = s->caps & (last >= 63 ? ~0ULL : (1ULL << (last + 1)) - 1);
        /* while we still have CAP_SYS_ADMIN: no_new_privs is not needed for it */
        if (s->seccomp && install_seccomp(caps) != 0)
            fail_drop("prctl(PR_SET_SECCOMP)");
        for (int c = 0; c <= last; c++)
            if (!(caps >> c & 1) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0)
                fail_drop("prctl(PR_CAPBSET_DROP)");
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
            fail_drop("clear ambient");
        if (setgroups(0, NULL) != 0)
            fail_drop("setgroups");
    }
    if (s->uid >= 0 || s->gid >= 0) {
        if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
            fail_drop("prctl(PR_SET_KEEPCAPS)");
        if (setgroups(0, NULL) != 0)
            fail_drop("setgroups");
        if (s->gid >= 0 && setgid((gid_t)s->gid) != 0)
            fail_drop("setgid");
        if (s->uid >= 0 && setuid((uid_t)s->uid) != 0)
            fail_drop("setuid");
    }
    if (!s->privileged) {
        struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct d[2];
        for (int i = 0; i < 2; i++) {
            __u32 v = (__u32)(caps >> (32 * i));
            d[i].effective = d[i].permitted = d[i].inheritable = v;
        }
        if (syscall(SYS_capset, &hdr, d) != 0)
            fail_drop("capset");
    }
    if (s->nnp && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail_drop("prctl(PR_SET_NO_NEW_PRIVS)");
}

static void run_argv(char **argv) {
    execvp(argv[0], argv);
    int e = errno;
    fprintf(stderr, "corral: cannot run '%s': %s\n", argv[0], strerror(e));
    fflush(stderr);
    _exit(e == ENOENT ? 127 : 126);
}

static void child(struct spec *s) {
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    /* A mount namespace of the child's own: its /proc and binds must not change what
     * the wrapper sees (it reads the child's host /proc entry). */
    if (unshare(CLONE_NEWNS) != 0)
        die_setup("unshare(CLONE_NEWNS)", NULL, NULL);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        die_setup("mount", "None", "/");
    if (s->sandboxed)
        setup_sandboxed(s);
    else
        setup_privileged(s);
    const char *wd = s->workdir && *s->workdir ? s->workdir : "/";
    if (chdir(wd) != 0)
        die_setup("chdir ", wd, NULL);
    drop_privileges(s);
    s->env[s->nenv] = NULL;
    environ = s->env; /* execvp searches the container's PATH, as os.execvpe does */
    run_argv(s->argv);
}

/* ---- the wrapper ---- */

static void forward(int sig) {
    int e = errno;
    if (child_pid > 0)
        kill(child_pid, sig);
    errno = e;
}

static int usage(void) {
    fprintf(stderr, "corral-container-shim: bad arguments (started by the corral runtime)\n");
    return 2;
}

static int wait_code(pid_t p, int *sig) {
    int status;
    while (waitpid(p, &status, 0) < 0) {
        if (errno != EINTR) {
            status = 137 << 8;
            break;
        }
    }
    *sig = 0;
    if (WIFSIGNALED(status)) {
        *sig = WTERMSIG(status);
        return 128 + *sig;
    }
    return WEXITSTATUS(status);
}

static void forward_signals(pid_t p) {
    child_pid = p;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    for (unsigned k = 0; k < sizeof sigs / sizeof sigs[0]; k++)
        sigaction(sigs[k], &sa, NULL);
}

static int join_cgroups(struct spec *s) {
    char pid[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    for (int k = 0; k < s->ncgroups; k++) {
        int fd = open(s->cgroups[k], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, pid, strlen(pid)) < 0) {
            fprintf(stderr, "corral: cannot join cgroup %s: %s\n", s->cgroups[k],
                    strerror(errno));
            return -1;
        }
        close(fd);
    }
    return 0;
}

/* -X PID: ARGV in the running container's namespaces and root (nsenter -t PID -n -m -u
 * -i -p -r -w), then the container's own restrictions. */
static int exec_main(struct spec *s) {
    static const char *ns[] = {"ipc", "uts", "net", "pid", "mnt"};
    char path[64];
    int fds[5], root, cwd;
    if (join_cgroups(s) != 0)
        return 125;
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "/proc/%s/ns/%s", s->exec_pid, ns[i]);
        if ((fds[i] = open(path, O_RDONLY | O_CLOEXEC)) < 0)
            goto fail;
    }
    snprintf(path, sizeof path, "/proc/%s/root", s->exec_pid);
    if ((root = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        goto fail;
    snprintf(path, sizeof path, "/proc/%s/cwd", s->exec_pid);
    if ((cwd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        goto fail;
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "setns %s", ns[i]);
        if (setns(fds[i], 0) != 0)
            goto fail;
        close(fds[i]);
    }
    snprintf(path, sizeof path, "chroot");
    if (fchdir(root) != 0 || chroot(".") != 0 || fchdir(cwd) != 0)
        goto fail;
    fflush(stderr);
    pid_t p = fork();
    if (p < 0)
        goto fail;
    if (p == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        drop_privileges(s);
        run_argv(s->argv);
    }
    forward_signals(p);
    int sig;
    return wait_code(p, &sig);
fail:
    fprintf(stderr, "corral: cannot enter container (PID %s): %s: %s\n", s->exec_pid, path,
            strerror(errno));
    return 125;
}

/* -E FD: NAME=VALUE entries separated by NULs, read from FD (a memfd the runtime
 * filled), so the environment (secrets among it) is neither in argv, which any user
 * of the node can read in /proc, nor on disk. */
static int read_env_fd(struct spec *s, int fd) {
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap + 1);
    if (!buf)
        return -1;
    for (;;) {
        if (len == cap) {
            char *more = realloc(buf, 2 * cap + 1);
            if (!more)
                return -1;
            buf = more;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = 0;
    for (size_t off = 0; off < len; off += strlen(buf + off) + 1) {
        if (!buf[off])
            continue;
        if (s->nenv == (int)(sizeof s->env / sizeof s->env[0]) - 1)
            return -1;
        s->env[s->nenv++] = buf + off;
    }
    return 0;
}

int main(int argc, char **argv) {
    static struct spec s;
    s.uid = s.gid = -1;
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        int left = argc - i - 1;
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (strlen(a) != 2 || a[0] != '-')
            return usage();
        if (strchr("PNRF", a[1])) { /* flags without a value */
            if (a[1] == 'P')
                s.privileged = 1;
            else if (a[1] == 'N')
                s.nnp = 1;
            else if (a[1] == 'R')
                s.ro_root = 1;
            else
                s.seccomp = 1;
            continue;
        }
        if (left < 1)
            return usage();
        switch (a[1]) {
        case 'p': s.pid_file = argv[++i]; break;
        case 's': s.status_file = argv[++i]; break;
        case 'n': s.netns = argv[++i]; break;
        case 'I': s.ipcns = argv[++i]; break;
        case 'h': s.hostname = argv[++i]; break;
        case 'w': s.workdir = argv[++i]; break;
        case 'X': s.exec_pid = argv[++i]; break;
        case 'C':
            s.sandboxed = 1;
            s.caps = strtoull(argv[++i], NULL, 16);
            break;
        case 'u': s.uid = strtol(argv[++i], NULL, 10); break;
        case 'g': s.gid = strtol(argv[++i], NULL, 10); break;
        case 'H':
            if (s.nhidden == MAXN)
                return usage();
            s.hidden[s.nhidden++] = argv[++i];
            break;
        case 'c':
            if (s.ncgroups == MAXN)
                return usage();
            s.cgroups[s.ncgroups++] = argv[++i];
            break;
        case 'e':
            if (s.nenv == (int)(sizeof s.env / sizeof s.env[0]) - 1)
                return usage();
            s.env[s.nenv++] = argv[++i];
            break;
        case 'E':
            if (read_env_fd(&s, atoi(argv[++i])) != 0)
                return usage();
            break;
        case 'b':
            if (left < 2 || s.nbinds == MAXN)
                return usage();
            s.binds[s.nbinds][0] = argv[++i];
            s.binds[s.nbinds++][1] = argv[++i];
            break;
        case 'm':
        case 'M':
        case 'v':
        case 'V':
            if (left < 2 || s.nmounts == MAXN)
                return usage();
            s.mount_kind[s.nmounts] = a[1];
            s.mounts[s.nmounts][0] = argv[++i];
            s.mounts[s.nmounts++][1] = argv[++i];
            break;
        case 'i':
            if (left < 4)
                return usage();
            s.image = argv[++i];
            s.upper = argv[++i];
            s.work = argv[++i];
            s.rootfs = argv[++i];
            break;
        default:
            return usage();
        }
    }
    if (s.privileged)
        s.sandboxed = 0;
    if (i >= argc)
        return usage();
    s.argv = argv + i;
    if (s.exec_pid)
        return exec_main(&s);
    if (!s.pid_file || !s.status_file || !s.netns)
        return usage();
    double started = now();

    if (join_cgroups(&s) != 0)
        return 125;
    int fd = open(s.netns, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
        fprintf(stderr, "corral: sandbox setup failed: setns %s: %s\n", s.netns,
                strerror(errno));
        return 125;
    }
    close(fd);
    int flags = CLONE_NEWUTS | CLONE_NEWIPC;
    if (s.ipcns) { /* the pod's IPC namespace, shared by its containers */
        int ifd = open(s.ipcns, O_RDONLY | O_CLOEXEC);
        if (ifd < 0 || setns(ifd, CLONE_NEWIPC) != 0) {
            fprintf(stderr, "corral: sandbox setup failed: setns %s: %s\n", s.ipcns,
                    strerror(errno));
            return 125;
        }
        close(ifd);
        flags &= ~CLONE_NEWIPC;
    }
    if (unshare(flags | CLONE_NEWPID) == 0) {
        s.pidns = 1;
    } else if (s.sandboxed) { /* without its own PID namespace it would see the node's /proc */
        fprintf(stderr, "corral: sandbox setup failed: unshare(CLONE_NEWPID): %s\n",
                strerror(errno));
        return 125;
    } else if (unshare(flags) != 0) {
        fprintf(stderr, "corral: sandbox setup failed: unshare: %s\n", strerror(errno));
        return 125;
    }
    if (s.hostname && *s.hostname && sethostname(s.hostname, strlen(s.hostname)) != 0) {
        fprintf(stderr, "corral: sandbox setup failed: sethostname: %s\n", strerror(errno));
        return 125;
    }
    fflush(stderr);

    pid_t p = fork();
    if (p < 0) {
        fprintf(stderr, "corral: fork: %s\n", strerror(errno));
        return 125;
    }
    if (p == 0)
        child(&s);
    forward_signals(p);

    struct field pf[] = {{"shim", 0, getpid(), 0}, {"init", 0, p, 0},
                         {"initStarted", 0, start_ticks(p), 0}, {"startedAt", 1, 0, started}};
    if (write_record(s.pid_file, pf, 4) != 0)
        fprintf(stderr, "corral: cannot record the container's PID: %s\n", strerror(errno));
    int sig;
    int code = wait_code(p, &sig);
    struct field sf[] = {{"exitCode", 0, code, 0}, {"signal", 0, sig, 0},
                         {"startedAt", 1, 0, started}, {"finishedAt", 1, 0, now()}};
    write_record(s.status_file, sf, 4);
    return code;
}
