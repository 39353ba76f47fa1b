"""The team's object store (SeaweedFS) closed below S3: every port needs a key, not only S3's.

`weed server` runs a master, a volume server and a filer behind the S3 gateway, each with an HTTP
and a gRPC port on 127.0.0.1, which any local user can reach. Without this module they answer
anyone: list the buckets, read an artifact, plant a file that S3 then serves. With it
(`write(folder, secrets)`, a `security.toml` that every `weed` process reads from its working
folder):

- the master's and the filer's HTTP APIs are off (`-disableHttp`, `-filer.disableHttp`: the S3
  gateway talks to them over gRPC only);
- every gRPC port takes only clients that show a certificate of the stack's own authority
  (mutual TLS), made here once: the authority's key never leaves the stack's private folder;
- the volume servers' HTTP API, which carries the data, takes only requests with a JWT signed by
  the stack's keys, for reading as for writing (the master hands those out to its gRPC clients);
- their unix sockets live in the stack's private folder, not under /tmp (`socket_flags`).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

#: The components with a certificate: each gRPC server, and the client side they all use.
COMPONENTS = ("master", "volume", "filer", "s3", "client")
#: The secrets (in the stack's secrets.json) that sign the volume servers' and the filer's JWTs.
JWT_SECRETS = ("s3_jwt_write", "s3_jwt_read", "s3_filer_jwt_write", "s3_filer_jwt_read")
VALID_DAYS = 3650


def write(folder: Path, secrets: dict[str, str], write_private) -> Path:
    """`folder`/security.toml and its certificates (made once, in `folder`/tls); returns the toml.
    `write_private(path, text)` writes a file only its owner reads."""
    tls = folder / "tls"
    if not all((tls / f"{name}.key").is_file() for name in ("ca", *COMPONENTS)):
        _make_certificates(tls, write_private)
    names = ",".join(COMPONENTS)
    lines = [
        "# Written by `python -m ops.team up` (ops/team/security.py): do not edit, it is rewritten.",
        "[jwt.signing]",
        f'key = "{secrets["s3_jwt_write"]}"',
        "expires_after_seconds = 60",
        "[jwt.signing.read]",
        f'key = "{secrets["s3_jwt_read"]}"',
        "expires_after_seconds = 60",
        "[jwt.filer_signing]",
        f'key = "{secrets["s3_filer_jwt_write"]}"',
        "expires_after_seconds = 60",
        "[jwt.filer_signing.read]",
        f'key = "{secrets["s3_filer_jwt_read"]}"',
        "expires_after_seconds = 60",
        "[access]",
        "ui = false",
        "[grpc]",
        f'ca = "{tls / "ca.crt"}"',
    ]
    for name in COMPONENTS[:-1]:
        lines += [
            f"[grpc.{name}]",
            f'cert = "{tls / f"{name}.crt"}"',
            f'key = "{tls / f"{name}.key"}"',
            f'allowed_commonNames = "{names}"',
        ]
    lines += ["[grpc.client]", f'cert = "{tls / "client.crt"}"', f'key = "{tls / "client.key"}"']
    toml = folder / "security.toml"
    write_private(toml, "\n".join(lines) + "\n")
    return toml


def socket_flags(private: Path) -> list[str]:
    """`weed server` flags that put the filer's and the S3 gateway's unix sockets in `private`."""
    return [f"-filer.localSocket={private / 'filer.sock'}", f"-s3.localSocket={private / 's3.sock'}"]


def _make_certificates(tls: Path, write_private) -> None:
    """A certificate authority of the stack's own, and a certificate it signs for each component
    (its common name the component's, valid for 127.0.0.1 and localhost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key) -> str:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    def certificate(name: str, key, issuer_name, issuer_key, authority: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True)
        )
        if not authority:
            names = [x509.DNSName("localhost"), x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "team store authority")])
    ca = certificate("team store authority", ca_key, ca_name, ca_key, authority=True)
    write_private(tls / "ca.crt", ca.public_bytes(serialization.Encoding.PEM).decode())
    for name in COMPONENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        signed = certificate(name, key, ca_name, ca_key, authority=False)
        write_private(tls / f"{name}.crt", signed.public_bytes(serialization.Encoding.PEM).decode())
        write_private(tls / f"{name}.key", pem_key(key))
    write_private(tls / "ca.key", pem_key(ca_key))  # last: its presence says the set is whole
