"""`--web.config.file`: basic auth and TLS over a real socket, and the web configs refused."""

import asyncio
import ssl
import subprocess
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from balance_exporter.config import ConfigError
from balance_exporter.exposition import ExpositionCache
from balance_exporter.server import build_app
from balance_exporter.webconfig import (
    MAX_PENDING_CHECKS,
    MAX_REMEMBERED_LOGINS,
    BasicAuth,
    load_web_config,
    ssl_context,
)
from tests.conftest import Serve
from tests.helpers import fixed_store

PASSWORD = "TOPSECRET-password"


def write_web_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


async def test_basic_auth_guards_everything_but_the_probes(
    tmp_path: Path, http: aiohttp.ClientSession, serve: Serve
) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = load_web_config(write_web_config(
        tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n"))
    assert PASSWORD not in repr(config)
    auth = BasicAuth(config.basic_auth_users)
    url = await serve(build_app(ExpositionCache(fixed_store()), middlewares=(auth.middleware,)))
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 401
        assert "Basic" in response.headers["WWW-Authenticate"]
    wrong = {"Authorization": aiohttp.encode_basic_auth("prometheus", "wrong")}
    async with http.get(f"{url}/metrics", headers=wrong) as response:
        assert response.status == 401
    right = {"Authorization": aiohttp.encode_basic_auth("prometheus", PASSWORD)}
    for _ in range(2):  # the second time from the cache
        async with http.get(f"{url}/metrics", headers=right) as response:
            assert response.status == 200
    async with http.get(f"{url}/-/healthy") as response:
        assert response.status == 200


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1, made with openssl; returns its folder."""
    subprocess.run([
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
    ], check=True, capture_output=True)
    return tmp_path


async def test_tls_from_the_web_config(
    certificate: Path, http: aiohttp.ClientSession, serve: Serve
) -> None:
    config = load_web_config(write_web_config(
        certificate, "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"))
    assert config.tls_server_config is not None
    url = await serve(build_app(ExpositionCache(fixed_store())),
                      ssl_context(config.tls_server_config))
    assert url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
    async with http.get(f"{url}/metrics", ssl=trust) as response:
        assert response.status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await http.get(f"{url}/metrics")  # the self-signed certificate is not trusted by default


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def client_certificates(certificate: Path) -> Path:
    """Beside the server's: a client CA, a client certificate it signed, and a stranger's
    self-signed one (all made with openssl)."""
    folder = certificate
    for name in ("ca", "stranger"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                f"/CN={name}", "-keyout", str(folder / f"{name}.key"),
                "-out", str(folder / f"{name}.pem"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=prometheus",
            "-keyout", str(folder / "client.key"), "-out", str(folder / "client.csr"))
    openssl("x509", "-req", "-in", str(folder / "client.csr"), "-CA", str(folder / "ca.pem"),
            "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "1",
            "-out", str(folder / "client.pem"))
    return folder


async def scrape_status(url: str, folder: Path, client: str | None) -> int | None:
    """The /metrics status for a client presenting `client`'s certificate (or none); None when
    the TLS handshake refused it."""
    trust = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    if client is not None:
        trust.load_cert_chain(folder / f"{client}.pem", folder / f"{client}.key")
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{url}/metrics", ssl=trust) as response:
            return response.status
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return None


# Who gets in, per client_auth_type: no certificate, one the client CA signed, a stranger's.
@pytest.mark.parametrize(("auth_type", "with_ca", "none", "signed", "stranger"), [
    ("NoClientCert", False, 200, 200, 200),
    ("RequestClientCert", False, 200, 200, 200),
    ("RequestClientCert", True, 200, 200, 200),
    ("RequireAnyClientCert", True, None, 200, None),  # stricter than Go: verified
    ("RequireClientCert", True, None, 200, None),
    ("VerifyClientCertIfGiven", True, 200, 200, None),
    ("RequireAndVerifyClientCert", True, None, 200, None),
])
async def test_each_client_auth_type_lets_in_whom_exporter_toolkit_does(
    client_certificates: Path, serve: Serve, auth_type: str, with_ca: bool,
    none: int | None, signed: int | None, stranger: int | None,
) -> None:
    ca = "  client_ca_file: ca.pem\n" if with_ca else ""
    config = load_web_config(write_web_config(
        client_certificates, "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
        f"  client_auth_type: {auth_type}\n{ca}"))
    assert config.tls_server_config is not None
    url = await serve(build_app(ExpositionCache(fixed_store())),
                      ssl_context(config.tls_server_config))
    assert [await scrape_status(url, client_certificates, client)
            for client in (None, "client", "stranger")] == [none, signed, stranger]


@pytest.mark.parametrize(("text", "problem"), [
    ("basic_auth_users:\n  alice: plaintext\n", "not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: "
     "RequireAnyClientCert\n", "client_ca_file: needed with RequireAnyClientCert"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: ca.pem\n",
     "client_ca_file: set, but client_auth_type asks for no client certificate"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: "
     "VerifyClientCertIfGiven\n", "client_ca_file: needed to verify clients"),
    ("tls_server_config:\n  cert_file: a\n", "key_file: Field required"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: "
     "RequireAndVerifyClientCert\n", "client_ca_file"),
    ("tls_config: {}\n", "Extra inputs are not permitted"),
])
def test_bad_web_configs_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_web_config(write_web_config(tmp_path, text))
    assert "plaintext" not in str(caught.value)


def auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def test_long_passwords_are_refused_and_unknown_users_cost_a_bcrypt_check(
    tmp_path: Path, http: aiohttp.ClientSession, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    auth = BasicAuth(load_web_config(write_web_config(
        tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n")).basic_auth_users)
    url = await serve(build_app(ExpositionCache(fixed_store()), middlewares=(auth.middleware,)))
    checked: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed_password: bytes) -> bool:
        checked.append(hashed_password)
        return real_checkpw(password, hashed_password)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    async with http.get(f"{url}/metrics", headers=auth_header("prometheus", "x" * 73)) as reply:
        assert reply.status == 401  # bcrypt would raise past 72 bytes: never a 500
    async with http.get(f"{url}/metrics", headers=auth_header("nobody", "guess")) as reply:
        assert reply.status == 401
    async with http.get(f"{url}/metrics", headers=auth_header("prometheus", "guess")) as reply:
        assert reply.status == 401
    # The unknown user was checked against a dummy hash of the same cost, like a known one.
    assert len(checked) == 2
    assert checked[0] != hashed.encode()
    assert checked[0][:7] == hashed.encode()[:7]
    auth.close()


async def test_a_flood_of_logins_is_answered_429_without_waiting(
    tmp_path: Path, http: aiohttp.ClientSession, serve: Serve
) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    auth = BasicAuth(load_web_config(write_web_config(
        tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n")).basic_auth_users)
    url = await serve(build_app(ExpositionCache(fixed_store()), middlewares=(auth.middleware,)))
    right = auth_header("prometheus", PASSWORD)
    async with http.get(f"{url}/metrics", headers=right) as reply:
        assert reply.status == 200  # remembered from now on

    async def wrong() -> int:
        async with http.get(f"{url}/metrics", headers=auth_header("prometheus", "no")) as reply:
            return reply.status

    flood = [asyncio.create_task(wrong()) for _ in range(MAX_PENDING_CHECKS + 24)]
    await asyncio.sleep(0.05)
    # While the flood is being checked, the remembered login still gets its metrics.
    async with http.get(f"{url}/metrics", headers=right) as reply:
        assert reply.status == 200
    statuses = await asyncio.gather(*flood)
    assert set(statuses) <= {401, 429}
    assert 429 in statuses
    auth.close()


async def test_remembered_logins_are_bounded(tmp_path: Path) -> None:
    users = {f"user{index}": bcrypt.hashpw(b"TOPSECRET-pw", bcrypt.gensalt(rounds=4)).decode()
             for index in range(MAX_REMEMBERED_LOGINS + 1)}
    auth = BasicAuth(load_web_config(write_web_config(tmp_path, "basic_auth_users:\n" + "".join(
        f"  {user}: '{hashed}'\n" for user, hashed in users.items()))).basic_auth_users)
    try:
        for index, user in enumerate(users):
            assert await auth._check(auth_header(user, "TOPSECRET-pw")["Authorization"])
            # Full at the bound; one more starts afresh rather than growing.
            assert len(auth._verified) == (index + 1 if index < MAX_REMEMBERED_LOGINS else 1)
    finally:
        auth.close()
