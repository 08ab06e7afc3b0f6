"""CURVE for the fee receiver (``plugins.fee.curve``): who may talk to it.

The ROUTER is a CURVE server with the key pair of ``secret_key_file``; libzmq asks pyzmq's
ZAP handler (``zmq.auth.thread.ThreadAuthenticator``, on the receiver's context) about each
client's public key during the handshake, and the handler asks the Gate: a key is allowed
when a certificate in ``clients_dir`` holds it. A refused client never completes the
handshake, so none of its messages reach the receiver: no reply, nothing stored. The
directory is read at start and again on reload.

pyzmq's handler logs each attempt at DEBUG only; the Gate logs a refused key at WARNING
once per key (up to MAX_WARNED keys) until the next reload: a client program that keeps
trying would flood the log with a line per attempt. A client that speaks no CURVE at all
is refused by libzmq at the greeting, before any handler hears of it; fee_guard logs that
one, by its address.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edm.errors import EdmError
from edm.plugins.fee.config import FeeCurve

log = logging.getLogger(__name__)

MAX_WARNED = 10_000  # refused keys remembered (a hostile client can make new keys at will)


def load_server_keys(curve: FeeCurve) -> tuple[bytes, bytes]:
    """The server's (public, secret) keys; EdmError naming the key when the file is unusable."""
    try:
        public, secret = zmq.auth.load_certificate(curve.secret_key_file)
    except (OSError, ValueError) as exc:
        raise EdmError(f"plugins.fee.curve.secret_key_file: {curve.secret_key_file}: {exc}") from None
    if not secret:
        raise EdmError(
            f"plugins.fee.curve.secret_key_file: {curve.secret_key_file} holds no secret key "
            "(give the .key_secret file made by `edm keys new`)"
        )
    return public, secret


def allowed_keys(clients_dir: Path) -> frozenset[bytes]:
    """The z85 public keys of the certificates (``*.key``) in ``clients_dir``."""
    try:
        return frozenset(zmq.auth.load_certificates(clients_dir))
    except (OSError, ValueError) as exc:
        raise EdmError(f"plugins.fee.curve.clients_dir: {clients_dir}: {exc}") from None


class Gate:
    """The ZAP handler's credentials provider: ``callback`` runs in the handler's thread."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], curve: FeeCurve) -> None:
        self._clients_dir = curve.clients_dir
        self._allowed = allowed_keys(curve.clients_dir)
        self._warned: set[bytes] = set()
        self._lock = threading.Lock()
        self.refused = 0
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        log.info("CURVE: %d client key(s) allowed from %s.", len(self._allowed), self._clients_dir)

    def reload(self, curve: FeeCurve) -> None:
        """Read ``clients_dir`` again; a directory that cannot be read keeps the keys in force."""
        try:
            allowed = allowed_keys(curve.clients_dir)
        except EdmError as exc:
            log.error("%s; keeping the %d client key(s) in force.", exc, len(self._allowed))
            return
        with self._lock:
            self._clients_dir, self._allowed = curve.clients_dir, allowed
            self._warned.clear()  # a key refused again after this reload is worth a line again
        log.info("CURVE: %d client key(s) allowed from %s.", len(allowed), curve.clients_dir)

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            if key in self._allowed:
                return True
            self.refused += 1
            first = key not in self._warned and len(self._warned) < MAX_WARNED
            if first:
                self._warned.add(key)
        if first:
            log.warning(
                "Refused a fee client whose CURVE key %s is not in %s; its further attempts "
                "are refused without a log line.",
                key.decode("ascii", "replace"),
                self._clients_dir,
            )
        return False

    def stop(self) -> None:
        self._auth.stop()
