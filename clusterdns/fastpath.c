/* The UDP hot path of `corral dns`, as a CPython extension (built on first use).
 *
 * serve(fd, fast, names, ents, zone, nx, pods, synced, ok_counts, nx_counts)
 *   -> (misses, answered)
 *
 * Before the first full sync (`synced` false) every datagram is a miss.
 * Reads every datagram waiting on the non-blocking socket `fd` with recvmmsg
 * (up to ROUNDS batches of BATCH), and answers the ones the Python fast path
 * would answer, byte for byte the same (see server.py `_on_udp_python`):
 *   - a QUERY that is exactly one question, or one question and an OPT record
 *     without options, whose lower-cased question is a key of `fast`: ID + the
 *     entry's header + the question as sent + the entry's records;
 *   - a name of `zone` (class IN) that is neither in `names` nor
 *     in `ents` (and not under pod.<zone> when `pods`): the pre-built NXDOMAIN
 *     from `nx`.
 * The answers go out with sendmmsg to the senders' addresses. Everything else
 * is returned in `misses` as (datagram, (host, port)) for the full Python path.
 * Counts go into `ok_counts` / `nx_counts` ({qtype: n}). Only the dicts' and
 * tuples' contents are read; nothing here keeps a reference across calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 64
#define ROUNDS 4
#define INBUF 4096
#define OUTBUF 1024

static struct mmsghdr in_msgs[BATCH], out_msgs[BATCH];
static struct iovec in_iov[BATCH], out_iov[BATCH];
static unsigned char in_buf[BATCH][INBUF], out_buf[BATCH][OUTBUF];
static struct sockaddr_in addrs[BATCH];

static const unsigned char QD1[8] = {0, 1, 0, 0, 0, 0, 0, 0};
static const unsigned char QD1_AR1[8] = {0, 1, 0, 0, 0, 0, 0, 1};
/* our OPT record (wire.opt_rr()): root, type 41, 1232 bytes, no flags, no options */
static const unsigned char OPT[11] = {0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0};

static int bump(PyObject *counts, PyObject *qtype) {
    PyObject *have = PyDict_GetItemWithError(counts, qtype);
    long n = 0;
    if (have != NULL) n = PyLong_AsLong(have);
    else if (PyErr_Occurred()) return -1;
    PyObject *v = PyLong_FromLong(n + 1);
    if (v == NULL) return -1;
    int rc = PyDict_SetItem(counts, qtype, v);
    Py_DECREF(v);
    return rc;
}

/* 1: an NXDOMAIN fits; 0: not (the full path decides); -1: a Python error. */
static int nx_ok(const unsigned char *key, Py_ssize_t klen, PyObject *names, PyObject *ents,
                 const unsigned char *zone, Py_ssize_t zlen, int pods) {
    if (klen < 5 || key[klen - 2] != 0 || key[klen - 1] != 1) return 0;
    Py_ssize_t nlen = klen - 4, cut = nlen - zlen;
    if (cut <= 0 || nlen > 255 || memcmp(key + cut, zone, zlen) != 0) return 0;
    Py_ssize_t i = 0, last = 0;
    while (i < cut) {
        unsigned char n = key[i];
        if (n == 0 || n >= 64) return 0;
        last = i;
        i += 1 + n;
    }
    if (i != cut) return 0;
    if (pods && cut - last == 4 && memcmp(key + last, "\x03pod", 4) == 0) return 0;
    PyObject *name = PyBytes_FromStringAndSize((const char *)key, nlen);
    if (name == NULL) return -1;
    int in = PyDict_Contains(names, name);
    if (in == 0) in = PyDict_Contains(ents, name);
    Py_DECREF(name);
    if (in < 0) return -1;
    return !in;
}

static PyObject *miss(PyObject *misses, int i) {
    char host[INET_ADDRSTRLEN];
    if (inet_ntop(AF_INET, &addrs[i].sin_addr, host, sizeof host) == NULL) return misses;
    PyObject *item = Py_BuildValue("(y#(si))", (const char *)in_buf[i], (Py_ssize_t)in_msgs[i].msg_len,
                                   host, (int)ntohs(addrs[i].sin_port));
    if (item == NULL) return NULL;
    int rc = PyList_Append(misses, item);
    Py_DECREF(item);
    return rc < 0 ? NULL : misses;
}

static void send_all(int fd, int n, long *send_errors) {
    int done = 0;
    while (done < n) {
        int r = sendmmsg(fd, out_msgs + done, n - done, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR) continue;
            *send_errors += n - done; /* a full socket buffer: these answers are lost */
            return;
        }
        if (r == 0) { *send_errors += n - done; return; }
        done += r;
    }
}

static PyObject *serve(PyObject *self, PyObject *args) {
    int fd, pods, synced;
    PyObject *fast, *names, *ents, *nx, *ok_counts, *nx_counts;
    const unsigned char *zone;
    Py_ssize_t zlen;
    if (!PyArg_ParseTuple(args, "iO!O!O!y#O!ppO!O!", &fd, &PyDict_Type, &fast, &PyDict_Type, &names,
                          &PyDict_Type, &ents, &zone, &zlen, &PyTuple_Type, &nx, &pods, &synced,
                          &PyDict_Type, &ok_counts, &PyDict_Type, &nx_counts))
        return NULL;
    if (PyTuple_GET_SIZE(nx) != 5) {
        PyErr_SetString(PyExc_ValueError, "nx must hold 4 headers and a tail");
        return NULL;
    }
    PyObject *misses = PyList_New(0);
    if (misses == NULL) return NULL;
    long answered = 0, send_errors = 0;
    unsigned char key[300];
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < BATCH; i++) {
            in_iov[i].iov_base = in_buf[i];
            in_iov[i].iov_len = INBUF;
            memset(&in_msgs[i].msg_hdr, 0, sizeof in_msgs[i].msg_hdr);
            in_msgs[i].msg_hdr.msg_iov = &in_iov[i];
            in_msgs[i].msg_hdr.msg_iovlen = 1;
            in_msgs[i].msg_hdr.msg_name = &addrs[i];
            in_msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
        }
        int n = recvmmsg(fd, in_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break;
        int out = 0;
        for (int i = 0; i < n; i++) {
            unsigned char *d = in_buf[i];
            Py_ssize_t len = in_msgs[i].msg_len;
            int edns = -1;
            if (len > 16 && len < INBUF && !(d[2] & 0xF8) &&
                in_msgs[i].msg_hdr.msg_namelen == sizeof(struct sockaddr_in)) {
                if (memcmp(d + 4, QD1, 8) == 0) edns = 0;
                else if (len > 27 && memcmp(d + 4, QD1_AR1, 8) == 0 && d[len - 11] == 0 &&
                         d[len - 10] == 0 && d[len - 9] == 41 && d[len - 5] == 0 && d[len - 2] == 0 &&
                         d[len - 1] == 0)
                    edns = 2;
            }
            if (!synced) edns = -1; /* before the first full sync: SERVFAIL, from Python */
            Py_ssize_t qlen = edns < 0 ? 0 : len - 12 - (edns ? 11 : 0);
            if (qlen < 5 || qlen > (Py_ssize_t)sizeof key) {
                if (miss(misses, i) == NULL) goto fail;
                continue;
            }
            for (Py_ssize_t k = 0; k < qlen; k++) {
                unsigned char c = d[12 + k];
                key[k] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
            }
            PyObject *kobj = PyBytes_FromStringAndSize((const char *)key, qlen);
            if (kobj == NULL) goto fail;
            PyObject *e = PyDict_GetItemWithError(fast, kobj); /* borrowed */
            Py_DECREF(kobj);
            if (e == NULL && PyErr_Occurred()) goto fail;
            PyObject *head, *tail;
            int idx = (d[2] & 1) | edns;
            if (e != NULL) {
                if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) < 6) {
                    if (miss(misses, i) == NULL) goto fail;
                    continue;
                }
                head = PyTuple_GET_ITEM(e, idx);
                tail = PyTuple_GET_ITEM(e, 4);
                if (bump(ok_counts, PyTuple_GET_ITEM(e, 5)) < 0) goto fail;
            } else {
                int ok = nx_ok(key, qlen, names, ents, zone, zlen, pods);
                if (ok < 0) goto fail;
                if (!ok) {
                    if (miss(misses, i) == NULL) goto fail;
                    continue;
                }
                head = PyTuple_GET_ITEM(nx, idx);
                tail = PyTuple_GET_ITEM(nx, 4);
                PyObject *qt = PyLong_FromLong((key[qlen - 4] << 8) | key[qlen - 3]);
                if (qt == NULL) goto fail;
                int rc = bump(nx_counts, qt);
                Py_DECREF(qt);
                if (rc < 0) goto fail;
            }
            if (!PyBytes_Check(head) || !PyBytes_Check(tail)) {
                if (miss(misses, i) == NULL) goto fail;
                continue;
            }
            Py_ssize_t hl = PyBytes_GET_SIZE(head), tl = PyBytes_GET_SIZE(tail);
            Py_ssize_t ol = edns ? (Py_ssize_t)sizeof OPT : 0;
            Py_ssize_t total = 2 + hl + qlen + tl + ol;
            if (total > OUTBUF) {
                if (miss(misses, i) == NULL) goto fail;
                continue;
            }
            unsigned char *o = out_buf[out];
            o[0] = d[0];
            o[1] = d[1];
            memcpy(o + 2, PyBytes_AS_STRING(head), hl);
            memcpy(o + 2 + hl, d + 12, qlen);
            memcpy(o + 2 + hl + qlen, PyBytes_AS_STRING(tail), tl);
            if (ol) memcpy(o + 2 + hl + qlen + tl, OPT, ol);
            out_iov[out].iov_base = o;
            out_iov[out].iov_len = total;
            memset(&out_msgs[out].msg_hdr, 0, sizeof out_msgs[out].msg_hdr);
            out_msgs[out].msg_hdr.msg_iov = &out_iov[out];
            out_msgs[out].msg_hdr.msg_iovlen = 1;
            out_msgs[out].msg_hdr.msg_name = &addrs[i];
            out_msgs[out].msg_hdr.msg_namelen = sizeof addrs[i];
            out++;
        }
        if (out) send_all(fd, out, &send_errors);
        answered += out;
        if (n < BATCH) break;
    }
    return Py_BuildValue("(Nll)", misses, answered, send_errors);
fail:
    Py_DECREF(misses);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS, "Answer the waiting datagrams the fast path can answer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_corral_dnsfast", NULL, -1, methods};

PyMODINIT_FUNC PyInit__corral_dnsfast(void) { return PyModule_Create(&module); }
