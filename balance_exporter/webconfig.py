"""`--web.config.file`: TLS and basic auth in the format of Prometheus' exporter-toolkit.

Passwords are stored as bcrypt hashes, as in exporter-toolkit, so the file holds no password.
A successful check is cached (keyed by a SHA-256 of the credentials) because bcrypt is slow on
purpose and Prometheus scrapes often; the checks themselves run on a small thread pool, never
on the event loop.
"""

import asyncio
import hashlib
import hmac
import secrets
import ssl
from base64 import b64decode
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import bcrypt
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from balance_exporter.config import ConfigError, read_config_file, validation_problems

# Probes from an orchestrator carry no credentials, and these pages reveal nothing.
UNAUTHENTICATED_PATHS = frozenset({"/-/healthy", "/-/ready"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TlsServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cert_file: Path
    key_file: Path
    # exporter-toolkit's values (RequireClientCert is its older name of RequireAnyClientCert).
    client_auth_type: Literal[
        "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "RequireClientCert",
        "VerifyClientCertIfGiven", "RequireAndVerifyClientCert",
    ] = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: Literal["TLS12", "TLS13"] = "TLS12"


class WebConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tls_server_config: TlsServerConfig | None = None
    basic_auth_users: dict[Annotated[str, Field(min_length=1)], SecretStr] = {}


def load_web_config(path: Path) -> WebConfig:
    try:
        config = WebConfig.model_validate(read_config_file(path))
    except ValidationError as error:
        problems = validation_problems(error)
        raise ConfigError([f"{path}: {problem}" for problem in problems]) from None
    problems = [
        f"{path}: basic_auth_users.{user}: not a bcrypt hash"
        for user, hashed in config.basic_auth_users.items()
        if not hashed.get_secret_value().startswith(("$2a$", "$2b$", "$2y$"))
    ]
    tls = config.tls_server_config
    if tls is not None:
        # Like exporter-toolkit: relative paths are relative to the web config file.
        tls = tls.model_copy(update={
            name: path.parent / value
            for name in ("cert_file", "key_file", "client_ca_file")
            if (value := getattr(tls, name)) is not None
        })
        config = config.model_copy(update={"tls_server_config": tls})
    if tls is not None:
        problems += [f"{path}: tls_server_config.{problem}"
                     for problem in _client_auth_problems(tls)]
    if problems:
        raise ConfigError(problems)
    return config


# How each client_auth_type is served. exporter-toolkit (Go's crypto/tls) can ask for a client
# certificate without verifying it; Python's ssl module cannot, so:
# - RequestClientCert (asked for, never required nor verified) lets every client in, as not
#   asking does: it is served without asking;
# - RequireAnyClientCert needs client_ca_file here, and the certificate must chain to it: a
#   client without one is refused, as in exporter-toolkit, and so is one whose certificate this
#   side cannot verify (stricter than exporter-toolkit, never looser).
_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


def _client_auth_problems(tls: TlsServerConfig) -> list[str]:
    auth = tls.client_auth_type
    if auth == "NoClientCert" and tls.client_ca_file is not None:
        # As exporter-toolkit: client CAs without a policy that asks for certificates.
        return ["client_ca_file: set, but client_auth_type asks for no client certificate; "
                "set client_auth_type (RequireAndVerifyClientCert, say)"]
    if auth in ("RequireAnyClientCert", "RequireClientCert") and tls.client_ca_file is None:
        return [f"client_ca_file: needed with {auth} here: this exporter verifies every client "
                "certificate it asks for (Python's TLS cannot take one unverified)"]
    if _VERIFY_MODES[auth] != ssl.CERT_NONE and tls.client_ca_file is None:
        return [f"client_ca_file: needed to verify clients ({auth})"]
    return []


def ssl_context(tls: TlsServerConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLS13" else ssl.TLSVersion.TLSv1_2
    )
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            context.load_verify_locations(tls.client_ca_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError([f"tls_server_config: cannot load certificates: {error}"]) from None
    context.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    return context


# bcrypt reads at most 72 bytes of a password; a longer one is refused, never truncated.
BCRYPT_MAX_PASSWORD_BYTES = 72
# bcrypt takes tens to hundreds of milliseconds on purpose: it runs on these threads, never on
# the event loop, and only so many checks may wait for them; past that a request is answered
# 429 at once rather than queued behind a flood of wrong passwords.
BCRYPT_THREADS = 2
MAX_PENDING_CHECKS = 16
MAX_REMEMBERED_LOGINS = 64


def _cost(hashed: bytes) -> int:
    try:
        return int(hashed.split(b"$")[2])
    except (IndexError, ValueError):
        return 12


class BasicAuth:
    """HTTP basic auth against bcrypt hashes. A wrong user costs as much as a wrong password (a
    dummy hash of the same cost is checked), so answers do not tell which users exist."""

    def __init__(self, users: dict[str, SecretStr]) -> None:
        self._hashes = {user: hashed.get_secret_value().encode() for user, hashed in users.items()}
        cost = max((_cost(hashed) for hashed in self._hashes.values()), default=4)
        self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        # Fingerprints of credentials that passed: a scrape every few seconds must not pay bcrypt.
        self._verified: set[bytes] = set()
        self._pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt")
        self._slots = asyncio.Semaphore(MAX_PENDING_CHECKS)

    @staticmethod
    def _credentials(header: str | None) -> tuple[str, bytes] | None:
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        encoded = password.encode()
        return (user, encoded) if len(encoded) <= BCRYPT_MAX_PASSWORD_BYTES else None

    async def _check(self, header: str | None) -> bool | None:
        """True or False, or None when too many checks are waiting already."""
        credentials = self._credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        known = self._hashes.get(user)
        hashed = known if known is not None else self._dummy_hash
        fingerprint = hashlib.sha256(hashed + b"\0" + password).digest()
        if known is not None and any(hmac.compare_digest(fingerprint, seen)
                                     for seen in self._verified):
            return True
        if self._slots.locked():
            return None
        async with self._slots:
            loop = asyncio.get_running_loop()
            matches = await loop.run_in_executor(self._pool, bcrypt.checkpw, password, hashed)
        if matches and known is not None:
            if len(self._verified) >= MAX_REMEMBERED_LOGINS:
                self._verified.clear()
            self._verified.add(fingerprint)
            return True
        return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        verdict = await self._check(request.headers.get("Authorization"))
        if verdict:
            return await handler(request)
        if verdict is None:
            return web.Response(status=429, text="Too many logins being checked\n",
                                headers={"Retry-After": "1"})
        return web.Response(
            status=401,
            text="Unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="balance-exporter"'},
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
