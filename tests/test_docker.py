"""docker/: the compose file validates and the Dockerfile lints (no image is pulled here)."""

import re
import shutil
import subprocess
from pathlib import Path

import flwr
import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def compose_command():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no docker compose CLI on this machine")
def test_compose_file_validates():
    done = subprocess.run([*compose_command(), "-f", str(DOCKER / "compose.yml"), "config", "-q"],
                          capture_output=True, text=True, cwd=DOCKER)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfile_lints_clean():
    done = subprocess.run(["hadolint", str(DOCKER / "superexec.Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_images_are_flowers_own_at_the_installed_flower_version():
    text = (DOCKER / "compose.yml").read_text() + (DOCKER / "superexec.Dockerfile").read_text()
    tags = re.findall(r"flwr/(superlink|supernode|superexec):([\w.]+)", text)
    assert {name for name, _ in tags} == {"superlink", "supernode", "superexec"}
    assert {tag for _, tag in tags} == {flwr.__version__}
    # TLS and node authentication on; no deprecated address flags.
    compose = (DOCKER / "compose.yml").read_text()
    assert "--enable-supernode-auth" in compose and "--ssl-certfile" in compose and "--insecure\n" not in compose.split("clientapp-1")[0]
    assert "fleet-api-address" not in compose and "control-api-address" not in compose


SITE = DOCKER / "site" / "compose.yml"


def test_the_site_compose_file_stands_on_its_own():
    """Everything a site's services refer to is in the site's file: no server service, data mounted."""
    import yaml

    services = yaml.safe_load(SITE.read_text())["services"]
    assert set(services) == {"supernode", "clientapp"}
    for name, service in services.items():
        assert set(service.get("depends_on", [])) <= set(services), name
    assert "./data:/app/data:ro" in services["clientapp"]["volumes"]  # the site's own data, read-only
    assert services["clientapp"]["build"]["dockerfile"] == "docker/superexec.Dockerfile"  # the image, buildable
    assert any("--auth-supernode-private-key" in arg for arg in services["supernode"]["command"])


@pytest.mark.skipif(compose_command() is None, reason="no docker compose CLI on this machine")
def test_the_site_compose_file_validates_and_asks_for_the_server_address():
    import os

    env = {**os.environ, "SUPERLINK": "my-server.example.org:9093"}
    done = subprocess.run([*compose_command(), "-f", str(SITE), "config", "-q"], capture_output=True, text=True,
                          cwd=SITE.parent, env=env)
    assert done.returncode == 0, done.stderr
    env.pop("SUPERLINK")
    done = subprocess.run([*compose_command(), "-f", str(SITE), "config", "-q"], capture_output=True, text=True,
                          cwd=SITE.parent, env=env)
    assert done.returncode != 0 and "set SUPERLINK" in done.stderr
