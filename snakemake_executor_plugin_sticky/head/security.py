"""TLS credentials made for each run: every connection of the engine (scheduler, client, Nannies,
workers) presents and requires them, on loopback too.

Shared login and GPU nodes are multi-user, and any user of a node can reach its loopback ports.
Without authentication another user could connect to the scheduler or a worker, send pickled
tasks and run code as you, inside the processes that hold your GPUs and data. With the run's
credentials required on every port, a client without them is refused at the TLS handshake.

The credentials are a self-signed certificate (its own CA) and its key, made fresh for each run.
Local workers get them in memory (they travel with the worker's start arguments, never through a
file of the run; Dask writes them to a private temporary folder for the moment it loads them
into a TLS context, as Python's ssl loads keys only from files); batch jobs on other nodes read
them from files that only the user can read, removed when the run ends (see runs.py for what a
run that died leaves).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from distributed.security import Security

# Dask checks certificates against the CA, not host names; its own temporary credentials use this name.
COMMON_NAME = "dask-internal"


def run_credentials() -> Security:
    """A certificate and key made for this run, held in memory, required on every connection.
    An elliptic-curve key: made in about a millisecond (RSA-2048 takes tens), with faster handshakes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of other nodes may lag
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COMMON_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return required_everywhere(cert_pem, key_pem)


def required_everywhere(cert: str, key: str) -> Security:
    """One certificate (its own CA) and key for every role (client, scheduler, worker), with TLS
    required: a role left out would be a port without the run's credentials. `cert` and `key`
    are PEM text or the paths of PEM files."""
    return Security(
        require_encryption=True,
        tls_ca_file=cert,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def write_credentials(security: Security, directory: Path) -> Security:
    """The same credentials as files, for workers that start elsewhere (batch jobs): a folder only
    the user can enter, files only the user can read. Returns a Security that names the files."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    paths = {}
    for name, pem in (("cert.pem", security.tls_ca_file), ("key.pem", security.tls_client_key)):
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        paths[name] = str(path)
    return required_everywhere(paths["cert.pem"], paths["key.pem"])
