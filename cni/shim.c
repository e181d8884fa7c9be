/* corral-cni / corral-ipam as a native forwarder: the same job and wire format as
 * cni/shim.py (see there), without the ~10 ms a Python interpreter needs to start.
 * Built at install time (cni/install.py, `gcc -O2`) when the daemon is asked for
 * the native shim; CORRAL_SOCKET is defined on the compiler's command line.
 *
 *   request: <plugin>\0<K=V>\0<K=V>...\0\0<stdin>      (then shutdown(SHUT_WR))
 *   reply:   <exit code>\0<stderr>\0<stdout>
 */
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef CORRAL_SOCKET
#define CORRAL_SOCKET "/run/corral/cni.sock"
#endif
#define VERSIONS "[\"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\", \"1.1.0\"]"

extern char **environ;

struct buf {
	char *p;
	size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->len + n + 1) * 2;
		b->p = realloc(b->p, b->cap);
		if (!b->p)
			exit(1);
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void read_all(int fd, struct buf *b)
{
	char tmp[65536];
	ssize_t n;
	while ((n = read(fd, tmp, sizeof tmp)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		put(b, tmp, (size_t)n);
	}
}

static void write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		p += w;
		n -= (size_t)w;
	}
}

/* The request's cniVersion if it is one we support, else 1.1.0 (VERSION only). */
static const char *requested_version(const char *in)
{
	static char v[16];
	const char *p = strstr(in, "\"cniVersion\"");
	if (p) {
		p += 12;
		while (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n')
			p++;
		if (*p == '"') {
			const char *e = strchr(p + 1, '"');
			if (e && (size_t)(e - p - 1) < sizeof v) {
				memcpy(v, p + 1, (size_t)(e - p - 1));
				v[e - p - 1] = 0;
				char quoted[20];
				snprintf(quoted, sizeof quoted, "\"%s\"", v);
				if (strstr(VERSIONS, quoted))
					return v;
			}
		}
	}
	return "1.1.0";
}

static int fail(int code, const char *msg, const char *path)
{
	printf("{\"cniVersion\": \"1.1.0\", \"code\": %d, \"msg\": \"the corral node daemon %s "
	       "on %s; is `corral node` running?\"}\n", code, msg, path);
	return 1;
}

int main(int argc, char **argv)
{
	(void)argc;
	const char *plugin = basename(argv[0]);
	const char *cmd = getenv("CNI_COMMAND");
	struct buf in = {0}, req = {0}, rep = {0};
	put(&in, "", 0);
	if (!cmd || strcmp(cmd, "VERSION") != 0 || !isatty(0))
		read_all(0, &in);
	if (cmd && strcmp(cmd, "VERSION") == 0) {
		printf("{\"cniVersion\": \"%s\", \"supportedVersions\": %s}\n",
		       requested_version(in.p), VERSIONS);
		return 0;
	}
	const char *path = getenv("CORRAL_CNI_SOCKET");
	if (!path || !*path)
		path = CORRAL_SOCKET;
	int code = cmd && strcmp(cmd, "STATUS") == 0 ? 50 : 11;
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (s < 0 || strlen(path) >= sizeof sa.sun_path)
		return fail(code, "is not answering", path);
	strcpy(sa.sun_path, path);
	if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0)
		return fail(code, "is not answering", path);
	put(&req, plugin, strlen(plugin));
	put(&req, "\0", 1);
	int first = 1;
	for (char **e = environ; *e; e++) {
		if (strncmp(*e, "CNI_", 4) == 0 || strncmp(*e, "K8S_", 4) == 0) {
			if (!first)
				put(&req, "\0", 1);
			put(&req, *e, strlen(*e));
			first = 0;
		}
	}
	put(&req, "\0\0", 2);
	put(&req, in.p, in.len);
	write_all(s, req.p, req.len);
	shutdown(s, SHUT_WR);
	read_all(s, &rep);
	close(s);
	char *z1 = rep.len ? memchr(rep.p, 0, rep.len) : NULL;
	char *z2 = z1 ? memchr(z1 + 1, 0, rep.len - (size_t)(z1 + 1 - rep.p)) : NULL;
	if (!z1 || !z2)
		return fail(11, "closed the connection early", path);
	write_all(1, z2 + 1, rep.len - (size_t)(z2 + 1 - rep.p));
	write_all(2, z1 + 1, (size_t)(z2 - z1 - 1));
	return atoi(rep.p);
}
