"""Generate TLS certificates and SuperNode authentication keys for a fedmoe deployment.

``python deploy/certs.py OUT_DIR [--san HOST_OR_IP ...] [--supernodes N]`` writes

* ``ca.crt`` / ``ca.key``: a private certificate authority (EC P-256),
* ``server.pem`` / ``server.key``: the SuperLink certificate signed by that CA, valid for
  ``localhost``, ``127.0.0.1``, ``::1`` and every ``--san`` (host names or IP addresses
  SuperNodes and ``flwr`` use to reach the SuperLink, e.g. ``superlink`` in Docker),
* ``supernode-<i>`` / ``supernode-<i>.pub``: one EC P-384 key pair per SuperNode in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` expect).

Everything is generated with the ``cryptography`` package Flower already depends on (no
``openssl`` binary needed). Private keys (``ca.key``, ``server.key``, ``supernode-<i>``) are
created with mode ``0600``, never readable by others even while being written; only
``ca.crt``, ``server.pem`` and ``supernode-<i>.pub`` are 0644. Keep ``ca.key`` offline: no
service needs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`make_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: list[Path] = field(default_factory=list)

    def public_key(self, index: int) -> Path:
        """Path of SuperNode ``index``'s OpenSSH public key."""
        return Path(f"{self.supernode_keys[index]}.pub")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; a ``private`` file is created with mode 0600.

    The bytes go to a new temporary file in the same folder, created with the final mode
    (``0o600`` for keys, ``0o644`` otherwise, narrowed further by the umask), which then
    replaces ``path``: a key is never readable by others, not even while it is written,
    and an existing world-readable file at ``path`` is replaced, not rewritten in place.
    """
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def supernode_keypair(private_path: Path) -> Path:
    """Write an EC P-384 key pair in OpenSSH format; return the public key's path.

    Parameters
    ----------
    private_path : Path
        Where the private key goes; the public key is written next to it with ``.pub``.

    Returns
    -------
    Path
        The public key file (``ecdsa-sha2-nistp384 ...``), for ``flwr supernode register``.

    """
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
    )
    pub = Path(f"{private_path}.pub")
    _write(
        pub,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n",
    )
    return pub


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Key usage of the CA (signs certificates and CRLs) or of the server (ECDH key agreement)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certificates,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    not_before: dt.datetime, not_after: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the private CA: a new EC P-256 key and its self-signed certificate.

    The certificate may sign certificates (no intermediate CAs below it) and carries a
    subject key identifier, which the server certificate names as its authority key.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert


def _server_certificate(
    names: Sequence[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the SuperLink's new EC P-256 key and its server certificate, signed by the CA.

    The certificate's common name is ``names[0]``; every one of ``names`` (DNS names or IP
    addresses) is a subject alternative name.
    """
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return server_key, server_cert


def make_certificates(
    out_dir: str | Path,
    *,
    sans: Iterable[str] = (),
    supernodes: int = 0,
    days: int = 365,
) -> CertPaths:
    """Create a CA, a SuperLink server certificate and SuperNode key pairs in ``out_dir``.

    Parameters
    ----------
    out_dir : str | Path
        Folder to write into (created if missing; existing files are overwritten).
    sans : Iterable[str]
        Extra subject alternative names (DNS names or IP addresses) of the SuperLink, on
        top of ``localhost``, ``127.0.0.1`` and ``::1``.
    supernodes : int
        How many SuperNode authentication key pairs to create (``supernode-0`` ...).
    days : int
        Validity of the certificates.

    Returns
    -------
    CertPaths
        The paths of everything written.

    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key, ca_cert = _ca_certificate(now, until)
    names = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    server_key, server_cert = _server_certificate(names, ca_cert, ca_key, now, until)

    paths = CertPaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _pem_key(server_key), private=True)
    for i in range(supernodes):
        priv = out / f"supernode-{i}"
        supernode_keypair(priv)
        paths.supernode_keys.append(priv)
    return paths


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``deploy/certs.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for ca.crt, server.pem, server.key, supernode-<i>[.pub]")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        help="extra SuperLink host name or IP (repeatable), e.g. --san superlink --san 10.0.0.5",
    )
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNode key pairs to create")
    parser.add_argument("--days", type=int, default=365)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    paths = make_certificates(args.out_dir, sans=args.san, supernodes=args.supernodes, days=args.days)
    print(f"CA:           {paths.ca_cert}")
    print(f"SuperLink:    {paths.server_cert} {paths.server_key}")
    for i, key in enumerate(paths.supernode_keys):
        print(f"SuperNode {i}:  {key} (register {paths.public_key(i)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
