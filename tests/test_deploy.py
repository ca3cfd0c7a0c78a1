"""The deploy files validate: Procfile, docker compose, Dockerfile, systemd units, Kubernetes manifests.

No Docker engine, systemd or cluster runs here, so each file is checked as the tool that reads it would:
the Procfile with honcho's line grammar and every `farm` command parsed by the real click CLI; the compose
file by the real `docker compose config` (compose v2, which needs no engine for that; fetched from Debian
trixie in CI, see `compose_cli`) and, everywhere, against the official compose-spec JSON schema (bundled by
check-jsonschema) after compose-style interpolation; the units with configparser and, where present,
`systemd-analyze verify`; the manifests against the Kubernetes OpenAPI schemas (bundled by
kubernetes-validate). On top: the farm's own rules (loopback-only ports, GPU reservations, grace periods above
the drain timeout, FARM_* names that exist, one image everywhere).
"""

from __future__ import annotations

import configparser
import gzip
import hashlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from farm.cli import cli
from farm.config import parse_devices

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")  # the grammar honcho and foreman accept
FARM_VAR = re.compile(r"\bFARM_[A-Z][A-Z0-9_]*\b")
DRAIN_TIMEOUT_DEFAULT = 600


def known_farm_vars() -> set[str]:
    """FARM_* names the farm reads: farm/config.py first, plus the few read elsewhere (drain timeout, web)."""
    names = set(FARM_VAR.findall((ROOT / "farm" / "config.py").read_text()))
    for path in [*(ROOT / "farm").rglob("*.py"), *(ROOT / "web").rglob("*.py")]:
        if path.name != "doctor.py":  # doctor only mentions names in its messages
            names |= set(FARM_VAR.findall(path.read_text()))
    return names


def assert_farm_command(argv: list[str]) -> None:
    """``argv`` (starting with "farm") names a real subcommand with options it accepts; its --help works."""
    assert argv[0] == "farm", argv
    name, rest = argv[1], argv[2:]
    assert name in cli.commands, f"`farm {name}` does not exist (commands: {sorted(cli.commands)})"
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    command = cli.commands[name]
    try:
        command.make_context(name, list(rest), resilient_parsing=False)
    except click.exceptions.Exit:
        pass
    except click.UsageError as exc:  # unknown option, missing argument, ...
        raise AssertionError(f"`{shlex.join(argv)}`: {exc.format_message()}") from None


# ------------------------------------------------------------------------------------------------ Procfile


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        m = PROCFILE_LINE.match(line)
        if m:
            assert m.group(1) not in entries, f"process {m.group(1)} defined twice"
            entries[m.group(1)] = m.group(2)
    return entries


def test_procfile_has_every_process() -> None:
    assert set(procfile()) == {"web", "worker_cuda0", "worker_cuda1", "control", "flower"}


def test_procfile_matches_honcho_parser() -> None:
    honcho_environ = pytest.importorskip("honcho.environ")
    parsed = honcho_environ.parse_procfile((ROOT / "Procfile").read_text())
    assert dict(parsed.processes) == procfile()


def test_procfile_farm_commands_exist() -> None:
    entries = procfile()
    for command in entries.values():
        argv = shlex.split(command)
        if argv[0] == "farm":
            assert_farm_command(argv)
    assert shlex.split(entries["web"]) == ["farm", "web"]
    assert shlex.split(entries["control"]) == ["farm", "worker", "--control"]
    for queue in ("cuda0", "cuda1"):
        assert shlex.split(entries[f"worker_{queue}"]) == ["farm", "worker", "--device", queue]


def _expand(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Let /bin/sh expand the command as honcho would, printing the words instead of running them."""
    probe = "printf '%s\\n' " + command
    return subprocess.run(
        ["/bin/sh", "-c", probe],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_procfile_flower_has_basic_auth_on_loopback() -> None:
    command = procfile()["flower"]
    assert command.startswith("celery -A farm.celery_app flower ")
    assert "--basic-auth=" in command and "FARM_FLOWER_AUTH" in command
    words = _expand(command, {"FARM_FLOWER_AUTH": "ops:pw"}).stdout.split()
    assert "--basic-auth=ops:pw" in words
    assert "--address=127.0.0.1" in words and "--port=5555" in words
    # Without credentials the shell refuses to start Flower rather than serve it open.
    refused = _expand(command, {})
    assert refused.returncode != 0 and "FARM_FLOWER_AUTH" in refused.stderr


# ------------------------------------------------------------------------------------------ docker compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def dotenv(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


_INTERP = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${X}, ${X:-default}, ${X:?error}, $$), enough for this file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if not current:
                raise KeyError(f"required variable {name}: {arg}")
            return current
        return current or ""

    return _INTERP.sub(one, value)


SERVICES = {"redis", "postgres", "migrate", "web", "worker-cuda0", "worker-cuda1", "control", "flower"}


def farm_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in doc["services"].items() if s.get("image", "").startswith("farm")}


def test_compose_has_every_service() -> None:
    services = compose()["services"]
    assert set(services) == SERVICES
    assert set(farm_services(compose())) == set(services) - {"redis", "postgres"}


def test_compose_validates_against_the_compose_spec() -> None:
    """The stand-in for `docker compose config` that runs without compose (the real one is further down)."""
    pytest.importorskip("jsonschema")
    check_jsonschema = pytest.importorskip("check_jsonschema")
    import jsonschema

    schema_path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    doc = interpolate(compose(), dotenv(DEPLOY / ".env.example"))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_refuses_to_run_without_its_secrets() -> None:
    env = dotenv(DEPLOY / ".env.example")
    for required in ("POSTGRES_PASSWORD", "FARM_FLOWER_AUTH"):
        with pytest.raises(KeyError, match=required):
            interpolate(compose(), {k: v for k, v in env.items() if k != required})


def test_compose_redis_and_postgres() -> None:
    services = compose()["services"]
    redis, postgres = services["redis"], services["postgres"]
    assert redis["image"] == "redis:7"
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "healthcheck" in redis and any(v.endswith(":/data") for v in redis["volumes"])
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    for svc in (redis, postgres):
        assert "ports" not in svc, "Redis and PostgreSQL stay on the compose network"


def test_compose_depends_on_conditions() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "test" in services[dep].get("healthcheck", {}), f"{dep} has no healthcheck"
    for name in ("web", "worker-cuda0", "worker-cuda1", "control"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"


def test_compose_migrate_command_really_migrates(tmp_path: Path) -> None:
    """Run the migrate service's own command against a fresh SQLite and find the schema at head."""
    from farm.doctor import check_database

    command = compose()["services"]["migrate"]["command"]
    assert command[:2] == ["python", "-c"]
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    env = {
        "PATH": "/usr/bin:/bin",
        "FARM_HOME": str(tmp_path),
        "FARM_DATABASE_URL": url,
        "FARM_DEVICES": "cuda0=cpu",
    }
    subprocess.run([sys.executable, *command[1:]], env=env, check=True, timeout=120, cwd=tmp_path)
    from farm.config import load_settings

    assert check_database(load_settings(env)).ok


def test_compose_gpu_workers() -> None:
    services = compose()["services"]
    seen_ids = set()
    for queue in ("cuda0", "cuda1"):
        svc = services[f"worker-{queue}"]
        assert svc["command"] == ["farm", "worker", "--device", queue]
        assert_farm_command(svc["command"])
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
        seen_ids.add(device["device_ids"][0])
        # The container sees only its reserved GPU, as cuda:0.
        assert parse_devices(svc["environment"]["FARM_DEVICES"]) == {queue: "cuda:0"}
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace = svc["stop_grace_period"]
        seconds = int(grace[:-1]) * {"s": 1, "m": 60, "h": 3600}[grace[-1]]
        assert seconds > DRAIN_TIMEOUT_DEFAULT, "docker would SIGKILL a draining worker"
        health = " ".join(svc["healthcheck"]["test"])
        assert f"inspect ping -d {queue}@$$HOSTNAME" in health
    assert seen_ids == {"0", "1"}


def test_compose_farm_commands_exist() -> None:
    for svc in farm_services(compose()).values():
        if svc["command"][0] == "farm":
            assert_farm_command(svc["command"])
    assert compose()["services"]["web"]["command"] == ["farm", "web"]
    assert compose()["services"]["control"]["command"] == ["farm", "worker", "--control"]


def test_compose_publishes_only_web_and_flower_on_loopback() -> None:
    publishing = {}
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.count(":") == 2, f"{name}: give host_ip:host:container"
            host_ip = port.split(":", 1)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            publishing.setdefault(name, []).append(port)
    assert set(publishing) == {"web", "flower"}


def test_compose_flower_basic_auth() -> None:
    flower = compose()["services"]["flower"]
    command = " ".join(flower["command"])
    assert "celery -A farm.celery_app flower" in command
    assert '--basic-auth="$$FARM_FLOWER_AUTH"' in command


def test_compose_shared_artifacts_everywhere() -> None:
    doc = compose()
    for name, svc in farm_services(doc).items():
        home = svc["environment"]["FARM_HOME"]
        mounts = {v.split(":", 1)[1]: v.split(":", 1)[0] for v in svc["volumes"]}
        assert mounts.get(f"{home}/artifacts") == "artifacts", f"{name} lacks the shared artifact store"
    assert "artifacts" in doc["volumes"]


def test_compose_farm_vars_exist() -> None:
    known = known_farm_vars()
    for name, svc in compose()["services"].items():
        env = svc.get("environment", {})
        unknown = {k for k in env if k.startswith("FARM_")} - known
        assert not unknown, f"{name} sets {unknown}, which the farm never reads"
    env_example = {k for k in dotenv(DEPLOY / ".env.example") if k.startswith("FARM_")}
    assert env_example <= known


# ------------------------------------------------------------------------------ docker compose, the real tool
#
# `docker compose config` parses, validates (the compose-spec schema plus compose's own checks) and
# interpolates the file exactly as `up` would, without a Docker engine. Where compose v2 is missing, CI
# (CI=true) or a root shell fetches it: Debian trixie's `docker-compose` package is the Go compose v2
# (bookworm's is the Python 1.29), a static binary that only needs libc6 >= 2.34. The download is checked as
# apt checks it: InRelease signed by Debian's archive key (gpgv), Packages.gz against InRelease, the .deb
# against Packages.gz. The plugin lands in .venv/tools/docker/cli-plugins/ (ignored by git) and runs as
# `docker compose` with DOCKER_CONFIG pointing there. Elsewhere the tests skip with the reason; in CI a failed
# install fails them.

DEBIAN_MIRROR = "http://deb.debian.org/debian"
COMPOSE_SUITE = "trixie"
COMPOSE_PACKAGE = "docker-compose"
COMPOSE_PLUGIN_IN_DEB = Path("usr/libexec/docker/cli-plugins/docker-compose")
# Only if the index stops listing the package (amd64): the file this test was written against, same checks.
COMPOSE_PINNED_DEB = {
    "Version": "2.26.1-4",
    "Filename": "pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb",
    "SHA256": "47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea",
}
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
TOOLS = ROOT / ".venv" / "tools"
COMPOSE_PLUGIN = TOOLS / "docker" / "cli-plugins" / "docker-compose"  # DOCKER_CONFIG=.venv/tools/docker
FETCH_TIMEOUT_S = 60  # per connect or read
INSTALL_TIMEOUT_S = 600  # the whole install
COMPOSE_TIMEOUT_S = 60
PASSED_ENV = ("PATH", "HOME", "DOCKER_CONFIG")  # nothing else: FARM_* here (FARM_SLICE_SIZE=2) would win


class ComposeInstallError(Exception):
    pass


@dataclass(frozen=True)
class ComposeCLI:
    """Compose v2: ``prefix`` is ``[docker, "compose"]`` (or the plugin run standalone where there is no
    docker client); ``env`` is the whole environment it runs with."""

    prefix: list[str]
    env: dict[str, str]
    version: str

    def run(self, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT_S,
            check=False,
        )


def probe_compose(prefix: list[str], env: dict[str, str]) -> ComposeCLI | None:
    """``prefix`` as a ComposeCLI if ``prefix version`` answers with a version 2 or later, else None."""
    try:
        out = subprocess.run(
            [*prefix, "version", "--short"],
            env=env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip().removeprefix("v")
    major = version.split(".", 1)[0]
    if out.returncode != 0 or not major.isdigit() or int(major) < 2:
        return None
    return ComposeCLI(prefix, env, version)


def installed_compose(docker: str | None, env: dict[str, str]) -> ComposeCLI | None:
    if not COMPOSE_PLUGIN.exists():
        return None
    if docker:
        return probe_compose([docker, "compose"], {**env, "DOCKER_CONFIG": str(COMPOSE_PLUGIN.parent.parent)})
    return probe_compose([str(COMPOSE_PLUGIN)], env)


def _fetch(url: str, dest: Path, deadline: float) -> str:
    """Download ``url`` to ``dest``; returns its SHA256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                if time.monotonic() > deadline:
                    raise ComposeInstallError(f"fetching {url}: still downloading after {INSTALL_TIMEOUT_S}s")
                digest.update(chunk)
                out.write(chunk)
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts, short reads
        raise ComposeInstallError(f"fetching {url}: {exc}") from None
    return digest.hexdigest()


def _checked(url: str, dest: Path, sha256: str, deadline: float) -> None:
    got = _fetch(url, dest, deadline)
    if got != sha256:
        raise ComposeInstallError(f"{url} has SHA256 {got}, the signed index says {sha256}")


def _verified_release(work: Path, deadline: float) -> str:
    """The text of the suite's InRelease, once gpgv has checked its signature against Debian's keyring."""
    url = f"{DEBIAN_MIRROR}/dists/{COMPOSE_SUITE}/InRelease"
    gpgv = shutil.which("gpgv")
    if not gpgv or not DEBIAN_KEYRING.exists():
        raise ComposeInstallError(
            f"checking {url} needs gpgv and {DEBIAN_KEYRING} (apt-get install gpgv debian-archive-keyring)"
        )
    _fetch(url, work / "InRelease", deadline)
    out = subprocess.run(
        [gpgv, "--keyring", str(DEBIAN_KEYRING), "--output", "-", str(work / "InRelease")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise ComposeInstallError(f"gpgv rejects {url}: {out.stderr.decode(errors='replace').strip()[-600:]}")
    return out.stdout.decode()


def _release_sha256(release: str, path: str) -> str:
    in_sha256 = False
    for line in release.splitlines():
        if not line.startswith(" "):
            in_sha256 = line.rstrip() == "SHA256:"
        elif in_sha256:
            digest, _size, name = line.split()
            if name == path:
                return digest
    raise ComposeInstallError(f"{COMPOSE_SUITE}'s InRelease has no SHA256 for {path}")


def _package_stanza(packages_gz: Path, package: str) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    with gzip.open(packages_gz, "rt", encoding="utf-8", errors="replace") as lines:
        for line in [*lines, "\n"]:
            if not line.strip():
                if fields.get("Package") == package:
                    return fields
                fields = {}
            elif not line[0].isspace():
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return None


def install_compose() -> str:
    """Fetch Debian trixie's docker-compose, check it and unpack its plugin to COMPOSE_PLUGIN.

    Returns the package's version."""
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    arch = DEBIAN_ARCH.get(platform.machine().lower())
    if arch is None:
        raise ComposeInstallError(f"no Debian architecture known for {platform.machine()!r}")
    if not shutil.which("dpkg-deb"):
        raise ComposeInstallError("there is no dpkg-deb on this machine")
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compose-", dir=TOOLS) as tmp:
        work = Path(tmp)
        release = _verified_release(work, deadline)
        index = f"main/binary-{arch}/Packages.gz"
        _checked(
            f"{DEBIAN_MIRROR}/dists/{COMPOSE_SUITE}/{index}",
            work / "Packages.gz",
            _release_sha256(release, index),
            deadline,
        )
        stanza = _package_stanza(work / "Packages.gz", COMPOSE_PACKAGE)
        if stanza is None and arch == "amd64":
            stanza = COMPOSE_PINNED_DEB
        if stanza is None:
            raise ComposeInstallError(f"{COMPOSE_SUITE}'s {index} does not list {COMPOSE_PACKAGE}")
        deb = work / "docker-compose.deb"
        _checked(f"{DEBIAN_MIRROR}/{stanza['Filename']}", deb, stanza["SHA256"], deadline)
        out = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(work / "root")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if out.returncode != 0:
            raise ComposeInstallError(f"dpkg-deb -x exited {out.returncode}: {out.stderr.strip()[-600:]}")
        plugin = work / "root" / COMPOSE_PLUGIN_IN_DEB
        if not plugin.is_file():
            raise ComposeInstallError(f"{stanza['Filename']} has no /{COMPOSE_PLUGIN_IN_DEB}")
        COMPOSE_PLUGIN.parent.mkdir(parents=True, exist_ok=True)
        staged = COMPOSE_PLUGIN.with_name(f".{COMPOSE_PLUGIN.name}.new")
        shutil.copyfile(plugin, staged)
        staged.chmod(0o755)
        os.replace(staged, COMPOSE_PLUGIN)
        return stanza["Version"]


@pytest.fixture(scope="session")
def compose_cli() -> ComposeCLI:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    docker = shutil.which("docker")
    found = (docker and probe_compose([docker, "compose"], env)) or installed_compose(docker, env)
    if found:
        return found
    in_ci = os.environ.get("CI", "").lower() == "true"
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not (in_ci or as_root):
        pytest.skip(
            f"the compose tests need docker compose v2 (Docker's compose plugin, or Debian "
            f"{COMPOSE_SUITE}'s {COMPOSE_PACKAGE}); CI=true or a root shell makes them fetch it into "
            f"{TOOLS.relative_to(ROOT)} themselves"
        )
    try:
        version = install_compose()
    except ComposeInstallError as exc:
        problem = str(exc)
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    else:
        found = installed_compose(docker, env)
        if found:
            return found
        problem = f"installed {COMPOSE_PACKAGE} {version} at {COMPOSE_PLUGIN}, but `compose version` fails"
    reason = f"could not install docker compose v2 from Debian {COMPOSE_SUITE}: {problem}"
    if in_ci:
        pytest.fail(reason)  # in CI a missing compose is a broken setup, not a reason to skip silently
    pytest.skip(reason)


def go_seconds(duration: str) -> float:
    """Seconds in a Go duration as compose prints it ("11m0s", "1h0m0s", "500ms")."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose_model(compose_cli: ComposeCLI) -> dict[str, Any]:
    """The file as compose resolves it with deploy/.env.example's values: anchors merged, variables set."""
    out = compose_cli.run(
        "-f", "deploy/docker-compose.yml", "--env-file", "deploy/.env.example", "config", "--format", "json"
    )
    assert out.returncode == 0, out.stderr
    assert not out.stderr.strip(), f"compose warns: {out.stderr}"
    return json.loads(out.stdout)


def test_docker_compose_config_quiet_as_documented(compose_cli: ComposeCLI, tmp_path: Path) -> None:
    """OPERATIONS.md's steps: cp deploy/.env.example deploy/.env, then compose reads it by itself."""
    (tmp_path / "deploy").mkdir()
    shutil.copy(DEPLOY / "docker-compose.yml", tmp_path / "deploy")
    shutil.copy(DEPLOY / ".env.example", tmp_path / "deploy" / ".env")
    out = compose_cli.run("-f", "deploy/docker-compose.yml", "config", "--quiet", cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize("variable", ["POSTGRES_PASSWORD", "FARM_FLOWER_AUTH"])
def test_docker_compose_config_refuses_without_a_secret(
    compose_cli: ComposeCLI, tmp_path: Path, variable: str, value: str | None
) -> None:
    env = {k: v for k, v in dotenv(DEPLOY / ".env.example").items() if k != variable}
    if value is not None:
        env[variable] = value
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    out = compose_cli.run("-f", "deploy/docker-compose.yml", "--env-file", str(env_file), "config", "--quiet")
    assert out.returncode != 0
    assert f"required variable {variable} is missing a value" in out.stderr, out.stderr
    assert f"set {variable}" in out.stderr and "deploy/.env" in out.stderr, out.stderr


def test_docker_compose_config_services_and_ports(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    assert compose_model["name"] == "farm"
    assert set(services) == SERVICES
    published = {
        name: [(p["host_ip"], int(p["published"]), p["target"], p["protocol"]) for p in svc["ports"]]
        for name, svc in services.items()
        if svc.get("ports")
    }
    assert published == {
        "web": [("127.0.0.1", 8000, 8000, "tcp")],
        "flower": [("127.0.0.1", 5555, 5555, "tcp")],
    }
    example = dotenv(DEPLOY / ".env.example")
    for name, svc in farm_services(compose_model).items():
        assert svc["image"] == "farm:latest"
        assert Path(svc["build"]["context"]).resolve() == ROOT, name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        env = svc["environment"]
        assert env["FARM_DATABASE_URL"] == (
            f"postgresql+psycopg2://farm:{example['POSTGRES_PASSWORD']}@postgres:5432/farm"
        ), name
        assert env["FARM_FLOWER_AUTH"] == example["FARM_FLOWER_AUTH"], name
        assert env["FARM_SLICE_SIZE"] == example["FARM_SLICE_SIZE"], name
        mounts = {v["target"]: v["source"] for v in svc["volumes"] if v["type"] == "volume"}
        assert mounts[f"{env['FARM_HOME']}/artifacts"] == "artifacts", name
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]
    assert services["web"]["environment"]["FARM_WEB_HOST"] == "0.0.0.0"


def test_docker_compose_config_gpu_reservations(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    for index, queue in enumerate(("cuda0", "cuda1")):
        svc = services[f"worker-{queue}"]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert (device["driver"], device["device_ids"], device["capabilities"]) == (
            "nvidia",
            [str(index)],
            ["gpu"],
        )
        assert not device.get("count"), "count and device_ids exclude each other"
        assert parse_devices(svc["environment"]["FARM_DEVICES"]) == {queue: "cuda:0"}
        assert svc["stop_signal"] == "SIGTERM"
        assert go_seconds(svc["stop_grace_period"]) > int(svc["environment"]["FARM_DRAIN_TIMEOUT"])
    others = {name for name, svc in services.items() if "deploy" in svc}
    assert others == {"worker-cuda0", "worker-cuda1"}, "only the workers reserve a GPU"


def test_docker_compose_config_redis_healthchecks_and_order(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    command = services["redis"]["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert pairs["--appendonly"] == "yes" and pairs["--maxmemory-policy"] == "noeviction"
    for name, svc in services.items():
        if name == "migrate":
            assert svc["healthcheck"].get("disable") is True and svc["restart"] == "no"
            continue
        health = svc["healthcheck"]
        assert health["test"][0] in ("CMD", "CMD-SHELL") and len(health["test"]) > 1, name
        assert go_seconds(health["timeout"]) < go_seconds(health["interval"]), name
        assert svc["restart"] == "unless-stopped", name
    conditions = {
        name: {dep: spec["condition"] for dep, spec in svc.get("depends_on", {}).items()}
        for name, svc in services.items()
    }
    after_migrate = {
        "migrate": "service_completed_successfully",
        "redis": "service_healthy",
        "postgres": "service_healthy",
    }
    assert conditions == {
        "redis": {},
        "postgres": {},
        "migrate": {"postgres": "service_healthy"},
        **{name: after_migrate for name in ("web", "worker-cuda0", "worker-cuda1", "control")},
        "flower": {"redis": "service_healthy"},
    }


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "python:3.11-slim" for f in froms)
    assert re.search(r"pip install .*-c constraints\.txt", text)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", text, re.M)
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    healthcheck = re.search(r'CMD \["python", "-c", "(.+)"\]', text).group(1)
    compile(healthcheck.replace("; ", "\n"), "HEALTHCHECK", "exec")


# -------------------------------------------------------------------------------------------------- systemd


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_systemd_worker_template() -> None:
    u = unit("farm-worker@.service")
    svc = u["Service"]
    assert svc["ExecStart"].endswith("/farm worker --device %i")
    assert_farm_command(["farm", *svc["ExecStart"].split()[1:]])
    assert svc["Restart"] == "always"
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["KillMode"] == "mixed", "SIGTERM must reach the main process only, not the pool child"
    assert int(svc["TimeoutStopSec"]) > DRAIN_TIMEOUT_DEFAULT
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/farm/farm.env"
    assert "multi-user.target" in u["Install"]["WantedBy"]


def test_systemd_other_units() -> None:
    expected = {
        "farm-web.service": "farm web",
        "farm-control.service": "farm worker --control",
    }
    for name, command in expected.items():
        svc = unit(name)["Service"]
        assert svc["ExecStart"].endswith("/" + command), name
        assert_farm_command(["farm", *svc["ExecStart"].split()[1:]])
        assert svc["Restart"] == "always"
        assert svc["EnvironmentFile"] == "/etc/farm/farm.env"
    flower = unit("farm-flower.service")["Service"]
    assert "celery -A farm.celery_app flower" in flower["ExecStart"]
    assert "--address=127.0.0.1" in flower["ExecStart"]
    assert "--basic-auth=${FARM_FLOWER_AUTH}" in flower["ExecStart"]
    assert "FARM_FLOWER_AUTH" in flower["ExecStartPre"]


def test_systemd_env_example_documents_every_setting() -> None:
    text = (DEPLOY / "systemd" / "farm.env.example").read_text()
    documented = set(re.findall(r"^#?(FARM_[A-Z0-9_]+)=", text, re.M))
    in_config = set(FARM_VAR.findall((ROOT / "farm" / "config.py").read_text()))
    missing = in_config - documented
    assert not missing, f"farm.env.example does not mention {sorted(missing)}"
    assert "FARM_DRAIN_TIMEOUT" in documented
    assert documented <= known_farm_vars()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys or bad values print warnings, which count as failures here."""
    bin_dir = Path(sys.executable).parent
    for src in (DEPLOY / "systemd").glob("farm*.*"):
        if src.suffix in (".service", ".target"):
            text = src.read_text().replace("/opt/farm/venv/bin/", f"{bin_dir}/")
            (tmp_path / src.name).write_text(text.replace("EnvironmentFile=/", "EnvironmentFile=-/"))
    units = [
        str(tmp_path / n)
        for n in (
            "farm-web.service",
            "farm-control.service",
            "farm-flower.service",
            "farm-worker@cuda0.service",
            "farm.target",
        )
    ]
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60
    )
    noise = [
        line for line in (out.stdout + out.stderr).splitlines() if str(tmp_path) in line or "farm" in line
    ]
    assert out.returncode == 0 and not noise, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------- Kubernetes

K8S = DEPLOY / "k8s"


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def by_kind_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_k8s_kinds() -> None:
    kinds = set(by_kind_name(k8s_docs()))
    assert kinds == {
        ("Namespace", "farm"),
        ("ConfigMap", "farm-config"),
        ("PersistentVolumeClaim", "farm-store"),
        ("Deployment", "farm-web"),
        ("Service", "farm-web"),
        ("StatefulSet", "farm-worker"),
        ("Service", "farm-worker"),
        ("Deployment", "farm-control"),
        ("Deployment", "farm-flower"),
    }


def test_k8s_validates_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for doc in k8s_docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {exc}") from None


def test_k8s_one_image_everywhere() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == ["farm"]
    images = {
        c["image"] for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet") for c in containers(d)
    }
    assert images == {"farm"}


def test_k8s_settings_and_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == "farm-secrets"
    (env_file,) = generator["envs"]
    example = dotenv(K8S / f"{env_file}.example")
    assert {"FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_FLOWER_AUTH"} <= set(example)
    config = by_kind_name(k8s_docs())[("ConfigMap", "farm-config")]["data"]
    known = known_farm_vars()
    assert {k for k in [*example, *config] if k.startswith("FARM_")} <= known
    secrets = {
        "FARM_BROKER_URL",
        "FARM_DATABASE_URL",
        "FARM_FLOWER_AUTH",
        "FARM_WEB_TOKEN",
        "FARM_WEB_SECRET",
    }
    assert not secrets & set(config), "secrets belong in the Secret, not the ConfigMap"
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in containers(doc):
                refs = {(e.get("configMapRef") or e.get("secretRef"))["name"] for e in c["envFrom"]}
                assert refs == {"farm-config", "farm-secrets"}, c["name"]


def test_k8s_gpu_workers() -> None:
    docs = by_kind_name(k8s_docs())
    sts = docs[("StatefulSet", "farm-worker")]
    assert docs[("Service", "farm-worker")]["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == "farm-worker"
    (worker,) = pod_spec(sts)["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    drain = int(docs[("ConfigMap", "farm-config")]["data"]["FARM_DRAIN_TIMEOUT"])
    assert pod_spec(sts)["terminationGracePeriodSeconds"] > drain
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "inspect ping" in " ".join(worker[probe]["exec"]["command"]), probe


def _run_worker_script(script: str, hostname: str, prefix: str) -> list[str]:
    fake = script.replace("exec farm worker", "printf '%s\\n' \"$FARM_DEVICES\" farm worker")
    out = subprocess.run(
        ["/bin/sh", "-c", fake],
        env={"PATH": "/usr/bin:/bin", "HOSTNAME": hostname, "QUEUE_PREFIX": prefix},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return out.stdout.split()


def test_k8s_worker_queue_follows_the_pod_ordinal() -> None:
    """farm-worker-3 serves queue gpu3 on its one GPU, and its probes ping gpu3@farm-worker-3."""
    sts = by_kind_name(k8s_docs())[("StatefulSet", "farm-worker")]
    (worker,) = pod_spec(sts)["containers"]
    prefix = next(e["value"] for e in worker["env"] if e["name"] == "QUEUE_PREFIX")
    assert worker["args"][:2] == ["/bin/sh", "-c"]
    words = _run_worker_script(worker["args"][2], "farm-worker-3", prefix)
    devices, argv = words[0], words[1:]
    assert parse_devices(devices) == {f"{prefix}3": "cuda:0"}
    assert argv == ["farm", "worker", "--device", f"{prefix}3"]
    assert_farm_command(argv)
    probe = worker["livenessProbe"]["exec"]["command"]
    printed = subprocess.run(
        ["/bin/sh", "-c", probe[2].replace("celery -A", "printf '%s\\n' celery -A")],
        env={"PATH": "/usr/bin:/bin", "HOSTNAME": "farm-worker-3", "QUEUE_PREFIX": prefix},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert printed[printed.index("-d") + 1] == f"{prefix}3@farm-worker-3"


def test_k8s_web_control_flower() -> None:
    docs = by_kind_name(k8s_docs())
    web = docs[("Deployment", "farm-web")]
    (container,) = pod_spec(web)["containers"]
    assert container["args"] == ["farm", "web"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    service = docs[("Service", "farm-web")]
    assert service["spec"]["selector"] == web["spec"]["selector"]["matchLabels"]
    assert service["spec"]["type"] == "ClusterIP"

    control = docs[("Deployment", "farm-control")]
    assert control["spec"]["replicas"] == 1
    assert control["spec"]["strategy"]["type"] == "Recreate", "two beats would run during a rolling update"
    (container,) = pod_spec(control)["containers"]
    assert container["args"] == ["farm", "worker", "--control"]
    assert "readinessProbe" in container and "livenessProbe" in container

    flower = docs[("Deployment", "farm-flower")]
    (container,) = pod_spec(flower)["containers"]
    command = " ".join(container["args"])
    assert "--basic-auth=" in command and "FARM_FLOWER_AUTH" in command
    assert "--address=127.0.0.1" in command
    assert "readinessProbe" in container and "livenessProbe" in container
    assert not any(d["kind"] == "Service" and "flower" in d["metadata"]["name"] for d in docs.values())

    for doc in (web, control):
        init = pod_spec(doc)["initContainers"][0]
        assert "migrate(load_settings().database_url)" in " ".join(init["args"])
    for doc in docs.values():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in containers(doc):
                if c["args"][0] == "farm":
                    assert_farm_command(c["args"])


def test_k8s_shared_artifact_store() -> None:
    docs = by_kind_name(k8s_docs())
    pvc = docs[("PersistentVolumeClaim", "farm-store")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    home = docs[("ConfigMap", "farm-config")]["data"]["FARM_HOME"]
    for key in (("Deployment", "farm-web"), ("Deployment", "farm-control"), ("StatefulSet", "farm-worker")):
        spec = pod_spec(docs[key])
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get(f"{home}/artifacts")) == "farm-store", key
