"""What a URL list may reach: every spelling of an internal address, names that resolve there, redirects, and
the connection pinned to the checked address. Traffic goes to loopback only; anything aimed at the metadata
address is checked by the classification, with connections forbidden."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest

from data_prep import shard as shard_tool
from data_prep.fetch import FetchError, fetch
from data_prep.policy import NotAllowed, SourcePolicy, numeric_host

from helpers.corpus import encode, photo
from helpers.loopback_http import LoopbackServer

LIST = "/lists/urls.jsonl"  # a local list: its entries may use file:// unless told otherwise
JPEG = encode(photo(64, 48, 7), "JPEG")
OTHER_JPEG = encode(photo(64, 48, 8), "JPEG")


def shard_list(tmp_path: Path, urls: list[str], *allow: str) -> dict:
    """Shard a .jsonl list of ``urls`` (one job, one worker) and return its manifest."""
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps({"url": u}) for u in urls) + "\n")
    args = [str(tmp_path / "list.jsonl"), "--output", str(tmp_path / "out"), "--workers", "1", "--min-side", "16"]
    for a in allow:
        args += ["--allow-sources", a]
    assert shard_tool.main(args) == 0
    return json.loads((tmp_path / "out/manifest.json").read_text())


def rejections(manifest: dict) -> dict[str, tuple[str, str]]:
    """source -> (reason, detail) of every rejected input the manifest's examples list."""
    return {ex["source"]: (reason, ex["detail"]) for reason, r in manifest["rejections"].items()
            for ex in r["examples"]}


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to open a TCP connection fails the test: what is refused must never be contacted."""
    def connect(self, address):
        raise AssertionError(f"a connection to {address} was attempted")
    monkeypatch.setattr(socket.socket, "connect", connect)


REAL_GETADDRINFO = socket.getaddrinfo


def fake_resolver(monkeypatch, table: dict[str, list[str]]) -> list[str]:
    """The OS resolver answers names from ``table`` (name -> addresses) only, like a hosts file, so that no
    test sends a DNS query; numeric addresses are parsed as usual (no lookup either). Returns the list of
    names asked."""
    asked = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(fam, str(host))
                return REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except OSError:
                pass
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in table[host]]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.fixture(autouse=True)
def hosts_file(monkeypatch) -> list[str]:
    """Names resolve from a table here (localhost only, unless a test says otherwise), never through DNS."""
    return fake_resolver(monkeypatch, {"localhost": ["127.0.0.1"]})


# --- the classification: no traffic ----------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0x7f.1", "127.0.1",
                                      "0251.0376.0251.0376", "169.254.43518", "0xa9fea9fe", "2852039166",
                                      "00000000000177.1", "0xffffffff", "08.1.1.1", "1.2.3.4.5", "256.1.1.1",
                                      "4294967296", "0x", "1e2", "1.0x", "example.org"])
def test_numeric_hosts_read_as_the_os_reads_them(spelling):
    """An IPv4 host in any spelling means what the OS resolver's inet_aton makes of it (and a name is a name)."""
    try:
        expected = socket.inet_ntoa(socket.inet_aton(spelling))
    except OSError:
        expected = None
    got = numeric_host(spelling)
    assert (str(got) if got is not None else None) == expected
    if expected is not None:  # one trailing dot (a URL's absolute form) changes nothing
        assert str(numeric_host(spelling + ".")) == expected


INTERNAL_URLS = ["http://169.254.169.254/", "http://2852039166/", "http://0xa9fea9fe/", "http://169.254.169.254./",
                      "http://[::ffff:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/", "http://0251.0376.0251.0376/",
                      "http://169.254.43518/", "http://0xa9.0xfe.0xa9.0xfe/", "http://[64:ff9b::a9fe:a9fe]/",
                      "http://[2002:a9fe:a9fe::1]/", "http://[fd00:ec2::254]/", "http://[fe80::1]/",
                      "http://metadata.google.internal./", "http://METADATA.google.internal/",
                      "http://10.0.0.1/", "http://192.168.1.1:8080/", "http://100.64.0.1/", "http://0/",
                      "http://[::]/", "http://[::1]/", "http://224.0.0.251/", "http://255.255.255.255/"]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_addresses_are_refused_in_every_spelling(url, hosts_file, no_connections):
    """Decimal, hex, octal, short forms, trailing dots, IPv4 inside IPv6 (mapped, NAT64, 6to4): each is judged
    by the address it stands for — refused when the list is read and again at fetch time, with nothing sent."""
    policy = SourcePolicy(("http",))
    assert policy.refusal(url, LIST)
    with pytest.raises(NotAllowed, match="--allow-sources http://"):
        policy.addresses(url, LIST)
    with pytest.raises(NotAllowed):
        fetch(url + "latest/meta-data/", policy, LIST, max_bytes=1000, tls=ssl.create_default_context())
    assert hosts_file == [], "a numeric host is never sent to a resolver"


def test_a_name_is_judged_by_every_address_it_resolves_to(monkeypatch, no_connections):
    """A name that resolves to the metadata address (alone, or among public ones) is refused at fetch time;
    a name allowed by name is not; a public name passes the check."""
    fake_resolver(monkeypatch, {"evil.example.org": ["169.254.169.254"], "mixed.example.org": ["93.184.216.34",
                                                                                                "10.1.2.3"],
                                "v6.example.org": ["::ffff:169.254.169.254"], "images.example.org": ["93.184.216.34"]})
    policy = SourcePolicy(("http",))
    for host, address in (("evil", "169.254.169.254"), ("mixed", "10.1.2.3"), ("v6", "169.254.169.254")):
        url = f"http://{host}.example.org/x.jpg"
        assert policy.refusal(url, LIST) == ""  # when the list is read, a name is not resolved
        with pytest.raises(NotAllowed, match=rf"{host}.example.org resolves to .*{address}"):
            policy.addresses(url, LIST)
        with pytest.raises(NotAllowed):
            fetch(url, policy, LIST, max_bytes=1000, tls=ssl.create_default_context())
    assert policy.addresses("http://images.example.org:8080/x.jpg", LIST) == [(socket.AF_INET,
                                                                               ("93.184.216.34", 8080))]
    named = SourcePolicy(("http://evil.example.org",))
    assert named.addresses("http://evil.example.org/x", LIST) == [(socket.AF_INET, ("169.254.169.254", 80))]
    assert SourcePolicy(("http://169.254.169.254",)).refusal("http://169.254.169.254/x", LIST) == ""
    # allowed by name means the host as written: another spelling of it is not the name
    assert SourcePolicy(("http://169.254.169.254",)).refusal("http://0xa9fea9fe/x", LIST)


# --- end to end, on loopback ---------------------------------------------------------------------

def test_spellings_of_loopback_are_refused_and_the_server_is_never_asked(tmp_path):
    """--allow-sources http://127.0.0.1 lets that host through as written; other spellings of it, and a
    name that resolves to it, are refused (not_allowed) and the server counts no request for them."""
    with LoopbackServer({"/ok.jpg": (200, JPEG)}) as server:
        port = server.port
        refused = [f"http://0x7f000001:{port}/ok.jpg", f"http://2130706433:{port}/ok.jpg",
                   f"http://127.1:{port}/ok.jpg", f"http://[::ffff:127.0.0.1]:{port}/ok.jpg",
                   f"http://0177.0.0.1:{port}/ok.jpg", f"http://127.0.0.1.:{port}/ok.jpg",
                   f"http://localhost:{port}/ok.jpg"]  # a name: refused at fetch time, by its address
        m = shard_list(tmp_path, [f"http://127.0.0.1:{port}/ok.jpg", *refused], "http", "http://127.0.0.1")
        assert server.requests == [("/ok.jpg", f"127.0.0.1:{port}")]
    assert m["totals"]["written"] == 1 and m["rejections"]["not_allowed"]["count"] == len(refused)
    got = rejections(m)
    assert set(got) == set(refused)
    assert "127.0.0.1, a loopback address" in got[f"http://0x7f000001:{port}/ok.jpg"][1]
    assert "localhost resolves to 127.0.0.1" in got[f"http://localhost:{port}/ok.jpg"][1]


def test_redirects_are_checked_hop_by_hop_and_bounded(tmp_path):
    """A redirect from the allowed server to another loopback address (127.0.0.2, not allowed) is refused
    and that server is never asked; a redirect on the allowed host is followed; a redirect loop stops
    after 5 hops; a redirect to file:// is refused."""
    with LoopbackServer({"/ok.jpg": (200, OTHER_JPEG)}, host="127.0.0.2") as other, \
            LoopbackServer({"/ok.jpg": (200, JPEG), "/to-other": (302, b"", {"Location": f"{other.url}/ok.jpg"}),
                            "/to-ok": (301, b"", {"Location": "/ok.jpg"}),
                            "/loop": (307, b"", {"Location": "/loop"}),
                            "/to-file": (302, b"", {"Location": "file:///etc/passwd"})}) as server:
        urls = [f"{server.url}/{p}" for p in ("to-other", "to-ok", "loop", "to-file")]
        m = shard_list(tmp_path, urls, "http://127.0.0.1")
        assert other.requests == []
        assert [p for p, _ in server.requests].count("/loop") == 6  # the first request and 5 redirects
    assert m["totals"]["written"] == 1
    got = rejections(m)
    assert got[urls[0]][0] == "not_allowed" and "127.0.0.2, a loopback address" in got[urls[0]][1]
    assert got[urls[2]][0] == "unreadable" and "more than 5 redirects" in got[urls[2]][1]
    assert got[urls[3]][0] == "not_allowed" and "file:///etc/passwd" in got[urls[3]][1]


def test_the_bytes_come_from_the_checked_address(monkeypatch):
    """The name is resolved once, checked, and connected to: a resolver that answers differently when asked
    again (DNS rebinding) is not asked again, and a server at the second address, on the same port, gets
    nothing. The request keeps the URL's host in its Host header (virtual hosts work)."""
    answers = iter(["127.0.0.1"])

    def getaddrinfo(host, port, *args, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.2"), port))]

    with LoopbackServer({"/x.jpg": (200, JPEG)}) as checked, \
            LoopbackServer({"/x.jpg": (200, OTHER_JPEG)}, host="127.0.0.2", port=checked.port) as rebound:
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        body = fetch(f"http://images.test:{checked.port}/x.jpg", SourcePolicy(("http://images.test",)), LIST,
                     max_bytes=10**6, tls=ssl.create_default_context())
        assert rebound.requests == []
        assert checked.requests == [("/x.jpg", f"images.test:{checked.port}")]
    assert body == JPEG


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_to_the_checked_address_verifies_the_urls_host(tmp_path, monkeypatch):
    """Over TLS the connection goes to the checked address and the certificate is verified against the
    URL's host (server name indication included): a certificate for images.test works at images.test and
    is refused when the same server is reached as 127.0.0.1."""
    cert, key = _certificate(tmp_path, "images.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    with LoopbackServer({"/x.jpg": (200, JPEG)}, tls=server_tls) as server:
        fake_resolver(monkeypatch, {"images.test": ["127.0.0.1"]})
        url = f"https://images.test:{server.port}/x.jpg"
        assert fetch(url, SourcePolicy(("https://images.test",)), LIST, max_bytes=10**6, tls=client_tls) == JPEG
        assert server.requests == [("/x.jpg", f"images.test:{server.port}")]
        with pytest.raises(FetchError, match="certificate verify failed"):
            fetch(f"https://127.0.0.1:{server.port}/x.jpg", SourcePolicy(("https://127.0.0.1",)), LIST,
                  max_bytes=10**6, tls=client_tls)


# --- one bad entry never fails a shard ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("entry, reasons", [
    ("http://[::ffff:127.0.0.1]:{port}/ok.jpg", {"not_allowed"}),  # an IPv4-mapped IPv6 host
    ("http://127.1:{port}/ok.jpg", {"not_allowed"}),  # a short IPv4 spelling
    ("http://2130706433:{port}/ok.jpg", {"not_allowed"}),  # a decimal IPv4 spelling
    ("http://localhost.:{port}/ok.jpg", {"unreadable"}),  # a name the (hosts-file) resolver does not know
    ("http://no-such-host.invalid/ok.jpg", {"unreadable"}),  # a name no resolver knows
    ("http://127.0.0.1:{dead}/ok.jpg", {"unreadable"}),  # nothing listens there
    ("http://127.0.0.1:{port}/missing.jpg", {"read_error"}),  # 404
])
def test_an_entry_that_cannot_be_fetched_is_rejected_and_the_shard_completes(tmp_path, capsys, entry, reasons):
    """Each bad entry is rejected with its URL in the detail, the rest of the shard is written, and nothing
    blames the output storage."""
    with LoopbackServer({"/ok.jpg": (200, JPEG)}) as server:
        bad = entry.format(port=server.port, dead=_free_port())
        m = shard_list(tmp_path, [f"{server.url}/ok.jpg", bad], "http", "http://127.0.0.1")
    assert m["totals"] == {**m["totals"], "inputs": 2, "written": 1, "rejected": 1}
    (source, (reason, detail)), = rejections(m).items()
    assert source == bad and reason in reasons
    if reason != "read_error":
        assert bad.split("/")[2].split(":")[0].strip("[]").rstrip(".") in detail
    if reason == "unreadable":
        assert bad in detail
    assert "storage endpoint" not in detail + capsys.readouterr().err


def test_a_dead_storage_endpoint_fails_the_shard_and_names_the_input(tmp_path, capsys, monkeypatch):
    """The storage side keeps its rule: inputs on an object store whose endpoint is down fail their shard
    (a rerun redoes it) rather than being dropped, and the message names the input, not the output."""
    import fsspec

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # credentials: the endpoint is what fails
        monkeypatch.setenv(name, "testing")
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    (tmp_path / "list.jsonl").write_text(json.dumps({"url": "s3://bucket/a.jpg"}) + "\n")
    rc = shard_tool.main([str(tmp_path / "list.jsonl"), "--output", str(tmp_path / "out"), "--workers", "1",
                          "--allow-sources", "s3", "--endpoint-url", f"http://127.0.0.1:{_free_port()}",
                          "--storage-option", "config_kwargs={connect_timeout: 1, retries: {max_attempts: 1}}"])
    err = capsys.readouterr().err
    assert rc == 1 and "1 shard(s) failed" in err
    assert "cannot read input s3://bucket/a.jpg: cannot reach the storage endpoint for s3://bucket/a.jpg" in err
    assert str(tmp_path / "out") not in err
    assert not (tmp_path / "out/manifest.json").exists()


def test_a_response_larger_than_max_bytes_is_not_read(tmp_path):
    """--max-bytes bounds what is read from a server (its Content-Length is enough to refuse), so a huge
    response never fills a worker's memory."""
    with LoopbackServer({"/ok.jpg": (200, JPEG), "/big.jpg": (200, JPEG + b"\0" * 10_000)}) as server:
        (tmp_path / "list.jsonl").write_text("\n".join(json.dumps({"url": f"{server.url}/{name}"})
                                                       for name in ("ok.jpg", "big.jpg")))
        assert shard_tool.main([str(tmp_path / "list.jsonl"), "--output", str(tmp_path / "out"), "--workers", "1",
                                "--min-side", "16", "--allow-sources", "http://127.0.0.1",
                                "--max-bytes", str(len(JPEG) + 100)]) == 0
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert m["totals"]["written"] == 1
    (source, (reason, detail)), = rejections(m).items()
    assert source.endswith("/big.jpg") and reason == "file_too_large" and "Content-Length" in detail
