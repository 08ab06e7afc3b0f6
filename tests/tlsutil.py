"""Certificates for TLS tests, made with the openssl command line (as the README shows)."""

from __future__ import annotations

import subprocess
from pathlib import Path

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> Path:
    """A self-signed CA: ``<name>.pem`` and ``<name>.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=edm test {name}", cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem"


def make_cert(directory: Path, name: str, ca: str = "ca", hosts: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    """``<name>.pem`` and ``<name>.key`` signed by the CA ``<ca>``, valid for ``hosts``."""
    alt = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    (directory / f"{name}.ext").write_text(f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\n")
    _openssl(
        "req",
        *_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={hosts[0]}",
        cwd=directory,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.key").chmod(0o644)  # the private server reads it as whoever runs it
    return directory / f"{name}.pem"
