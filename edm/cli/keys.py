"""``edm keys new PATH``: a CURVE key pair in pyzmq's ``zmq.auth`` certificate format.

``PATH.key_secret`` (mode 0600) holds both keys and stays with its owner (the fee receiver's
``plugins.fee.curve.secret_key_file``, or a client); ``PATH.key`` holds the public key alone
and is what the other side is given (a client's goes into ``plugins.fee.curve.clients_dir``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import zmq.auth

from edm.errors import EdmError


def new_pair(path: Path) -> tuple[Path, Path]:
    """Write ``PATH.key`` and ``PATH.key_secret``; EdmError naming the file if one exists.

    The pair is made in a private directory beside them and linked into place, so that
    neither file is ever overwritten, nor seen half written, nor readable by others."""
    public, secret = path.with_name(path.name + ".key"), path.with_name(path.name + ".key_secret")
    for target in (public, secret):
        if target.exists() or target.is_symlink():
            raise EdmError(f"{target}: already exists; not overwritten")
    directory = public.parent
    if not directory.is_dir():
        raise EdmError(f"{directory}: no such directory")
    scratch = Path(tempfile.mkdtemp(prefix=".edm-keys-", dir=directory))
    try:
        made_public, made_secret = zmq.auth.create_certificates(scratch, "pair")
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        linked: list[Path] = []
        try:
            for made, target in ((made_secret, secret), (made_public, public)):
                os.link(made, target)  # fails if it exists by now: never overwritten
                linked.append(target)
        except FileExistsError:
            for target in linked:
                target.unlink()
            raise EdmError(f"{target}: already exists; not overwritten") from None
    except OSError as exc:
        raise EdmError(f"cannot write {path}.key*: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public, secret
