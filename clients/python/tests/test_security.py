"""Tokens and TLS against real servers: principals from a config file,
certificates made here with ``cryptography``."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import FreshdServer

import freshd

# ------------------------------------------------------------ certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Pki:
    """A CA and the certificates it signs."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, name: str) -> "Pki":
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"freshd test CA {name}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, names: List[str], client: bool) -> Tuple[bytes, bytes]:
        """A certificate and its key, PEM."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        sans: List[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}-ca.pem"
        path.write_bytes(self.pem)
        return path


@dataclass
class Files:
    """PEM files of a server CA, the server, a client CA and a client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("pki")
    servers, clients, stranger = Pki.new("servers"), Pki.new("clients"), Pki.new("stranger")
    server_cert, server_key = servers.leaf(["localhost", "127.0.0.1"], client=False)
    client_cert, client_key = clients.leaf(["client.example"], client=True)
    files = Files(
        ca=servers.write(d),
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_ca=clients.write(d),
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        stranger_ca=stranger.write(d),
    )
    files.server_cert.write_bytes(server_cert)
    files.server_key.write_bytes(server_key)
    files.client_cert.write_bytes(client_cert)
    files.client_key.write_bytes(client_key)
    return files


# -------------------------------------------------------------- principals

#: Each principal's token; the server's config holds only their hashes.
TOKENS: Dict[str, str] = {name: "fd_" + secrets.token_urlsafe(32) for name in ("admin", "feed")}

SCOPES = {
    "admin": '{ "*" = ["check", "watch", "fill", "publish", "purge", "admin"] }',
    "feed": '{ feed = ["check", "watch", "fill"], "*" = ["check"] }',
}


def write_config(directory: Path, quotas: Optional[Dict[str, str]] = None) -> Path:
    lines = []
    for name, token in TOKENS.items():
        lines += [
            "[[auth.principals]]",
            f'name = "{name}"',
            f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"',
            f"scopes = {SCOPES[name]}",
        ]
        if quotas and name in quotas:
            lines.append(f"quotas = {quotas[name]}")
        lines.append("")
    path = directory / "freshd.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def authed(start_server, tmp_path: Path) -> FreshdServer:  # type: ignore[no-untyped-def]
    """A plaintext loopback server with principals."""
    return start_server({"config": write_config(tmp_path)})  # type: ignore[no-any-return]


@pytest.fixture
def tls_server(start_server, tmp_path: Path, pki: Files) -> FreshdServer:  # type: ignore[no-untyped-def]
    """A TLS server with principals."""
    return start_server(  # type: ignore[no-any-return]
        {
            "config": write_config(tmp_path),
            "tls_cert": pki.server_cert,
            "tls_key": pki.server_key,
        }
    )


@pytest.fixture
def mtls_server(start_server, tmp_path: Path, pki: Files) -> FreshdServer:  # type: ignore[no-untyped-def]
    """A server that requires a client certificate from the client CA."""
    return start_server(  # type: ignore[no-any-return]
        {
            "config": write_config(tmp_path),
            "tls_cert": pki.server_cert,
            "tls_key": pki.server_key,
            "tls_client_ca": pki.client_ca,
        }
    )


# ------------------------------------------------------------------ tokens


def test_a_known_token_is_accepted(authed: FreshdServer) -> None:
    with freshd.Client(authed.addr, token=TOKENS["admin"], timeout=5) as client:
        published = client.publish(["feed:1"])
        assert client.check("feed:1").version == published.seq
        assert client.stats().seq == published.seq


def test_a_missing_or_unknown_token_is_unauthenticated(authed: FreshdServer) -> None:
    with freshd.Client(authed.addr, timeout=5) as client:
        with pytest.raises(freshd.Unauthenticated) as missing:
            client.check("feed:1")
    assert "requires a token" in missing.value.details
    assert missing.value.code_name == "UNAUTHENTICATED"
    with freshd.Client(authed.addr, token="fd_not_a_known_token", timeout=5) as client:
        with pytest.raises(freshd.Unauthenticated, match="unknown token"):
            client.check("feed:1")
        with pytest.raises(freshd.Unauthenticated):
            client.watch(subscribe=["feed:"], start_timeout=5)


def test_out_of_scope_calls_are_permission_denied(authed: FreshdServer) -> None:
    with freshd.Client(authed.addr, token=TOKENS["feed"], timeout=5) as client:
        client.fill("feed:1", ["posts:1"])  # fill in feed, check on "*"
        assert client.check("posts:1").seq >= 0
        with pytest.raises(freshd.PermissionDenied) as denied:
            client.publish(["feed:1"])
        message = denied.value.details
        assert '"feed"' in message and '"publish"' in message, message
        with pytest.raises(freshd.PermissionDenied, match="watch"):
            client.watch(subscribe=["posts:"], start_timeout=5)


def test_a_quota_is_resource_exhausted_naming_it(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server({"config": write_config(tmp_path, {"feed": "{ streams = 1 }"})})
    with freshd.Client(server.addr, token=TOKENS["feed"], timeout=5) as client:
        with client.watch(subscribe=["feed:"]):
            with pytest.raises(freshd.ResourceExhausted, match="quota streams"):
                client.watch(subscribe=["feed:"], start_timeout=5)


def test_unusable_settings_are_refused_before_connecting(pki: Files) -> None:
    for bad in ("", "two words", "caf\u00e9"):
        with pytest.raises(ValueError, match="token"):
            freshd.Client("127.0.0.1:1", token=bad)
    with pytest.raises(ValueError, match="https://"):
        freshd.Client("http://127.0.0.1:1", root_certificates=pki.ca)
    with pytest.raises(ValueError, match="cannot read"):
        freshd.Client("127.0.0.1:1", root_certificates="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="both"):
        freshd.Client("127.0.0.1:1", certificate_chain=pki.client_cert)
    assert "fd_" not in repr(freshd.client._BearerToken(TOKENS["admin"]))


# --------------------------------------------------------------------- TLS


def test_tls_with_a_ca_file_bytes_or_text(tls_server: FreshdServer, pki: Files) -> None:
    for ca in (pki.ca, str(pki.ca), pki.ca.read_bytes(), pki.ca.read_text()):
        with freshd.Client(
            tls_server.addr,
            token=TOKENS["admin"],
            root_certificates=ca,
            server_name="localhost",
            timeout=5,
        ) as client:
            assert client.tls
            client.publish(["feed:1"])
    # The certificate names 127.0.0.1 too: no override needed, https:// works.
    with freshd.Client(
        f"https://{tls_server.addr}", token=TOKENS["admin"], root_certificates=pki.ca, timeout=5
    ) as client:
        client.check("feed:1")


def test_tls_refuses_a_server_from_another_ca(tls_server: FreshdServer, pki: Files) -> None:
    with freshd.Client(
        tls_server.addr,
        token=TOKENS["admin"],
        root_certificates=pki.stranger_ca,
        server_name="localhost",
        timeout=3,
    ) as client:
        with pytest.raises(freshd.Unavailable):
            client.check("feed:1")
    # Nor does plaintext get anywhere.
    with freshd.Client(tls_server.addr, token=TOKENS["admin"], timeout=3) as client:
        with pytest.raises(freshd.FreshdError):
            client.check("feed:1")


def test_mutual_tls_needs_a_client_certificate(mtls_server: FreshdServer, pki: Files) -> None:
    with freshd.Client(
        mtls_server.addr,
        token=TOKENS["admin"],
        root_certificates=pki.ca,
        certificate_chain=pki.client_cert,
        private_key=pki.client_key,
        server_name="localhost",
        timeout=5,
    ) as client:
        client.publish(["feed:1"])
        # The handshake passes; the token is still required.
        with freshd.Client(
            mtls_server.addr,
            root_certificates=pki.ca,
            certificate_chain=pki.client_cert.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            server_name="localhost",
            timeout=5,
        ) as anonymous:
            with pytest.raises(freshd.Unauthenticated):
                anonymous.check("feed:1")
    with freshd.Client(
        mtls_server.addr,
        token=TOKENS["admin"],
        root_certificates=pki.ca,
        server_name="localhost",
        timeout=3,
    ) as no_certificate:
        with pytest.raises(freshd.Unavailable):
            no_certificate.check("feed:1")


def test_a_watch_stream_over_tls_with_a_token_gets_notices(
    tls_server: FreshdServer, pki: Files
) -> None:
    def client(name: str) -> freshd.Client:
        return freshd.Client(
            tls_server.addr,
            token=TOKENS[name],
            root_certificates=pki.ca,
            server_name="localhost",
            timeout=5,
        )

    with client("feed") as reader, client("admin") as writer:
        with reader.watch(client_id="reader", subscribe=["feed:"]) as stream:
            published = writer.publish(["feed:user:1"])
            synced = stream.sync(timeout=5)
            assert [(n.key, n.seq) for n in synced.notices] == [("feed:user:1", published.seq)]
            # Past the reader's scope, nothing arrives and nothing fails.
            writer.publish(["posts:1"])
            assert stream.sync(timeout=5).notices == ()


def test_a_cause_past_the_scope_is_hidden_and_is_not_a_repair(authed: FreshdServer) -> None:
    # feed:1 depends on posts:1, which the feed principal may not see: its
    # notice comes with the cause hidden, and is an ordinary change.
    with (
        freshd.Client(authed.addr, token=TOKENS["admin"], timeout=5) as writer,
        freshd.Client(authed.addr, token=TOKENS["feed"], timeout=5) as reader,
    ):
        writer.fill("feed:1", ["posts:1"])
        with reader.watch(client_id="reader", track=["feed:1"]) as stream:
            published = writer.publish(["posts:1"])
            synced = stream.sync(timeout=5)
            assert [(n.key, n.seq, n.cause, n.repair) for n in synced.notices] == [
                ("feed:1", published.seq, "", False)
            ]
            assert not synced.notices[0].is_repair


def test_a_near_cache_works_over_tls_with_a_token(tls_server: FreshdServer, pki: Files) -> None:
    origin = {"posts:1": "hello"}

    def load() -> Tuple[str, List[str]]:
        return origin["posts:1"], ["posts:1"]

    with (
        freshd.Client(
            tls_server.addr,
            token=TOKENS["admin"],
            root_certificates=pki.ca,
            server_name="localhost",
            timeout=5,
        ) as client,
        freshd.NearCache(client, on_error="raise") as cache,
    ):
        assert cache.wait_watching(5)
        assert cache.get("feed:1", load) == "hello"
        origin["posts:1"] = "edited"
        client.publish(["posts:1"])
        assert cache.get("feed:1", load) == "edited"
