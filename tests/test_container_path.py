"""The container path, checked as the containers run it, without a container engine.

Everything is read from the files Docker reads: the Dockerfile's COPY/ENV/WORKDIR/
ENTRYPOINT/HEALTHCHECK, docker/entrypoint.sh's list of racm3 subcommands, and each
docker-compose.yml service's command and environment.

- Fast (in `make test`): every command line the image or compose runs reaches a racm3
  subcommand that accepts it, the entrypoint lists exactly racm3's subcommands, and a
  non-editable install (the Dockerfile's `pip install .`) finds the bundle mounted under
  its working directory, not beside its own code in site-packages.
- Slow (opt-in, `pytest -m slow tests/test_container_path.py`): the whole compose stack
  from that install: redis, the index builder, retriever, generator and gateway, each
  started through the entrypoint with the compose environment, health-checked with the
  image's own healthcheck, then requests through the gateway.

The install is a fresh virtual environment outside the checkout that reaches this
environment's dependencies (torch, open_clip, faiss...) through a .pth file, with racm3
itself installed into it without `-e` from a copy of what the Dockerfile copies.
Container paths (/app, /data, /docker) map to directories under the test's tmp_path and
compose host names (redis, retriever, generator) to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import typer
import yaml

from racm3.cli import app as cli_app
from tests.live import free_port

ROOT = Path(__file__).resolve().parent.parent
RACM3_IMAGE = "racm3:latest"


# --- what Docker reads -------------------------------------------------------------------


@dataclass
class Dockerfile:
    workdir: str = "/"
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # before the install
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)


def read_dockerfile(path: Path = ROOT / "Dockerfile") -> Dockerfile:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = Dockerfile()
    installed = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        rest = rest.strip()
        if op == "WORKDIR":
            out.workdir = rest
        elif op == "COPY" and not installed:
            *sources, dest = rest.split()
            out.copies.append((sources, dest))
        elif op == "RUN" and "pip install ." in rest:
            installed = True
        elif op == "ENV":
            out.env.update(dict(pair.split("=", 1) for pair in rest.split()))
        elif op == "ENTRYPOINT":
            out.entrypoint = json.loads(rest)
        elif op == "CMD":
            out.cmd = json.loads(rest)
        elif op == "HEALTHCHECK":
            out.healthcheck = json.loads(rest.split("CMD", 1)[1])
    return out


def read_compose(path: Path = ROOT / "docker-compose.yml") -> dict:
    return yaml.safe_load(path.read_text())  # the safe loader resolves `<<: *anchor` merges


def racm3_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items()
            if svc.get("image") == RACM3_IMAGE}


def entrypoint_subcommands(path: Path = ROOT / "docker" / "entrypoint.sh") -> set[str]:
    match = re.search(r"^\s*([\w|-]+)\)\s*\n\s*exec racm3", path.read_text(), re.MULTILINE)
    assert match, f"{path}: no `case` branch that runs racm3"
    return set(match.group(1).split("|"))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}` and `${VAR:-default}`."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}",
                  lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def cli_commands() -> set[str]:
    return set(typer.main.get_command(cli_app).commands)


def parse_cli(args: list[str]) -> list[str]:
    """Parse `racm3 ARGS` down to the subcommand, as running it would, without running it;
    raises the CLI's own usage error for a line it would refuse."""
    command = typer.main.get_command(cli_app)
    ctx = command.make_context("racm3", list(args))
    path = []
    while hasattr(command, "resolve_command"):  # a group: descend into its subcommand
        protected = getattr(ctx, "_protected_args", None)
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        path.append(name)
    return path


def runs_racm3(args: list[str], subcommands: set[str]) -> bool:
    return bool(args) and args[0] in subcommands


# --- fast checks -------------------------------------------------------------------------


def test_the_entrypoint_lists_exactly_the_cli_subcommands() -> None:
    listed = entrypoint_subcommands()
    assert listed - {"--help"} == cli_commands(), (
        "docker/entrypoint.sh must pass every racm3 subcommand, and only those, to racm3")


def test_every_command_the_image_and_compose_run_is_accepted_by_the_cli() -> None:
    dockerfile, compose = read_dockerfile(), read_compose()
    subcommands = entrypoint_subcommands()
    lines = {"Dockerfile CMD": dockerfile.cmd}
    lines |= {f"compose {name}": svc["command"] for name, svc in
              racm3_services(compose).items()}
    assert set(lines) >= {"compose index-builder", "compose retriever", "compose generator",
                          "compose gateway"}
    for where, args in lines.items():
        assert runs_racm3(args, subcommands), f"{where}: {args} does not reach racm3"
        try:
            parse_cli(args)
        except Exception as exc:  # the CLI's usage errors: what the container would print
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            pytest.fail(f"{where}: `racm3 {' '.join(args)}` is refused: {message}")


def test_compose_points_every_service_at_the_mounted_bundle_and_the_volume() -> None:
    dockerfile, compose = read_dockerfile(), read_compose()
    for name, svc in racm3_services(compose).items():
        env = {**dockerfile.env, **svc.get("environment", {})}
        bundle = env["RACM3_BUNDLE_DIR"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert any(bundle.startswith(target + "/") for target in mounts), (name, bundle)
        if name in ("retriever", "index-builder"):
            assert env["RACM3_MEMORY_DIR"] in mounts, (name, env["RACM3_MEMORY_DIR"])
    builder = racm3_services(compose)["index-builder"]["command"]
    assert builder[builder.index("--out") + 1] == dockerfile.env["RACM3_MEMORY_DIR"]


@dataclass
class Installed:
    """racm3 installed as the image installs it, and the image's filesystem around it."""

    root: Path  # stands for the container's /
    venv: Path
    dockerfile: Dockerfile

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def workdir(self) -> Path:
        return self.path(self.dockerfile.workdir)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The image's environment: its ENV (container paths mapped here), the venv first
        on PATH, and nothing that would import the checkout instead of the install."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("RACM3_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        image = {k: self.map_paths(v) for k, v in {**self.dockerfile.env, **(extra or {})}.items()}
        return {**base, **image, "PATH": f"{self.venv / 'bin'}:{base.get('PATH', '')}"}

    def map_paths(self, value: str) -> str:
        return re.sub(r"(?<![\w.])/(app|data|docker)\b", lambda m: f"{self.root}/{m.group(1)}",
                      value)

    def entrypoint(self, args: list[str]) -> list[str]:
        return ["sh", str(self.path(self.dockerfile.entrypoint[0])), *args]


def install_like_the_image(root: Path) -> Installed:
    dockerfile = read_dockerfile()
    inst = Installed(root, root / "venv", dockerfile)
    workdir = inst.workdir
    workdir.mkdir(parents=True)
    for sources, dest in dockerfile.copies:  # the build context, as COPY places it
        target = inst.path(dest) if dest.startswith("/") else workdir / dest
        for pattern in sources:
            for src in sorted(ROOT.glob(pattern)):
                dst = target / src.name if dest.endswith("/") or len(sources) > 1 else target
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(src, dst)
    docker_dir = inst.path("/docker")  # COPY docker/... /docker/ comes after the install
    docker_dir.mkdir(parents=True, exist_ok=True)
    for name in ("entrypoint.sh", "healthcheck.py"):
        shutil.copy2(ROOT / "docker" / name, docker_dir / name)
    inst.path("/data/memory").mkdir(parents=True)

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(inst.venv)], check=True)
    site = Path(subprocess.run(
        [inst.venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
         "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    # torch, open_clip, faiss... from this environment, as the image's torch layer has them
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(inst.venv / "bin" / "python"), "install",
         "-q", "--no-deps", "--no-build-isolation", "."],
        cwd=workdir, check=True, capture_output=True)
    return inst


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return install_like_the_image(tmp_path_factory.mktemp("container"))


def test_the_installed_package_is_not_the_checkout(installed: Installed) -> None:
    where = subprocess.run(
        [installed.venv / "bin" / "python", "-c", "import app, model; print(app.__file__); "
         "print(model.__file__)"],
        cwd="/", env=installed.env(), check=True, capture_output=True, text=True).stdout
    site = str(installed.venv)
    assert all(line.startswith(site) for line in where.split()), where


def test_the_installed_cli_finds_the_bundle_mounted_in_its_working_directory(
        installed: Installed, tmp_path: Path) -> None:
    bundle_dir = ROOT / "bundles" / "demo"  # what compose mounts (only its manifest is read)
    mount = installed.workdir / "bundles" / "demo"

    # Nothing mounted yet: the error names the bundle the image's RACM3_BUNDLE_DIR names.
    build = ["build-index", "--source", "folder", "--input", str(tmp_path), "--out",
             str(tmp_path / "memory")]
    missing = subprocess.run(installed.entrypoint(build), cwd=installed.workdir,
                             env=installed.env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1, missing.stderr[-2000:]
    assert f"{mount} is not a racm3 bundle" in missing.stderr, missing.stderr[-2000:]
    assert "site-packages" not in missing.stderr and "Traceback" not in missing.stderr

    # Mounted as compose mounts it: found through RACM3_BUNDLE_DIR, and without it in the
    # working directory; never beside the installed code.
    mount.parent.mkdir(exist_ok=True)
    mount.symlink_to(bundle_dir, target_is_directory=True)
    resolve = ("import json, os; from model.bundle import Bundle, default_bundle_dir; "
               "b = Bundle(default_bundle_dir()); "
               "print(json.dumps([str(b.path.resolve()), b.manifest['name']]))")
    try:
        for env in (installed.env(), installed.env({"RACM3_BUNDLE_DIR": ""})):
            found = subprocess.run([installed.venv / "bin" / "python", "-c", resolve],
                                   cwd=installed.workdir, env=env, capture_output=True,
                                   text=True, timeout=300)
            assert found.returncode == 0, found.stderr[-2000:]
            path, name = json.loads(found.stdout)
            assert Path(path) == bundle_dir.resolve() and name == "racm3-demo"
    finally:
        mount.unlink()


# --- the whole stack (slow) --------------------------------------------------------------


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    health_port: int | None


class ComposeStack:
    """docker-compose.yml's services as local processes of the installed package: compose
    host names and container ports become 127.0.0.1 and free ports."""

    CONTAINER_PORTS = {"retriever": 8001, "generator": 8002, "gateway": 8000, "redis": 6379}

    def __init__(self, installed: Installed, services: dict, logs: Path) -> None:
        self.installed, self.services, self.logs = installed, services, logs
        self.ports = {name: free_port() for name in services}
        self.started: list[Service] = []

    def localise(self, value: str) -> str:
        """Compose host names and container ports -> 127.0.0.1 and this test's ports."""
        for host, port in self.CONTAINER_PORTS.items():
            value = value.replace(f"{host}:{port}", f"127.0.0.1:{self.ports[host]}")
        return value.replace("0.0.0.0", "127.0.0.1")

    def command(self, name: str) -> list[str]:
        args = [self.installed.map_paths(self.localise(a))
                for a in self.services[name]["command"]]
        if "--port" in args:
            args[args.index("--port") + 1] = str(self.ports[name])
        return args

    def environment(self, name: str) -> dict[str, str]:
        env = {k: self.localise(interpolate(str(v), {})) for k, v in
               self.services[name].get("environment", {}).items()}
        if "RACM3_HEALTH_PORT" in env:
            env["RACM3_HEALTH_PORT"] = str(self.ports[name])
        env["OMP_NUM_THREADS"] = "1"
        return self.installed.env(env)

    def run(self, name: str) -> subprocess.CompletedProcess:
        """A one-off service (the index builder), to completion."""
        return subprocess.run(
            self.installed.entrypoint(self.command(name)), cwd=self.installed.workdir,
            env=self.environment(name), capture_output=True, text=True, timeout=600)

    def start(self, name: str) -> Service:
        log = self.logs / f"{name}.log"
        args = self.command(name)
        cmd = self.installed.entrypoint(args) if name != "redis" else [
            *args, "--port", str(self.ports[name]), "--bind", "127.0.0.1"]
        proc = subprocess.Popen(cmd, cwd=self.installed.workdir, env=self.environment(name),
                                stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        service = Service(name, proc, log, self.ports[name])
        self.started.append(service)
        return service

    def healthy(self, service: Service, timeout_s: float = 300) -> None:
        """The image's HEALTHCHECK, run as Docker runs it, until it passes."""
        check = [self.installed.venv / "bin" / "python",
                 self.installed.map_paths(self.installed.dockerfile.healthcheck[-1])]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if service.proc.poll() is not None:
                pytest.fail(f"{service.name} exited {service.proc.returncode}:\n"
                            f"{service.log.read_text()[-3000:]}")
            probe = subprocess.run(check, env=self.environment(service.name),
                                   capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(1.0)
        pytest.fail(f"{service.name} not healthy after {timeout_s} s:\n"
                    f"{service.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for service in reversed(self.started):
            service.proc.terminate()
        for service in self.started:
            try:
                service.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_compose_stack_serves_from_a_non_editable_install(
        installed: Installed, smoke_bundle, tmp_path: Path) -> None:
    bundle_dir, _ = smoke_bundle
    services = read_compose()["services"]
    mounts = installed.workdir / "bundles"  # ./bundles:/app/bundles:ro, with the smoke
    mounts.mkdir(exist_ok=True)             # bundle as the demo bundle
    (mounts / "demo").symlink_to(bundle_dir, target_is_directory=True)
    stack = ComposeStack(installed, services, tmp_path)
    try:
        redis_proc = stack.start("redis")
        builder = stack.run("index-builder")
        assert builder.returncode == 0, builder.stderr[-3000:]
        memory = installed.path(services["index-builder"]["environment"]["RACM3_MEMORY_DIR"])
        version = (memory / "CURRENT").read_text().strip()
        assert redis_proc.proc.poll() is None

        # the gateway's depends_on: both backends healthy first
        backends = [stack.start("retriever"), stack.start("generator")]
        for service in backends:
            stack.healthy(service)
        stack.healthy(stack.start("gateway"))

        gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
        with httpx.Client(base_url=gateway, timeout=120) as client:
            ready = client.get("/readyz").json()
            assert ready["status"] == "ready", ready
            assert ready["checks"]["retriever.cache"] == "ok"  # the compose redis
            found = client.post("/v1/retrieve", json={"text": "a red square", "k": 2})
            assert found.status_code == 200, found.text
            assert found.json()["memory_version"] == version
            made = client.post("/v1/images/generations", json={
                "prompt": "a big red square", "n": 1, "seed": 1, "return_neighbours": True})
            assert made.status_code == 200, made.text
            body = made.json()
            assert body["data"][0]["b64_json"] and body["neighbours"]
            assert body["memory_version"] == version
    finally:
        stack.stop()

