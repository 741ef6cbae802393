"""A throwaway PKI for TLS tests, made with ``cryptography``.

``make_pki(directory)`` writes a CA, a server certificate for 127.0.0.1 / localhost and
hands out client certificates on demand (subject CN = the station identity), all as PEM
files in ``directory``. EC P-256 keys keep generation fast.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_FROM = datetime.now(UTC) - timedelta(days=1)
_VALID_TO = _VALID_FROM + timedelta(days=30)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ocpp-router tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class Pki:
    """Paths of a CA and a server certificate; :meth:`client` issues client certificates."""

    directory: Path
    ca_cert: Path
    ca_key_obj: ec.EllipticCurvePrivateKey
    ca_obj: x509.Certificate
    server_cert: Path
    server_key: Path
    _clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def client(self, common_name: str) -> tuple[Path, Path]:
        """(cert, key) PEM paths of a client certificate with this subject CN."""
        if common_name not in self._clients:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(_name(common_name))
                .issuer_name(self.ca_obj.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_VALID_FROM)
                .not_valid_after(_VALID_TO)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                )
                .sign(self.ca_key_obj, hashes.SHA256())
            )
            safe = "".join(ch if ch.isalnum() else "_" for ch in common_name)
            index = len(self._clients)
            cert_path = self.directory / f"client-{index}-{safe}.pem"
            key_path = self.directory / f"client-{index}-{safe}.key"
            _write_cert(cert_path, cert)
            _write_key(key_path, key)
            self._clients[common_name] = (cert_path, key_path)
        return self._clients[common_name]

    def client_context(self, client_cn: str | None = None) -> ssl.SSLContext:
        """A client TLS context trusting this CA, presenting a client certificate with
        subject CN ``client_cn`` if given."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        if client_cn is not None:
            cert, key = self.client(client_cn)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def make_pki(directory: Path, ca_name: str = "Test Root CA") -> Pki:
    """Create a CA and a server certificate (SAN 127.0.0.1, localhost) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_VALID_FROM)
        .not_valid_after(_VALID_TO)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_VALID_FROM)
        .not_valid_after(_VALID_TO)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca_cert": directory / "ca.pem",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server.key",
    }
    _write_cert(paths["ca_cert"], ca)
    _write_cert(paths["server_cert"], server)
    _write_key(paths["server_key"], server_key)
    return Pki(
        directory=directory,
        ca_cert=paths["ca_cert"],
        ca_key_obj=ca_key,
        ca_obj=ca,
        server_cert=paths["server_cert"],
        server_key=paths["server_key"],
    )
