"""The job token and signed control commands (inject, fence, spawn).

Anyone who can reach a job's store port could otherwise kill any rank. So the launcher
creates a random token per job, keeps it in the run directory readable by its owner only
(``contract.TOKEN_FILE``, mode 0600) and hands it to its workers (``contract.ENV_TOKEN``).
A control command is stored as ``{"cmd": COMMAND, "hmac": HEX}`` where HEX is
``HMAC-SHA256(token, KEY + "\\n" + COMMAND)``: binding the key means a signed value copied
under another key (another rank's fence, another inject slot) does not verify. Readers
that hold a token act only on values that verify and log one line per refused key.

A reader without a token (ranks as threads, plain torchrun) accepts plain values, as
before tokens existed. Torch-free: the launcher, the CLIs and the workers import it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Mapping
from hashlib import sha256

from odyssey import contract

TOKEN_BYTES = 32


class TokenError(RuntimeError):
    """No usable job token where one is needed (the message says what to do)."""


def new_token() -> str:
    """A fresh random job token (hex)."""
    return secrets.token_hex(TOKEN_BYTES)


def digest(token: str, key: str, command: str) -> str:
    """HMAC-SHA256 of ``key + "\\n" + command`` under ``token``, hex."""
    return hmac.new(token.encode(), f"{key}\n{command}".encode(), sha256).hexdigest()


def sign(token: str | None, key: str, command: str) -> str:
    """The value to store under ``key`` for ``command`` (plain if there is no token)."""
    if token is None:
        return command
    return json.dumps({"cmd": command, "hmac": digest(token, key, command)})


def verify(token: str | None, key: str, value: str) -> str | None:
    """The command in ``value`` if it is validly signed for ``key``, else None.

    Without a token (an unsigned job) every value is accepted: a signed one is unwrapped,
    anything else is the command itself.
    """
    try:
        body = json.loads(value)
        signed = isinstance(body, dict) and set(body) == {"cmd", "hmac"}
    except ValueError:
        signed = False
    if token is None:
        return str(body["cmd"]) if signed else value
    if not signed or not isinstance(body["cmd"], str) or not isinstance(body["hmac"], str):
        return None
    ok = hmac.compare_digest(digest(token, key, body["cmd"]), body["hmac"])
    return body["cmd"] if ok else None


def token_check(token: str) -> str:
    """The value of ``contract.TOKEN_CHECK`` for ``token`` (reveals nothing about it)."""
    return digest(token, contract.TOKEN_CHECK, "")


def token_matches(token: str, published: str) -> bool:
    """True if ``token`` is the one whose :func:`token_check` is ``published``."""
    return hmac.compare_digest(token_check(token), published)


class CommandGate:
    """Opens the signed commands one reader finds; one log line per refused key."""

    def __init__(self, token: str | None, log: logging.Logger, who: str) -> None:
        self.token = token
        self.log = log
        self.who = who
        self._refused: dict[str, str] = {}

    def open(self, key: str, value: str) -> str | None:
        """The command, or None (logged once per key and value) if it does not verify."""
        command = verify(self.token, key, value)
        if command is None and self._refused.get(key) != value:
            self._refused[key] = value
            self.log.warning("%s: ignoring %s: not signed with this job's token (%r)",
                             self.who, key, value[:80])
        return command


# --- where the token lives ------------------------------------------------------------
def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The token the launcher exported to this worker (None outside ``odyssey run``)."""
    return (os.environ if env is None else env).get(contract.ENV_TOKEN) or None


def write_token(run_dir: str, token: str) -> str:
    """Write ``token`` to ``<run_dir>/job-token`` with mode 0600; returns the path."""
    path = os.path.join(run_dir, contract.TOKEN_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, an old file cannot either
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)  # readers never see half a token
    return path


def read_token(path: str) -> str:
    """The token in a token file (a run directory's, or one given with --token-file)."""
    if os.path.isdir(path):
        path = os.path.join(path, contract.TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as err:
        raise TokenError(f"cannot read the job token from {path}: {err.strerror}") from None
    if not token:
        raise TokenError(f"{path} holds no job token")
    return token
