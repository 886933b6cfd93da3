"""deploy/: the Raspberry Pi installer and unit, the Greengrass component, the IoT Edge manifest, the
Docker images and compose fleet — each checked against the real CLI parser and the real config
loader, and run where this machine can run it (install.sh into a temporary prefix, systemd-analyze,
the containers' commands as plain processes)."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer.main

from edgeloop.cli import app
from runtime.config import DeviceSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PI = DEPLOY / "raspberry-pi"
IN_CI = os.environ.get("CI", "").lower() == "true"
OFFLINE = os.environ.get("EDGELOOP_OFFLINE", "") == "1" and not IN_CI
DRAIN_DEFAULT = float(DeviceSettings.model_fields["drain_deadline"].default)


# --------------------------------------------------------------------------- helpers


def parse_cli(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Parse an ``edgeloop …`` command line with the real CLI parser (nothing runs).

    Returns the sub-command path and its parsed parameters; an unknown sub-command, an unknown
    option or a missing required one fails the test with the parser's own message."""
    assert Path(argv[0]).name == "edgeloop", f"not an edgeloop command line: {argv!r}"
    cmd: Any = typer.main.get_command(app)
    args = list(argv[1:])
    path = ["edgeloop"]
    while hasattr(cmd, "commands"):  # a group: descend into the named sub-command
        assert args, f"`{' '.join(path)}` needs a sub-command"
        name = args.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, f"`{' '.join(path)}` has no sub-command {name!r} (has: {sorted(cmd.commands)})"
        cmd = sub
        path.append(name)
    try:
        ctx = cmd.make_context(" ".join(path), args)
    except Exception as exc:
        if not hasattr(exc, "format_message"):
            raise
        raise AssertionError(f"`{shlex.join(argv)}` does not parse: {exc.format_message()}") from None
    return " ".join(path), dict(ctx.params)


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as ``{section: [(key, value), ...]}``; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}:{n}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{n}: not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    """systemd time span: ``30``, ``30s``, ``1min 30s``, ``2min``."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "ms": 0.001, "h": 3600.0}
    total = 0.0
    for part in value.split():
        num = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        total += float(num) * units[part[len(num) :]]
    return total


def run(argv: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)


# --------------------------------------------------------------------------- Raspberry Pi: install.sh


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edgeloop built as a wheel from a copy of the tree (the checkout stays untouched), offline."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in ("runtime", "cloud", "devices", "edgeloop"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = root / "dist"
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src])
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("edgeloop-*.whl")
    return whl


def install(prefix: Path, wheel: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(["sh", PI / "install.sh", "--prefix", prefix, "--source", wheel, "--python", sys.executable, *extra])


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """install.sh into a temporary prefix; ``--no-deps`` keeps it offline and quick (the full,
    networked install is test_full_install_runs_the_daemon)."""
    prefix = tmp_path_factory.mktemp("pi-root")
    r = install(prefix, wheel, "--pip-args", "--no-deps", "--device-id", "pi-test-01")
    assert r.returncode == 0, f"install.sh failed:\n{r.stdout}\n{r.stderr}"
    return prefix


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_lays_out_files_with_modes(installed: Path) -> None:
    venv = installed / "opt/edgeloop/venv"
    exe = venv / "bin/edgeloop"
    assert exe.is_file() and os.access(exe, os.X_OK)
    assert (venv / "bin/python").exists()
    assert mode(installed / "etc/edgeloop") == 0o750
    assert mode(installed / "etc/edgeloop/tls") == 0o750
    assert mode(installed / "etc/edgeloop/device.toml") == 0o640
    assert mode(installed / "etc/systemd/system/edgeloop.service") == 0o644
    assert (installed / "opt/edgeloop/README.md").read_text() == (DEPLOY / "README.md").read_text()
    # The installed package is this checkout's (the CLI and the daemon, not just the metadata).
    site = next(venv.glob("lib/python3*/site-packages"))
    for rel in ("runtime/daemon.py", "edgeloop/cli/device.py"):
        assert (site / rel).read_bytes() == (REPO / rel).read_bytes()


def test_installed_config_is_valid_and_points_into_the_prefix(installed: Path) -> None:
    conf = installed / "etc/edgeloop/device.toml"
    s = load_settings(conf, env={})
    assert s.device_id == "pi-test-01"
    assert s.state_dir == Path("/var/lib/edgeloop")  # systemd's StateDirectory=edgeloop
    assert s.public_key == installed / "etc/edgeloop/fleet.pub"
    assert s.broker.cert == installed / "etc/edgeloop/tls/device.crt"
    assert s.broker.url.startswith("mqtts://")
    assert s.drain_deadline == DRAIN_DEFAULT
    assert "@" not in conf.read_text().replace("@CONFIG_DIR@", "")  # no placeholder left
    # The env overrides the unit (or an operator) may set still apply on top of it.
    s2 = load_settings(conf, env={"EDGELOOP_BROKER__URL": "mqtts://10.0.0.1:8883", "EDGELOOP_DRAIN_DEADLINE": "5"})
    assert s2.broker.url == "mqtts://10.0.0.1:8883" and s2.drain_deadline == 5.0


def test_install_is_idempotent_and_keeps_the_operators_config(installed: Path, wheel: Path) -> None:
    conf = installed / "etc/edgeloop/device.toml"
    conf.write_text(conf.read_text().replace('fleet = "default"', 'fleet = "kept"'))
    r = install(installed, wheel, "--pip-args", "--no-deps", "--device-id", "other-id")
    assert r.returncode == 0, r.stderr
    assert "keeping existing" in r.stdout
    assert load_settings(conf, env={}).fleet == "kept"
    assert load_settings(conf, env={}).device_id == "pi-test-01"


def test_install_refuses_bad_input_before_changing_anything(tmp_path: Path, wheel: Path) -> None:
    cases = {
        ("--prefix", "relative/root"): "absolute path",
        ("--prefix", str(tmp_path / "a"), "--device-id", "../etc"): "not valid",
        ("--prefix", str(tmp_path / "b"), "--extras", "onnx;rm -rf /"): "comma-separated",
        ("--prefix", str(tmp_path / "c"), "--bogus"): "unknown option",
        ("--prefix", str(tmp_path / "d"), "--python", "/nonexistent/python3"): "older than 3.11",
    }
    for args, message in cases.items():
        r = run(["sh", PI / "install.sh", "--source", wheel, *args])
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
    assert not any(tmp_path.iterdir()), "a refused install left files behind"


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


USER_BEFORE = user_exists("edgeloop")  # read at import, before any install.sh ran


def test_install_skips_the_user_outside_the_real_root(installed: Path) -> None:
    """install.sh ran (as root, here) into a temporary prefix: it must not have created a user."""
    if USER_BEFORE:
        pytest.skip("this machine already has a user named edgeloop; cannot tell whether install.sh made it")
    assert not user_exists("edgeloop")


def test_install_script_is_posix_sh() -> None:
    r = run(["sh", "-n", PI / "install.sh"])
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = run(["shellcheck", "--shell=sh", PI / "install.sh", DEPLOY / "docker/entrypoint.sh"])
        assert r.returncode == 0, r.stdout


# --------------------------------------------------------------------------- Raspberry Pi: the unit


HARDENING = {
    "User": "edgeloop",
    "StateDirectory": "edgeloop",
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "NoNewPrivileges": "true",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "KillMode": "mixed",
    "PrivateDevices": "true",
    "CapabilityBoundingSet": "",
    "RestrictSUIDSGID": "true",
}


@pytest.mark.parametrize("which", ["template", "installed"])
def test_unit_is_hardened(which: str, installed: Path) -> None:
    path = PI / "edgeloop.service" if which == "template" else installed / "etc/systemd/system/edgeloop.service"
    unit = unit_file(path)
    svc = unit["Service"]
    for key, want in HARDENING.items():
        assert one(svc, key) == want, f"{key}= should be {want!r}"
    assert one(svc, "MemoryMax").endswith(("M", "G"))
    assert "AF_UNIX" in one(svc, "RestrictAddressFamilies")
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_unit_stop_timeout_covers_the_drain_deadline() -> None:
    """systemd SIGKILLs at TimeoutStopSec; the daemon drains for drain_deadline after SIGTERM."""
    svc = unit_file(PI / "edgeloop.service")["Service"]
    stop = seconds(one(svc, "TimeoutStopSec"))
    sample = tomllib.loads((PI / "device.toml").read_text())
    drain = float(sample.get("drain_deadline", DRAIN_DEFAULT))
    assert drain == DRAIN_DEFAULT
    assert drain + 5 <= stop <= drain + 30, f"TimeoutStopSec={stop} s vs drain_deadline={drain} s"
    text = (PI / "edgeloop.service").read_text()
    assert "drain_deadline" in text, "the unit should say why TimeoutStopSec has its value"


@pytest.mark.parametrize("which", ["template", "installed"])
def test_unit_execstart_parses_with_the_cli(which: str, installed: Path) -> None:
    path = PI / "edgeloop.service" if which == "template" else installed / "etc/systemd/system/edgeloop.service"
    argv = shlex.split(one(unit_file(path)["Service"], "ExecStart"))
    command, params = parse_cli(argv)
    assert command == "edgeloop device run"
    if which == "installed":
        assert Path(argv[0]) == installed / "opt/edgeloop/venv/bin/edgeloop"
        assert Path(params["config"]) == installed / "etc/edgeloop/device.toml"
        assert Path(params["config"]).is_file()
    else:
        assert argv[0] == "/opt/edgeloop/venv/bin/edgeloop"
        assert params["config"] == Path("/etc/edgeloop/device.toml")


def test_unit_passes_systemd_analyze(installed: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not found (apt-get install systemd)")
    unit = installed / "etc/systemd/system/edgeloop.service"
    r = run([tool, "verify", unit])
    # (other units of this machine may draw warnings of their own; none may concern ours)
    ours = [line for line in r.stderr.splitlines() if "edgeloop" in line]
    assert r.returncode == 0 and not ours, r.stderr
    # Overall exposure on systemd's 0-100 scale (printed as 0.0-10.0): at most 2.0 "OK".
    r = run([tool, "security", "--offline=true", "--threshold=20", unit])
    assert r.returncode == 0, r.stdout[-2000:]


@pytest.mark.network
def test_full_install_runs_the_daemon(wheel: Path, tmp_path: Path) -> None:
    """install.sh with the real dependencies from PyPI (pip's cache keeps reruns quick), then the
    unit's ExecStart as a plain process: it connects, and SIGTERM stops it with exit 0 well
    within TimeoutStopSec."""
    if OFFLINE:
        pytest.skip("EDGELOOP_OFFLINE=1")
    prefix = tmp_path / "root"
    r = install(prefix, wheel, "--device-id", "pi-full-01", "--pip-args", "--no-compile")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    exe = prefix / "opt/edgeloop/venv/bin/edgeloop"
    r = run([exe, "device", "run", "--help"])
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    unit = unit_file(prefix / "etc/systemd/system/edgeloop.service")["Service"]
    argv = shlex.split(one(unit, "ExecStart"))
    stop_timeout = seconds(one(unit, "TimeoutStopSec"))
    run_installed_daemon(argv, prefix, stop_timeout)


def run_installed_daemon(argv: list[str], prefix: Path, stop_timeout: float) -> None:
    import uuid

    from helpers_cloudsdk import free_port, run_mosquitto

    from runtime.artifacts import generate_keypair

    conf_dir = prefix / "etc/edgeloop"
    generate_keypair(conf_dir, overwrite=False)  # fleet.key + fleet.pub, as the cloud would
    port = free_port()
    with run_mosquitto(prefix / "broker", f"listener {port} 127.0.0.1\nallow_anonymous true\n", port) as broker:
        device = f"pi-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            # What a test cannot take from the sample config: a writable state dir, a loopback
            # broker without TLS files, no local readings broker.
            "EDGELOOP_DEVICE_ID": device,
            "EDGELOOP_STATE_DIR": str(prefix / "var/lib/edgeloop"),
            "EDGELOOP_BROKER__URL": f"mqtt://127.0.0.1:{port}",
            "EDGELOOP_SOURCE__KIND": "none",
        }
        conf = Path(argv[argv.index("--config") + 1])
        plain = conf.with_name("device-test.toml")
        text = "\n".join(
            line for line in conf.read_text().splitlines() if not line.startswith(("ca =", "cert =", "key ="))
        )
        plain.write_text(text + "\n")
        argv = [*argv[: argv.index("--config") + 1], str(plain)]
        assert_stops_cleanly(argv, env, broker, device, stop_timeout)


def assert_stops_cleanly(
    argv: Sequence[str], env: dict[str, str], broker: Any, device: str, stop_timeout: float
) -> None:
    """Start ``argv``; once ``device`` is connected to ``broker``, SIGTERM it: it must exit 0 within
    ``stop_timeout`` seconds (what systemd, Docker or the nucleus allow before SIGKILL)."""
    import signal
    import time

    from helpers_cloudsdk import wait_until

    log = Path(broker.folder) / f"{device}.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: device in broker.log_text() or proc.poll() is not None, 30.0, "the daemon to connect")
        assert proc.poll() is None, f"the daemon exited {proc.returncode} at start:\n{log.read_text()[-3000:]}"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=stop_timeout)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, f"the daemon exited {rc} on SIGTERM:\n{log.read_text()[-3000:]}"
    assert took < stop_timeout


# --------------------------------------------------------------------------- Greengrass v2


GG = DEPLOY / "greengrass"
DEVICE_WRITES = {"results", "telemetry", "stats", "reported", "status", "cmd/result"}
DEVICE_READS = {"desired", "cmd", "ack"}
THING = "core-42"
GG_VARS = {
    "{iot:thingName}": THING,
    "{work:path}": "/greengrass/v2/work/edgeloop.Device",
    "{artifacts:path}": "/greengrass/v2/packages/artifacts/edgeloop.Device/0.1.0",
}
RECIPE_KEYS = {
    "RecipeFormatVersion",
    "ComponentName",
    "ComponentVersion",
    "ComponentDescription",
    "ComponentPublisher",
    "ComponentConfiguration",
    "ComponentDependencies",
    "ComponentType",
    "ComponentSource",
    "Manifests",
    "Lifecycle",
}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def load_recipe() -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((GG / "recipe.yaml").read_text())
    assert isinstance(data, dict)
    return data


def gg_interpolate(text: str, recipe: dict[str, Any], variables: dict[str, str] | None = None) -> str:
    """What the nucleus does to recipe strings: {configuration:/key} and the platform variables."""
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]

    def conf(m: re.Match[str]) -> str:
        assert m.group(1) in defaults, f"{{configuration:/{m.group(1)}}} has no default"
        return str(defaults[m.group(1)])

    out = re.sub(r"\{configuration:/([A-Za-z0-9_]+)\}", conf, text)
    for var, value in (variables or GG_VARS).items():
        out = out.replace(var, value)
    left = re.findall(r"\{[a-zA-Z_]+:[^}]*\}", out)
    assert not left, f"recipe variables this test does not know: {left}"
    return out


def linux_manifest(recipe: dict[str, Any]) -> dict[str, Any]:
    (manifest,) = [m for m in recipe["Manifests"] if m.get("Platform", {}).get("os") == "linux"]
    return dict(manifest)


def lifecycle_script(step: Any) -> str:
    return str(step["Script"] if isinstance(step, dict) else step)


def test_greengrass_recipe_has_the_formats_required_fields() -> None:
    recipe = load_recipe()
    assert set(recipe) <= RECIPE_KEYS, f"unknown recipe keys: {set(recipe) - RECIPE_KEYS}"
    assert recipe["RecipeFormatVersion"] == "2020-01-25"  # a string: unquoted YAML would make it a date
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe["ComponentName"])
    assert SEMVER.match(recipe["ComponentVersion"])
    assert recipe["ComponentVersion"] == pyproject_version()
    assert recipe["ComponentDescription"].strip() and recipe["ComponentPublisher"].strip()
    manifest = linux_manifest(recipe)
    life = manifest["Lifecycle"]
    assert {k.lower() for k in life} >= {"install", "run", "setenv"}
    for artifact in manifest["Artifacts"]:
        assert artifact["URI"].startswith("s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/"), artifact
    assert isinstance(recipe["ComponentConfiguration"]["DefaultConfiguration"], dict)


def test_greengrass_access_control_allows_only_the_devices_own_topics() -> None:
    recipe = load_recipe()
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    fleet = defaults["fleet"]
    policies = defaults["accessControl"]
    assert set(policies) == {"aws.greengrass.ipc.mqttproxy"}, "no IPC service beyond IoT Core MQTT"
    allowed: dict[str, set[str]] = {
        "aws.greengrass#PublishToIoTCore": set(),
        "aws.greengrass#SubscribeToIoTCore": set(),
    }
    for policy_id, policy in policies["aws.greengrass.ipc.mqttproxy"].items():
        assert policy_id.startswith(recipe["ComponentName"] + ":"), "policy ids are unique per component"
        assert policy["policyDescription"].strip()
        ops = policy["operations"]
        assert len(ops) == 1 and ops[0] in allowed, f"{policy_id}: one operation per policy, not {ops}"
        for resource in policy["resources"]:
            assert not set(resource) & {"*", "#", "+"}, f"{policy_id}: wildcard in {resource!r}"
            m = re.fullmatch(r"edgeloop/([^/]+)/\{iot:thingName\}/(.+)", resource)
            assert m and m.group(1) == fleet, f"{policy_id}: {resource!r} is not edgeloop/{fleet}/{{iot:thingName}}/…"
            allowed[ops[0]].add(m.group(2))
    assert allowed["aws.greengrass#PublishToIoTCore"] == DEVICE_WRITES
    assert allowed["aws.greengrass#SubscribeToIoTCore"] == DEVICE_READS


def test_greengrass_policy_covers_what_the_transport_sends() -> None:
    """The transport's own IPC requests (built with the SDK's model types) are all allowed."""
    pytest.importorskip("awsiot.greengrasscoreipc.model", reason="awsiotsdk missing: pip install 'edgeloop[aws]'")
    from runtime.transports.greengrass import publish_request, subscribe_requests

    recipe = load_recipe()
    fleet = recipe["ComponentConfiguration"]["DefaultConfiguration"]["fleet"]
    policies = recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]["aws.greengrass.ipc.mqttproxy"]
    allowed: dict[str, set[str]] = {}
    for policy in policies.values():
        for op in policy["operations"]:
            allowed.setdefault(op, set()).update(gg_interpolate(r, recipe) for r in policy["resources"])
    for suffix in sorted(DEVICE_WRITES):
        req = publish_request(fleet, THING, suffix, b"{}")
        assert req.topic_name in allowed["aws.greengrass#PublishToIoTCore"], req.topic_name
    for req in subscribe_requests(fleet, THING, with_ack=True):
        assert req.topic_name in allowed["aws.greengrass#SubscribeToIoTCore"], req.topic_name


def test_greengrass_run_command_parses_with_the_cli() -> None:
    recipe = load_recipe()
    life = linux_manifest(recipe)["Lifecycle"]
    script = gg_interpolate(lifecycle_script(life["run"]), recipe).strip()
    assert script.startswith("exec "), "exec, so that the daemon itself gets the nucleus's stop signal"
    argv = shlex.split(script)[1:]
    command, params = parse_cli(argv)
    assert command == "edgeloop device run"
    assert argv[0] == f"{GG_VARS['{work:path}']}/venv/bin/edgeloop"
    assert params["config"] == Path(GG_VARS["{artifacts:path}"]) / "device.toml"


def test_greengrass_install_makes_a_venv_with_the_aws_extra() -> None:
    recipe = load_recipe()
    manifest = linux_manifest(recipe)
    install_step = manifest["Lifecycle"]["install"]
    script = gg_interpolate(lifecycle_script(install_step), recipe)
    work = GG_VARS["{work:path}"]
    assert f"-m venv --clear {work}/venv" in script
    wheel_name = f"edgeloop-{pyproject_version()}-py3-none-any.whl"
    assert f"{GG_VARS['{artifacts:path}']}/{wheel_name}[aws]" in script
    assert "aws" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert int(install_step["Timeout"]) >= 300, "pip on a small core takes minutes; the default is 120 s"
    shipped = {a["URI"].rsplit("/", 1)[1] for a in manifest["Artifacts"]}
    assert shipped == {wheel_name, "device.toml", "fleet.pub"}


def gg_environment(recipe: dict[str, Any], variables: dict[str, str] | None = None) -> dict[str, str]:
    setenv = linux_manifest(recipe)["Lifecycle"]["Setenv"]
    return {k: gg_interpolate(str(v), recipe, variables) for k, v in setenv.items()}


def test_greengrass_config_validates_with_the_recipes_environment() -> None:
    recipe = load_recipe()
    env = gg_environment(recipe)
    s = load_settings(GG / "device.toml", env=env)
    assert s.device_id == THING
    assert s.broker.transport == "greengrass"
    assert s.fleet == recipe["ComponentConfiguration"]["DefaultConfiguration"]["fleet"]
    assert s.state_dir == Path(GG_VARS["{work:path}"]) / "state"
    assert s.public_key == Path(GG_VARS["{artifacts:path}"]) / "fleet.pub"
    assert s.drain_deadline == float(recipe["ComponentConfiguration"]["DefaultConfiguration"]["drainDeadline"])


def test_gdk_config_matches_the_recipe() -> None:
    import json

    gdk = json.loads((GG / "gdk-config.json").read_text())
    assert set(gdk) == {"component", "gdk_version"}
    assert SEMVER.match(gdk["gdk_version"])
    recipe = load_recipe()
    assert list(gdk["component"]) == [recipe["ComponentName"]]
    comp = gdk["component"][recipe["ComponentName"]]
    assert set(comp) >= {"author", "version", "build", "publish"}
    assert comp["version"] == recipe["ComponentVersion"]
    assert comp["build"]["build_system"] == "custom"
    assert comp["build"]["custom_build_command"] == ["sh", "build.sh"]
    assert (GG / "build.sh").is_file()
    assert comp["publish"]["bucket"] and comp["publish"]["region"]


def test_gdk_build_lays_out_the_component(wheel: Path, tmp_path: Path) -> None:
    from runtime.artifacts import generate_keypair

    _key, pub = generate_keypair(tmp_path / "keys", overwrite=False)
    out = tmp_path / "greengrass-build"
    env = {**os.environ, "WHEEL": str(wheel), "FLEET_PUB": str(pub), "BUILD_DIR": str(out), "PYTHON": sys.executable}
    r = run(["sh", GG / "build.sh"], env=env)
    assert r.returncode == 0, r.stderr
    recipe = load_recipe()
    assert (out / "recipes/recipe.yaml").read_text() == (GG / "recipe.yaml").read_text()
    art = out / "artifacts" / recipe["ComponentName"] / recipe["ComponentVersion"]
    for artifact in linux_manifest(recipe)["Artifacts"]:
        assert (art / artifact["URI"].rsplit("/", 1)[1]).is_file(), artifact["URI"]
    # Without a key it refuses, with the reason.
    r = run(["sh", GG / "build.sh"], env={**env, "FLEET_PUB": str(tmp_path / "missing.pub")})
    assert r.returncode != 0 and "FLEET_PUB" in r.stderr


def test_greengrass_run_without_a_nucleus_fails_fast_and_says_why(tmp_path: Path) -> None:
    """The component's run command, as the nucleus would start it but with no nucleus: a clear
    error within seconds, not a hang (the installed venv is stood in for by this checkout's)."""
    from runtime.artifacts import generate_keypair

    recipe = load_recipe()
    artifacts, work = tmp_path / "artifacts", tmp_path / "work"
    work.mkdir()
    generate_keypair(artifacts, overwrite=False)
    shutil.copy2(GG / "device.toml", artifacts / "device.toml")
    variables = {**GG_VARS, "{work:path}": str(work), "{artifacts:path}": str(artifacts)}
    script = gg_interpolate(lifecycle_script(linux_manifest(recipe)["Lifecycle"]["run"]), recipe, variables)
    argv = shlex.split(script)[1:]
    argv[0] = str(Path(sys.executable).with_name("edgeloop"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELOOP_", "AWS_GG_", "SVCUID"))}
    env.update(gg_environment(recipe, variables))
    env["EDGELOOP_SOURCE__KIND"] = "none"  # no local readings broker here
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT" in r.stderr or "nucleus" in r.stderr, r.stderr


# --------------------------------------------------------------------------- Docker: the Dockerfile


DOCKER = DEPLOY / "docker"


@dataclass
class Stage:
    name: str
    base: str  # image or stage name, ARGs resolved
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments and parser directives dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_stages(path: Path) -> dict[str, Stage]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: args[g.group(1) or g.group(2)], m.group(1))
            current = Stage(m.group(2), base)
            assert current.name not in stages, f"stage {current.name} twice"
            stages[current.name] = current
        else:
            assert current is not None, f"{word} before the first FROM"
            current.instructions.append((word, rest))
    return stages


def effective(stages: dict[str, Stage], target: str, word: str) -> str | None:
    """The last ``word`` instruction in ``target`` or the stages it is built FROM."""
    stage = stages[target]
    for w, rest in reversed(stage.instructions):
        if w == word:
            return rest
    return effective(stages, stage.base, word) if stage.base in stages else None


def root_image(stages: dict[str, Stage], target: str) -> str:
    base = stages[target].base
    return root_image(stages, base) if base in stages else base


def exec_form(value: str | None, what: str) -> list[str]:
    import json

    assert value is not None, f"no {what}"
    try:
        argv = json.loads(value)
    except ValueError:
        raise AssertionError(f"{what} is in shell form ({value!r}); use exec form, a JSON array") from None
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), value
    return argv


def test_dockerfile_targets_are_slim_non_root_and_exec_form() -> None:
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    assert {"device", "cloud"} <= set(stages)
    for target in ("device", "cloud"):
        assert root_image(stages, target).startswith("python:3.11-slim"), root_image(stages, target)
        user = effective(stages, target, "USER")
        assert user and user.split(":")[0] not in ("root", "0"), f"{target} runs as {user!r}"
        assert effective(stages, target, "STOPSIGNAL") == "SIGTERM"
        entry = exec_form(effective(stages, target, "ENTRYPOINT"), f"{target} ENTRYPOINT")
        cmd = exec_form(effective(stages, target, "CMD"), f"{target} CMD")
        assert entry == ["/usr/local/bin/edgeloop-entrypoint"]
        command, params = parse_cli(cmd)
        assert command == {"device": "edgeloop device run", "cloud": "edgeloop cloud serve"}[target]
        # The config the command names is the one the image copies in, and it is valid.
        copies = [rest.split()[-2:] for w, rest in stages[target].instructions if w == "COPY"]
        assert [f"deploy/docker/{target}.toml", str(params["config"])] in copies
    # The user the images run as exists in them (created in the stage they build on).
    base_runs = " ".join(rest for w, rest in stages["base"].instructions if w == "RUN")
    assert "useradd" in base_runs and "edgeloop" in base_runs


def test_dockerfile_states_its_stop_signal_and_grace_period() -> None:
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    found = 0
    for i, line in enumerate(lines):
        if line.startswith("STOPSIGNAL"):
            found += 1
            block: list[str] = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                block.insert(0, lines[j])
                j -= 1
            why = " ".join(block)
            assert "SIGTERM" in why and "Grace period: 30 s" in why, f"say why beside {line!r}: {why!r}"
    assert found == 2  # device and cloud
    assert DRAIN_DEFAULT + 5 <= 30


def test_dockerfile_copies_only_what_exists_and_builds_from_its_stages() -> None:
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    for stage in stages.values():
        for word, rest in stage.instructions:
            if word == "COPY" and "--from=" not in rest:
                sources = [a for a in rest.split()[:-1] if not a.startswith("--")]
                for src in sources:
                    assert (REPO / src).exists(), f"COPY {src}: not in the build context"
            for ref in re.findall(r"from=([\w.-]+)", rest):
                assert ref in stages, f"{stage.name}: refers to a stage {ref!r} that does not exist"
    entry = [rest for w, rest in stages["base"].instructions if w == "COPY" and "entrypoint" in rest]
    assert entry and entry[0].endswith("deploy/docker/entrypoint.sh /usr/local/bin/edgeloop-entrypoint")
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)


def test_docker_configs_are_valid() -> None:
    from cloud.config import load_cloud_settings

    s = load_settings(DOCKER / "device.toml", env={"EDGELOOP_DEVICE_ID": "0123456789ab"})  # a container hostname
    assert s.broker.transport == "mqtt" and s.state_dir == Path("/var/lib/edgeloop")
    assert s.drain_deadline == DRAIN_DEFAULT
    c = load_cloud_settings(DOCKER / "cloud.toml")
    assert c.fleet == s.fleet
    assert c.http_host == "0.0.0.0"
    assert c.public_key.parent == Path("/var/lib/edgeloop/keys")


# --------------------------------------------------------------------------- Docker: compose


EDGELOOP_SERVICES = ("cloud", "sim", "device")


def compose_interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's variable substitution: ``${VAR:-default}``, ``${VAR}``, ``$$`` for a literal ``$``."""
    env = env or {}
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(3)
            got = env.get(name, "")
            assert got or default is not None, f"${{{name}}} has no default"
            return got or (default or "")

        return re.sub(r"\$\$|\$\{(\w+)(:-([^}]*))?\}", sub, value)
    if isinstance(value, list):
        return [compose_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: compose_interpolate(v, env) for k, v in value.items()}
    return value


def load_compose() -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())  # PyYAML resolves the << merge keys
    return dict(compose_interpolate(data))


def test_compose_services_build_the_dockerfiles_targets() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"mosquitto", "cloud", "sim", "device"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    version = pyproject_version()
    for name in EDGELOOP_SERVICES:
        svc = services[name]
        build = svc["build"]
        assert (DOCKER / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
        assert build["target"] in stages
        # One image name per target, tagged with the package version.
        assert svc["image"] == f"edgeloop-{build['target']}:{version}", svc["image"]


def test_compose_commands_parse_with_the_cli_and_match_the_images() -> None:
    services = load_compose()["services"]
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    want = {"cloud": "edgeloop cloud serve", "sim": "edgeloop sim run", "device": "edgeloop device run"}
    for name, command in want.items():
        argv = [str(a) for a in services[name]["command"]]
        got, params = parse_cli(argv)
        assert got == command
        if name in ("cloud", "device"):
            # The service runs what the image runs by default.
            assert argv == exec_form(effective(stages, services[name]["build"]["target"], "CMD"), "CMD")
        if name == "sim":
            assert params["broker"] == "mqtt://mosquitto:1883"
            assert params["fleet"] == "demo"
            assert int(params["devices"]) >= 1
            # its state on the container's own volume, the key from the shared one
            assert Path(params["state_dir"]).is_relative_to("/var/lib/edgeloop")
            assert "/var/lib/edgeloop" in [e.strip('"[]') for w, e in stages["cloud"].instructions if w == "VOLUME"]
            mounts = dict(reversed(v.split(":")[:2]) for v in services["sim"]["volumes"])
            assert mounts[str(Path(params["public_key"]).parent)] == "fleet-keys"
    for svc in services.values():
        test = svc.get("healthcheck", {}).get("test")
        if test is not None:
            assert test[0] == "CMD", "healthchecks in exec form"


def test_compose_stop_grace_covers_the_drain() -> None:
    services = load_compose()["services"]
    for name in EDGELOOP_SERVICES:
        svc = services[name]
        assert svc["stop_signal"] == "SIGTERM"
        grace = seconds(svc["stop_grace_period"])
        drain = float(svc.get("environment", {}).get("EDGELOOP_DRAIN_DEADLINE", DRAIN_DEFAULT))
        assert grace >= drain + 5, f"{name}: stop_grace_period {grace} s vs drain_deadline {drain} s"


def test_compose_ports_and_volumes_are_consistent() -> None:
    from cloud.config import load_cloud_settings

    compose = load_compose()
    services = compose["services"]
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host = str(port).rpartition(":")[0]
            assert host.startswith("127.0.0.1:"), f"{name}: publish {port} on loopback only"
        for vol in svc.get("volumes", []):
            source, target = str(vol).split(":")[:2]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            assert target.startswith("/")
        for dep in svc.get("depends_on", {}):
            assert dep in services
    assert used == declared, f"declared but unused volumes: {declared - used}"

    # The broker the services use is the compose broker, on the port its config opens.
    conf = conf_options_of(DEPLOY / "mosquitto" / "compose.conf")
    assert conf["listener"] == ["1883"]
    assert [p.rsplit(":", 1)[1] for p in services["mosquitto"]["ports"]] == ["1883"]
    assert "../mosquitto/compose.conf:/mosquitto/config/mosquitto.conf:ro" in services["mosquitto"]["volumes"]
    assert conf["persistence_location"] == ["/mosquitto/data/"]
    assert "mosquitto-data:/mosquitto/data" in services["mosquitto"]["volumes"]

    cloud = load_cloud_settings(DOCKER / "cloud.toml")
    assert cloud.broker == "mqtt://mosquitto:1883"
    assert [p.rsplit(":", 1)[1] for p in services["cloud"]["ports"]] == [str(cloud.http_port)]
    assert cloud.public_url == f"http://cloud:{cloud.http_port}"
    # State, keys and the shared public key live on volumes, where the configs say.
    mounts = {svc: dict(reversed(v.split(":")[:2]) for v in services[svc]["volumes"]) for svc in EDGELOOP_SERVICES}
    assert mounts["cloud"]["/var/lib/edgeloop"] == "cloud-data"
    assert mounts["cloud"][str(cloud.signing_key.parent)] == "fleet-keys"
    assert services["cloud"]["environment"]["FLEET_KEYS_DIR"] == str(cloud.signing_key.parent)
    assert cloud.store == "sqlite:////var/lib/edgeloop/cloud.db"
    dev = load_settings(DOCKER / "device.toml", env={"EDGELOOP_DEVICE_ID": "x", **services["device"]["environment"]})
    assert mounts["device"][str(dev.public_key.parent)] == "fleet-keys"
    assert mounts["sim"]["/etc/edgeloop/keys"] == "fleet-keys"
    assert dev.fleet == cloud.fleet
    assert dev.broker.url == cloud.broker


def conf_options_of(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


# --------------------------------------------------------------------------- Docker: the containers' commands, as processes


def entrypoint(argv: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *argv], env=env, capture_output=True, text=True, timeout=60
    )


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELOOP_", "IOTEDGE_", "FLEET_KEYS_DIR"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `edgeloop` as in the image
    return env


def test_entrypoint_gives_each_container_a_device_id_and_execs() -> None:
    hostname = Path("/proc/sys/kernel/hostname").read_text().strip()
    show = ["sh", "-c", 'echo "$EDGELOOP_DEVICE_ID"']
    assert entrypoint(show, base_env()).stdout.strip() == hostname  # compose replicas: the container hostname
    assert entrypoint(show, {**base_env(), "IOTEDGE_DEVICEID": "edge-7"}).stdout.strip() == "edge-7"
    preset = {**base_env(), "EDGELOOP_DEVICE_ID": "preset", "IOTEDGE_DEVICEID": "edge-7"}
    assert entrypoint(show, preset).stdout.strip() == "preset"
    # exec: the command replaces the entrypoint's shell, so docker's SIGTERM reaches it.
    proc = subprocess.Popen(
        ["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", "echo $$"], env=base_env(), stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=30)
    assert int(out.strip()) == proc.pid
    # The command's exit status is the container's.
    assert entrypoint(["sh", "-c", "exit 3"], base_env()).returncode == 3


def test_entrypoint_creates_the_fleet_key_once(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    env = {**base_env(), "FLEET_KEYS_DIR": str(keys)}
    r = entrypoint(["true"], env)
    assert r.returncode == 0, r.stderr
    assert mode(keys / "fleet.key") == 0o600 and (keys / "fleet.pub").is_file()
    before = (keys / "fleet.key").read_bytes()
    r = entrypoint(["true"], env)
    assert r.returncode == 0, r.stderr
    assert (keys / "fleet.key").read_bytes() == before, "a restart must never replace the signing key"


class Running:
    """A service's command as a plain process, output to a file, SIGTERM and exit code on stop."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                ["sh", str(DOCKER / "entrypoint.sh"), *argv], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float) -> tuple[int, float]:
        """SIGTERM, wait up to ``grace`` seconds (then SIGKILL, as docker would); return (code, seconds)."""
        import signal
        import time

        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop within {grace} s of SIGTERM:\n{self.output()}") from None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_compose_services_commands_run_as_processes(tmp_path: Path) -> None:
    """The cloud, device and sim services' commands, through the image's entrypoint, with the
    compose environment — only the paths the volumes provide and the broker's address are mapped to
    this machine. All connect, and all stop on SIGTERM with exit 0 within stop_grace_period."""
    from helpers_cloudsdk import free_port, run_mosquitto, wait_until

    from runtime.config import dump_toml

    services = load_compose()["services"]
    mqtt_port, http_port = free_port(), free_port()
    conf = (DEPLOY / "mosquitto" / "compose.conf").read_text()
    conf = conf.replace("listener 1883\n", f"listener {mqtt_port} 127.0.0.1\n")
    conf = conf.replace("persistence_location /mosquitto/data/", f"persistence_location {tmp_path}/mqdata/")
    (tmp_path / "mqdata").mkdir()
    volumes = {"/var/lib/edgeloop": tmp_path / "cloud-data", "/etc/edgeloop/keys": tmp_path / "keys"}
    with run_mosquitto(tmp_path / "mosquitto", conf, mqtt_port) as broker:
        broker_url = f"mqtt://127.0.0.1:{mqtt_port}"
        # cloud: cloud.toml as the image has it, the compose network's names mapped to loopback
        cloud_conf = tomllib.loads((DOCKER / "cloud.toml").read_text())
        keys_dir = volumes["/etc/edgeloop/keys"]  # the fleet-keys volume, mounted in both services
        cloud_conf.update(
            broker=broker_url,
            http_host="127.0.0.1",
            http_port=http_port,
            public_url=f"http://127.0.0.1:{http_port}",
            store=f"sqlite:///{volumes['/var/lib/edgeloop']}/cloud.db",
            signing_key=str(keys_dir / "fleet.key"),
            public_key=str(keys_dir / "fleet.pub"),
            artifacts_dir=str(volumes["/var/lib/edgeloop"] / "artifacts"),
        )
        volumes["/var/lib/edgeloop"].mkdir()
        cloud_toml = tmp_path / "cloud.toml"
        cloud_toml.write_text(dump_toml(cloud_conf))
        cloud_cmd = [str(cloud_toml) if a == "/etc/edgeloop/cloud.toml" else a for a in services["cloud"]["command"]]
        cloud_env = {**base_env(), **services["cloud"]["environment"], "FLEET_KEYS_DIR": str(keys_dir)}

        device_env = {
            **base_env(),
            **services["device"]["environment"],
            "EDGELOOP_BROKER__URL": broker_url,
            "EDGELOOP_STATE_DIR": str(tmp_path / "device-state"),  # the replica's anonymous volume
            "EDGELOOP_PUBLIC_KEY": str(keys_dir / "fleet.pub"),
        }
        device_cmd = [
            str(DOCKER / "device.toml") if a == "/etc/edgeloop/device.toml" else a
            for a in services["device"]["command"]
        ]
        hostname = Path("/proc/sys/kernel/hostname").read_text().strip()
        started: list[Running] = []
        try:
            cloud = Running("cloud", cloud_cmd, cloud_env, tmp_path)
            started.append(cloud)
            health = [a.replace("8780", str(http_port)) for a in services["cloud"]["healthcheck"]["test"][1:]]
            health[0] = sys.executable

            def healthy() -> bool:
                assert cloud.alive(), f"cloud exited {cloud.proc.returncode}:\n{cloud.output()}"
                return subprocess.run(health, capture_output=True, timeout=10).returncode == 0

            wait_until(healthy, 60.0, "the cloud's healthcheck to pass")
            assert (keys_dir / "fleet.pub").is_file(), "the entrypoint made the fleet key on first start"
            device = Running("device", device_cmd, device_env, tmp_path)
            started.append(device)

            def connected() -> bool:
                assert device.alive(), f"device exited {device.proc.returncode}:\n{device.output()}"
                return hostname in broker.log_text()

            wait_until(connected, 30.0, f"device {hostname} to connect")

            # sim: two simulated devices (SIM_DEVICES=2), the key from the shared volume
            import yaml

            raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["sim"]["command"]
            sim_map = {
                "mqtt://mosquitto:1883": broker_url,
                "/etc/edgeloop/keys/fleet.pub": str(keys_dir / "fleet.pub"),
                "/var/lib/edgeloop/sim": str(tmp_path / "sim-state"),
            }
            sim_cmd = [sim_map.get(a, a) for a in compose_interpolate(raw, {"SIM_DEVICES": "2"})]
            sim = Running("sim", sim_cmd, base_env(), tmp_path)
            started.append(sim)

            def sim_connected() -> bool:
                assert sim.alive(), f"sim exited {sim.proc.returncode}:\n{sim.output()}"
                log = broker.log_text()
                return "sim-0000" in log and "sim-0001" in log

            wait_until(sim_connected, 60.0, "the simulated devices to connect")
            for svc in (sim, device, cloud):
                grace = seconds(services[svc.name]["stop_grace_period"])
                rc, took = svc.stop(grace)
                assert rc == 0, f"{svc.name} exited {rc} on SIGTERM after {took:.1f} s:\n{svc.output()}"
        finally:
            for svc in started:
                svc.kill()


# --------------------------------------------------------------------------- Azure IoT Edge


AZURE = DEPLOY / "azure-iot-edge"


def load_deployment() -> dict[str, Any]:
    import json

    doc = json.loads((AZURE / "deployment.template.json").read_text())
    assert isinstance(doc, dict)
    return doc


def create_options(module: dict[str, Any]) -> dict[str, Any]:
    import json

    raw = module["settings"]["createOptions"]
    assert isinstance(raw, str), "createOptions is a JSON string in a deployment manifest"
    assert len(raw) <= 512, "longer createOptions must be split into createOptions01, 02, …"
    opts = json.loads(raw)
    assert isinstance(opts, dict)
    return opts


def test_iot_edge_manifest_has_the_runtime_and_system_modules() -> None:
    content = load_deployment()["modulesContent"]
    agent = content["$edgeAgent"]["properties.desired"]
    assert agent["schemaVersion"] == "1.1"
    assert agent["runtime"]["type"] == "docker"
    system = agent["systemModules"]
    assert set(system) == {"edgeAgent", "edgeHub"}
    assert system["edgeAgent"]["settings"]["image"].startswith("mcr.microsoft.com/azureiotedge-agent:")
    assert system["edgeHub"]["settings"]["image"].startswith("mcr.microsoft.com/azureiotedge-hub:")
    assert system["edgeHub"]["status"] == "running" and system["edgeHub"]["restartPolicy"] == "always"
    for name, module in {**system, **agent["modules"]}.items():
        assert module["type"] == "docker", name
        create_options(module)
    for name, module in agent["modules"].items():
        assert module["status"] in ("running", "stopped") and module["restartPolicy"] in (
            "never",
            "on-failure",
            "on-unhealthy",
            "always",
        ), name
        for key, value in module.get("env", {}).items():
            assert set(value) == {"value"} and isinstance(value["value"], str), f"{name}: env {key}"


def test_iot_edge_routes_send_the_modules_messages_upstream() -> None:
    content = load_deployment()["modulesContent"]
    hub = content["$edgeHub"]["properties.desired"]
    assert hub["schemaVersion"] == "1.1"
    routes = [r["route"] if isinstance(r, dict) else r for r in hub["routes"].values()]
    # The azure-edge transport sends with send_message (the module's default output), which only a
    # route on /messages/modules/edgeloop/* (not …/outputs/*) forwards.
    assert "FROM /messages/modules/edgeloop/* INTO $upstream" in routes
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] >= 3600


def test_iot_edge_module_runs_the_device_image_with_the_azure_edge_transport() -> None:
    content = load_deployment()["modulesContent"]
    module = content["$edgeAgent"]["properties.desired"]["modules"]["edgeloop"]
    image = module["settings"]["image"]
    assert image == "${CONTAINER_REGISTRY_ADDRESS}/edgeloop-device:" + pyproject_version() + "-azure"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "DEVICE_EXTRAS=onnx,azure" in dockerfile and "edgeloop-device:0.1.0-azure" in dockerfile
    assert "FROM base AS device" in dockerfile

    opts = create_options(module)
    binds = opts["HostConfig"]["Binds"]
    assert "edgeloop-state:/var/lib/edgeloop" in binds, "the state (outbox, models) survives a module update"
    assert opts["StopSignal"] == "SIGTERM" and opts["StopTimeout"] >= DRAIN_DEFAULT + 5
    assert opts["HostConfig"]["ReadonlyRootfs"] is True and opts["HostConfig"]["CapDrop"] == ["ALL"]

    env = {k: v["value"] for k, v in module["env"].items()}
    assert env["EDGELOOP_BROKER__TRANSPORT"] == "azure-edge"
    # The image's config with this environment, and the device id the entrypoint takes from IoT Edge.
    s = load_settings(DOCKER / "device.toml", env={**env, "EDGELOOP_DEVICE_ID": "edge-device-1"})
    assert s.broker.transport == "azure-edge"
    assert str(s.public_key.parent) in [b.split(":")[1] for b in binds]
    assert s.state_dir == Path("/var/lib/edgeloop")
    assert s.drain_deadline + 5 <= opts["StopTimeout"]
    # The readings broker it names is a module of the same deployment (modules resolve by name).
    assert s.source.url == "mqtt://mosquitto:1883"
    modules = content["$edgeAgent"]["properties.desired"]["modules"]
    assert "mosquitto" in modules and modules["mosquitto"]["startupOrder"] < module["startupOrder"]


def test_iot_edge_module_twin_desired_properties_are_a_desired_state() -> None:
    from runtime.protocol import DesiredState
    from runtime.transports.azure_iot import DESIRED_KEY

    content = load_deployment()["modulesContent"]
    twin = content["edgeloop"]["properties.desired"]
    assert set(twin) == {DESIRED_KEY}
    state = DesiredState.model_validate(twin[DESIRED_KEY])
    assert state.model is None  # the cloud deploys models; the manifest only sets the config
    assert state.config["capture_rate"] == 1.0


# --------------------------------------------------------------------------- Raspberry Pi: aarch64 wheels


def wheel_platforms(filename: str) -> list[str]:
    """Platform tags of a wheel file name (``name-ver[-build]-py-abi-plat.whl``, compressed tag sets split)."""
    assert filename.endswith(".whl"), filename
    parts = filename[: -len(".whl")].split("-")
    assert len(parts) in (5, 6), filename
    return parts[-1].split(".")


def manylinux_glibc(tag: str) -> tuple[int, int] | None:
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    for prefix, glibc in legacy.items():
        if tag.startswith(prefix + "_"):
            return glibc
    m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


@pytest.mark.network
def test_device_install_resolves_to_aarch64_wheels_only(tmp_path: Path) -> None:
    """A Raspberry Pi (aarch64, CPython 3.11) installs the device's dependencies from wheels alone:
    no compiler, no sdist. pip's cache (EDGELOOP_PIP_CACHE, default ~/.cache/edgeloop-tests/pip)
    keeps reruns quick."""
    if OFFLINE:
        pytest.skip("EDGELOOP_OFFLINE=1")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    cache = Path(os.environ.get("EDGELOOP_PIP_CACHE", Path.home() / ".cache" / "edgeloop-tests" / "pip"))
    dest = tmp_path / "wheels"
    r = run(
        [
            sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
            "--only-binary=:all:", "--platform", "manylinux2014_aarch64",
            "--python-version", "3.11", "--implementation", "cp",
            "--dest", dest, "--cache-dir", cache, *deps,
        ]
    )  # fmt: skip
    assert r.returncode == 0, f"pip download for aarch64 failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    files = sorted(p.name for p in dest.iterdir())
    assert files and all(f.endswith(".whl") for f in files), files
    for f in files:
        platforms = wheel_platforms(f)
        if platforms == ["any"]:
            continue
        assert any(p.endswith("_aarch64") for p in platforms), f"{f} is not for aarch64"
        glibc = [manylinux_glibc(p) for p in platforms if p.endswith("_aarch64")]
        assert any(g is not None and g <= (2, 17) for g in glibc), f"{f} needs a newer glibc than manylinux2014"
    names = {re.sub(r"[-_.]+", "-", f.split("-")[0]).lower() for f in files}
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in names, f"{name} was not resolved"
