"""etcd with mutual TLS: certificate-holding clients get in, nobody else does."""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.api.store import Store, TLSFiles, Unavailable
from corral.cli.main import main as cli_main
from corral.cluster import pki
from corral.cluster.etcd import LocalEtcd, health


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[LocalEtcd]:
    tmp = tempfile.mkdtemp(prefix="corral-test-tls-")
    paths = pki.ensure(os.path.join(tmp, "pki"), [])
    # A certificate from a CA etcd does not trust: a stranger's.
    pki.ensure(os.path.join(tmp, "other-pki"), [])
    server = LocalEtcd(
        data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"), pki=paths
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _other(server: LocalEtcd) -> TLSFiles:
    other = pki.Paths(os.path.join(os.path.dirname(server.pki.dir), "other-pki"))  # type: ignore[union-attr]
    return TLSFiles(server.pki.ca, other.cert("cli"), other.key("cli"))  # type: ignore[union-attr]


def test_pki_files_are_private_and_kept() -> None:
    tmp = tempfile.mkdtemp(prefix="corral-test-pki-")
    try:
        d = os.path.join(tmp, "pki")
        p = pki.ensure(d, ["10.250.0.254"])
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for name in ("ca", "etcd", *pki.ROLES):
            assert stat.S_IMODE(os.stat(p.key(name)).st_mode) == 0o600
        before = {n: Path(p.cert(n)).read_bytes() for n in ("ca", "etcd", "node")}
        pki.ensure(d, ["10.250.0.254"])  # nothing to change: nothing re-issued
        assert before == {n: Path(p.cert(n)).read_bytes() for n in ("ca", "etcd", "node")}
        pki.ensure(d, ["10.250.1.254"])  # etcd moved: only its certificate is re-issued
        assert Path(p.cert("etcd")).read_bytes() != before["etcd"]
        assert Path(p.cert("ca")).read_bytes() == before["ca"]
        text = subprocess.run(
            ["openssl", "x509", "-noout", "-text", "-in", p.cert("etcd")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "IP Address:10.250.1.254" in text and "IP Address:127.0.0.1" in text
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def test_a_client_with_a_certificate_reads_and_writes(tls_etcd: LocalEtcd) -> None:
    assert tls_etcd.url.startswith("https://")
    async with Store(tls_etcd.client_urls, tls=tls_etcd.client_tls("node")) as s:
        await s.put_raw("/corral/tls-test", b"ok")
        kv = await s.get_raw("/corral/tls-test")
        assert kv is not None and kv.value == b"ok"
        await s.delete_raw("/corral/tls-test")


async def test_clients_without_a_valid_certificate_are_refused(tls_etcd: LocalEtcd) -> None:
    # gRPC with a certificate from another CA: the handshake fails.
    s = Store(tls_etcd.client_urls, timeout=2, tls=_other(tls_etcd))
    with pytest.raises(Unavailable):
        await s.connect()
    # Plain HTTP to the TLS port (what a pod's curl would try): no answer.
    plain = tls_etcd.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"{plain}/v3/kv/range", data=b'{"key":"Lw=="}', timeout=2)
    # HTTPS that trusts etcd but shows no client certificate: refused by etcd.
    ctx = ssl.create_default_context(cafile=tls_etcd.pki.ca)  # type: ignore[union-attr]
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, OSError)):
        urllib.request.urlopen(
            f"{tls_etcd.url}/v3/kv/put",
            data=b'{"key":"Lw==","value":"eA=="}',
            timeout=2,
            context=ctx,
        )
    ok, why = health(tls_etcd.url, None)
    assert not ok and why
    assert health(tls_etcd.url, tls_etcd.client_tls("cli"))[0]


def test_https_without_certificate_is_a_clear_cli_error(
    tls_etcd: LocalEtcd, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["--etcd", tls_etcd.url, "get", "nodes"]) == 1
    err = capsys.readouterr().err
    assert "--etcd-cafile" in err and "Traceback" not in err
    t = tls_etcd.client_tls("cli")
    assert t is not None
    args = ["--etcd", tls_etcd.url, "--etcd-cafile", t.ca, "--etcd-certfile", t.cert]
    assert cli_main([*args, "get", "nodes"]) == 1
    assert "missing --etcd-keyfile" in capsys.readouterr().err
    assert cli_main([*args, "--etcd-keyfile", "/nonexistent/key", "get", "nodes"]) == 1
    assert "/nonexistent/key" in capsys.readouterr().err
    # The flags also work after the verb, as --etcd does.
    assert cli_main(["get", "nodes", *args, "--etcd-keyfile", t.key]) == 0
