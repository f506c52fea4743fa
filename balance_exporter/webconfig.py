"""`--web.config.file`: TLS and basic auth in the format of Prometheus' exporter-toolkit.

Passwords are stored as bcrypt hashes, as in exporter-toolkit, so the file holds no password.
A successful check is cached (keyed by a SHA-256 of the credentials) because bcrypt is slow on
purpose and Prometheus scrapes often.
"""

import hashlib
import hmac
import ssl
from base64 import b64decode
from collections.abc import Awaitable, Callable
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
    client_auth_type: Literal[
        "NoClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven",
        "RequireAndVerifyClientCert",
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
    if tls is not None and tls.client_auth_type.startswith(("Verify", "RequireAndVerify")) and (
        tls.client_ca_file is None
    ):
        problems.append(f"{path}: tls_server_config.client_ca_file: needed to verify clients")
    if problems:
        raise ConfigError(problems)
    return config


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
    context.verify_mode = {
        "NoClientCert": ssl.CERT_NONE,
        "RequireAnyClientCert": ssl.CERT_OPTIONAL,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }[tls.client_auth_type]
    return context


class BasicAuth:
    def __init__(self, users: dict[str, SecretStr]) -> None:
        self._hashes = {user: hashed.get_secret_value().encode() for user, hashed in users.items()}
        self._verified: set[bytes] = set()

    def _check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self._hashes.get(user)
        if hashed is None:
            return False
        fingerprint = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        if any(hmac.compare_digest(fingerprint, seen) for seen in self._verified):
            return True
        if bcrypt.checkpw(password.encode(), hashed):
            self._verified.add(fingerprint)
            return True
        return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNAUTHENTICATED_PATHS or self._check(
            request.headers.get("Authorization")
        ):
            return await handler(request)
        return web.Response(
            status=401,
            text="Unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="balance-exporter"'},
        )
