"""The Dockerfile (hadolint), the compose file (docker-compose), and versions that must agree."""

import re

import yaml

from balance_exporter import __version__
from tests.deploy.tools import CHART, DEPLOY, ROOT, run, tool


def test_hadolint_finds_nothing() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_fixed_non_root_user_with_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["balance-exporter"]' in dockerfile
    assert "EXPOSE 8397" in dockerfile
    healthcheck = re.search(r"^HEALTHCHECK (.*?[^\\])$", dockerfile, re.MULTILINE | re.DOTALL)
    assert healthcheck is not None
    assert "curl" not in healthcheck.group(1)
    assert "wget" not in healthcheck.group(1)


def test_versions_agree() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG VERSION={__version__}" in dockerfile
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


def test_docker_compose_validates_the_stack() -> None:
    result = run(tool("docker-compose"), "-f", "docker-compose.yml", "config", "-q", cwd=DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), source
