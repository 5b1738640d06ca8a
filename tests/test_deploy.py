"""Running it for real: identity files, private swarms, keys, compose.yaml and the image's command.

Real server processes on loopback, as in test_swarm_e2e.py. No Docker engine runs here, so the
container's command line (the image's ENTRYPOINT and ENV plus compose's environment) is run as
a plain process; ``docker compose config`` checks compose.yaml itself where the client exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from blocks.head import ModelHead
from swarm.bridge import SwarmBridge
from swarm.trust.keys import load_identity, load_or_create_identity, peer_id_of
from swarm.trust.keys import HEADER, format_swarm_key, parse_swarm_key, read_swarm_key, write_swarm_key
from swarm.records import ServerRecord
from swarmgate import cli, launcher, options
from swarmgate.launcher import start_process, start_server, stop_all
from tests.support import free_port, wait_until
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, swarm_greedy

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = {"base": ["compose.yaml"], "gpu": ["compose.yaml", "compose.gpu.yaml"]}


# -- identity and swarm key files ---------------------------------------------------------------

def test_identity_file_is_created_private_and_reloaded(tmp_path):
    path = tmp_path / "node" / "identity.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind
    assert peer_id_of(load_or_create_identity(path)) == peer_id_of(first)
    assert peer_id_of(load_identity(path)).startswith("12D3KooW")  # ed25519
    assert path.read_bytes() == first.private_key.serialize()  # libp2p's protobuf, not a pickle


def test_identity_accepts_go_libp2p_files_and_rejects_garbage(tmp_path):
    from libp2p.crypto.pb import crypto_pb2

    pair = load_or_create_identity(tmp_path / "py.key")
    seed = pair.private_key.to_bytes()
    go_style = crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=seed + pair.public_key.to_bytes())
    (tmp_path / "go.key").write_bytes(go_style.SerializeToString())
    assert peer_id_of(load_identity(tmp_path / "go.key")) == peer_id_of(pair)
    (tmp_path / "bad.key").write_bytes(b"\x80\x04not a key")
    with pytest.raises(ValueError, match="not a libp2p private key"):
        load_identity(tmp_path / "bad.key")
    with pytest.raises(ValueError, match="cannot read the node identity"):
        load_identity(tmp_path / "missing.key")


def test_swarm_key_format(tmp_path):
    key = write_swarm_key(tmp_path / "swarm.key")
    text = (tmp_path / "swarm.key").read_text()
    assert text.splitlines() == [HEADER, "/base16/", key] and len(key) == 64
    assert stat.S_IMODE((tmp_path / "swarm.key").stat().st_mode) == 0o600
    assert read_swarm_key(tmp_path / "swarm.key") == key == parse_swarm_key(format_swarm_key(key.upper()))
    for bad, message in [("junk", "3 lines"), (f"{HEADER}\n/base64/\nAAAA", "encoding"),
                         (f"{HEADER}\n/base16/\nabcd", "64 hex digits")]:
        with pytest.raises(ValueError, match=message):
            parse_swarm_key(bad)


def test_keys_commands(tmp_path, capsys, monkeypatch):
    cli.main(["keys", "swarm-key"])
    assert len(parse_swarm_key(capsys.readouterr().out)) == 64
    out = tmp_path / "swarm.key"
    cli.main(["keys", "swarm-key", "--out", str(out)])
    key = read_swarm_key(out)
    with pytest.raises(SystemExit, match="already exists"):
        cli.main(["keys", "swarm-key", "--out", str(out)])
    assert read_swarm_key(out) == key

    identity = tmp_path / "identity.key"
    capsys.readouterr()
    cli.main(["keys", "peer-id", "--identity", str(identity)])
    first = capsys.readouterr().out
    monkeypatch.setenv("SWARMGATE_IDENTITY", str(identity))
    cli.main(["keys", "peer-id"])
    assert capsys.readouterr().out == first and first.strip() == peer_id_of(load_identity(identity))


def test_quant_on_cpu_is_refused_with_a_clear_message(llama_path):
    with pytest.raises(SystemExit, match="--quant nf4 needs --device cuda"):
        cli.main(["server", "--model", str(llama_path), "--blocks", "0:2", "--quant", "nf4"])


# -- configuration ------------------------------------------------------------------------------

def test_empty_environment_variable_counts_as_unset(monkeypatch):
    import argparse

    monkeypatch.setenv("SWARMGATE_MAX_SESSIONS", "")
    monkeypatch.setenv("SWARMGATE_INITIAL_PEERS", "/ip4/1.2.3.4/tcp/1/p2p/x /ip4/1.2.3.4/tcp/2/p2p/y")
    parser = argparse.ArgumentParser()
    options.add_option(parser, "--max-sessions", type=int, default=64)
    options.add_swarm_options(parser)
    args = parser.parse_args([])
    assert args.max_sessions == 64 and len(args.initial_peers) == 2
    monkeypatch.setenv("SWARMGATE_MAX_SESSIONS", "many")
    with pytest.raises(SystemExit, match="SWARMGATE_MAX_SESSIONS"):
        options.add_option(argparse.ArgumentParser(), "--max-sessions", type=int, default=64)


def test_server_limits_all_have_flags():
    args = cli.build_parser().parse_args(["server", "--blocks", "0:1"])
    for flag in ("max_sessions", "max_cache_tokens", "max_batch", "session_idle_timeout", "max_frame_bytes",
                 "max_forward_tokens"):
        assert getattr(args, flag) > 0


def test_records_carry_memory_per_block_and_tolerate_older_servers():
    record = ServerRecord(peer_id="p", addrs=(), model="m", checkpoint="c", start=0, end=2, throughput=1.0,
                          free_tokens=1, sessions=0, ttl=5.0, block_bytes=123456, quant="nf4")
    assert ServerRecord.from_wire(record.to_wire(), received_at=0.0) == record
    older = {k: v for k, v in record.to_wire().items() if k not in ("block_bytes", "quant")}
    parsed = ServerRecord.from_wire(older, received_at=0.0)
    assert parsed.block_bytes == 0 and parsed.quant == "none"


def test_launched_servers_never_inherit_node_unique_settings(monkeypatch):
    monkeypatch.setenv("SWARMGATE_IDENTITY", "/data/identity.key")
    monkeypatch.setenv("SWARMGATE_QUANT", "nf4")
    env = launcher._child_env(None)
    assert "SWARMGATE_IDENTITY" not in env and env["SWARMGATE_QUANT"] == "nf4"
    assert launcher._child_env({"SWARMGATE_IDENTITY": "x"})["SWARMGATE_IDENTITY"] == "x"


# -- compose.yaml and the image -----------------------------------------------------------------

def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:+replacement} (all compose.yaml uses)."""

    def value(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name, "")
        if op == ":-":
            return current or arg
        if op == ":+":
            return arg if current else ""
        return current

    return re.sub(r"\$\{(\w+)(?:(:-|:\+)([^}]*))?\}", value, text)


def compose_service(service: str, env: dict[str, str]) -> dict:
    """One service of compose.yaml with the given variables, resolved as compose resolves it
    (environment values as the strings a container sees)."""
    def resolve(node):  # after parsing, as compose does: "2:4" must stay a string, not YAML 1.1's 124
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return _interpolate(node, env) if isinstance(node, str) else node

    spec = resolve(yaml.safe_load((ROOT / "compose.yaml").read_text())["services"][service])
    spec["environment"] = {k: "" if v is None else str(v) for k, v in spec["environment"].items()}
    return spec


def image_spec() -> tuple[dict[str, str], list[str], list[str]]:
    """The final stage of the Dockerfile: its ENV, ENTRYPOINT and CMD."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in final:
        instruction, _, rest = line.partition(" ")
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif instruction == "CMD":
            cmd = json.loads(rest)
    return env, entrypoint, cmd


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose") or shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    return [standalone] if standalone else None


@pytest.mark.parametrize("files", sorted(COMPOSE_FILES))
@pytest.mark.parametrize("profile", [None, "gateway", "swarm"])
def test_compose_config_accepts_every_profile(files, profile, tmp_path):
    compose = _docker_compose()
    if compose is None:
        pytest.skip("no docker compose client")
    variables = {"MODEL": "/models/llama", "BLOCKS": "0:4", "INITIAL_PEERS": "/ip4/10.0.0.5/tcp/31330/p2p/12D3KooWx",
                 "SWARM_KEY": str(tmp_path / "swarm.key"), "PORT": "31999", "QUANT": "nf4"}
    command = [*compose, *[a for f in COMPOSE_FILES[files] for a in ("-f", f)]]
    command += ["--profile", profile] if profile else []
    clean = {k: v for k, v in os.environ.items() if k not in variables and not k.startswith("COMPOSE_")}
    result = subprocess.run([*command, "config", "--format", "json"], capture_output=True, text=True, cwd=ROOT,
                            env={**clean, **variables}, timeout=120)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"server"} | ({profile} if profile else set())
    for name, service in services.items():  # compose resolves compose.yaml as the tests' reader does
        expected = compose_service(name, variables)["environment"]
        if files == "gpu" and name != "gateway":
            expected["SWARMGATE_DEVICE"] = "cuda"
        assert service["environment"] == expected
    server = services["server"]
    assert server["environment"]["SWARMGATE_SWARM_KEY"] == "/run/secrets/swarm_key"
    assert server["environment"]["SWARMGATE_LISTEN"] == "/ip4/0.0.0.0/tcp/31999"
    if files == "gpu":
        assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert server["environment"]["SWARMGATE_DEVICE"] == "cuda"




@pytest.mark.parametrize("service", ["server", "gateway", "swarm"])
def test_compose_variables_are_flags_of_the_command(service):
    """Every SWARMGATE_* a service sets is a flag of the command it runs (the name scheme); `up` also
    passes its environment to the block servers it starts."""
    command = compose_service(service, {})["command"][0]
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    if command not in subcommands:
        pytest.skip(f"`swarmgate {command}` is not registered yet")
    readers = [command, "server"] if command == "up" else [command]
    flags = {opt for name in readers for action in subcommands[name]._actions for opt in action.option_strings}
    flags.add("--log-level")
    image_env, _, _ = image_spec()
    names = set(compose_service(service, {})["environment"]) | set(image_env)
    for name in sorted(n for n in names if n.startswith(options.ENV_PREFIX) and n != "SWARMGATE_CACHE"):
        assert "--" + name[len(options.ENV_PREFIX):].lower().replace("_", "-") in flags, name


def _container_command(service: str, variables: dict[str, str], root: Path) -> tuple[list[str], dict[str, str]]:
    """What a container of ``service`` runs, as a local command: image ENV + compose environment,
    with the container's volumes (/data, /cache) and secrets as folders under ``root``."""
    image_env, entrypoint, cmd = image_spec()
    spec = compose_service(service, variables)
    env = {**image_env, **spec["environment"]}
    mounts = {"/data": root / "data", "/cache": root / "cache", "/run/secrets/swarm_key": variables.get("SWARM_KEY", "")}
    for name, value in env.items():
        for container_path, local in mounts.items():
            if value.startswith(container_path):
                env[name] = str(local) + value[len(container_path):]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    executable = shutil.which(entrypoint[0], path=env["PATH"])
    program = [executable] if executable else [sys.executable, "-m", "swarmgate.cli"]
    return [*program, *entrypoint[1:], *spec.get("command", cmd)], env


@pytest.fixture(scope="module")
def bootstrap(llama_path, tmp_path_factory):
    """The first server of a swarm (blocks 0:2), started the usual way."""
    server = start_server(llama_path, "0:2", extra_args=FAST_ANNOUNCE,
                          log_file=tmp_path_factory.mktemp("logs") / "bootstrap.log")
    yield server
    server.stop()


def _wait_for_peers(bridge: SwarmBridge, peers: set[str], timeout: float = 60.0) -> None:
    """Until the live servers are exactly ``peers`` (records of stopped servers take a TTL to expire)."""
    wait_until(lambda: {r.peer_id for r in bridge.servers()} == peers, timeout,
               message=lambda: ({r.peer_id for r in bridge.servers()}, peers))


def _generates(bridge: SwarmBridge, path: Path, peers: set[str]) -> None:
    """Greedy tokens through the swarm equal transformers' own, through a chain of ``peers``."""
    head = ModelHead(path)
    prompt = torch.randint(3, head.vocab_size, (1, 8), generator=torch.Generator().manual_seed(5))
    chain = bridge.call(lambda: _chain(bridge, path.name))
    assert {r.peer_id for r in chain} == peers
    tokens, _ = swarm_greedy(bridge, head, path.name, prompt, 6, wire_codec="none")
    expected = reference_model(path).generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert tokens == expected[:, 8:].tolist()


async def _chain(bridge: SwarmBridge, model: str) -> list[ServerRecord]:
    return bridge.client.chain(model, 4)


@pytest.mark.e2e
def test_container_command_joins_a_swarm(llama_path, bootstrap, tmp_path):
    port = free_port()
    variables = {"MODEL": str(llama_path), "BLOCKS": "2:4", "INITIAL_PEERS": " ".join(bootstrap.addrs),
                 "PORT": str(port), "ANNOUNCE_ADDRS": f"/ip4/127.0.0.1/tcp/{port}"}  # listens on 0.0.0.0
    command, env = _container_command("server", variables, tmp_path)
    assert command[-1] == "server" and env["SWARMGATE_IDENTITY"] == str(tmp_path / "data" / "identity.key")
    node = start_process(command, "2:4", env=env, log_file=tmp_path / "container.log")
    bridge = SwarmBridge(initial_peers=bootstrap.addrs, step_timeout=30.0)
    try:
        assert node.peer_id == peer_id_of(load_identity(tmp_path / "data" / "identity.key"))
        assert node.addrs == [f"/ip4/127.0.0.1/tcp/{port}/p2p/{node.peer_id}"]
        bridge.start()
        _wait_for_peers(bridge, {bootstrap.peer_id, node.peer_id})
        record = next(r for r in bridge.servers() if r.peer_id == node.peer_id)
        assert record.quant == "none" and record.block_bytes > 0  # memory per block is announced
        _generates(bridge, llama_path, {bootstrap.peer_id, node.peer_id})
        health_command, health_env = _container_command("server", variables, tmp_path)
        health = subprocess.run([*health_command[:-1], "healthcheck"], env=health_env, capture_output=True,
                                text=True, timeout=120)
        assert health.returncode == 0 and f"serving blocks [2, 4) of {llama_path.name}" in health.stdout, health
    finally:
        bridge.stop()
        node.stop()
    health = subprocess.run([*health_command[:-1], "healthcheck", "--timeout", "10"], env=health_env,
                            capture_output=True, text=True, timeout=120)
    assert health.returncode == 1 and "unhealthy" in health.stderr


@pytest.mark.e2e
def test_restart_with_the_same_identity_keeps_peer_id_and_is_routed_to(llama_path, bootstrap, tmp_path):
    identity, port = tmp_path / "identity.key", free_port()
    args = [*FAST_ANNOUNCE, "--identity", str(identity), "--listen", f"/ip4/127.0.0.1/tcp/{port}"]

    def start():
        return start_server(llama_path, "2:4", initial_peers=bootstrap.addrs, extra_args=args,
                            log_file=tmp_path / "node.log")

    node = start()
    bridge = SwarmBridge(initial_peers=bootstrap.addrs, step_timeout=30.0).start()
    try:
        _wait_for_peers(bridge, {bootstrap.peer_id, node.peer_id})
        _generates(bridge, llama_path, {bootstrap.peer_id, node.peer_id})
        before = node.addrs
        node.stop()
        _wait_for_peers(bridge, {bootstrap.peer_id})  # the stopped node's record expires

        node = start()
        assert node.addrs == before  # same peer id, same multiaddr
        _wait_for_peers(bridge, {bootstrap.peer_id, node.peer_id})
        _generates(bridge, llama_path, {bootstrap.peer_id, node.peer_id})
    finally:
        bridge.stop()
        node.stop()


@pytest.mark.e2e
def test_private_swarm_keeps_out_nodes_without_the_key(llama_path, tmp_path):
    key, other_key = tmp_path / "swarm.key", tmp_path / "other.key"
    write_swarm_key(key)
    write_swarm_key(other_key)
    psk = read_swarm_key(key)
    logs = tmp_path / "logs"
    logs.mkdir()

    def server(name: str, blocks: str, peers=(), key_file: Path | None = None):
        extra = [*FAST_ANNOUNCE, *(["--swarm-key", str(key_file)] if key_file else [])]
        return start_server(llama_path, blocks, initial_peers=peers, extra_args=extra, log_file=logs / f"{name}.log")

    started = [server("private", "0:4", key_file=key)]
    bridges: list[SwarmBridge] = []
    try:
        private = started[0]
        for name, key_file in (("no-key", None), ("wrong-key", other_key)):
            with pytest.raises(RuntimeError, match="exited with code 1"):
                started.append(server(name, "0:2", private.addrs, key_file))
            assert "could not reach any initial peer" in (logs / f"{name}.log").read_text()
        with pytest.raises(BaseException) as refused:  # a ConnectionError, inside trio's exception groups
            bridges.append(SwarmBridge(initial_peers=private.addrs).start())
        assert "could not reach any initial peer" in "".join(traceback.format_exception(refused.value))

        member = server("member", "0:2", private.addrs, key)
        outsider = server("outsider", "0:4")  # serves a swarm of its own, without the key
        started += [member, outsider]
        bridge = SwarmBridge(initial_peers=private.addrs, psk=psk, step_timeout=30.0).start()
        allowed = SwarmBridge(initial_peers=private.addrs, psk=psk, allow_peers={private.peer_id}).start()
        bridges += [bridge, allowed]
        _wait_for_peers(bridge, {private.peer_id, member.peer_id})
        with pytest.raises(Exception):  # nor can a keyed node reach the outsider to be served by it
            bridge.call(lambda: bridge.client.node.connect(outsider.addrs[0]))
        _generates(bridge, llama_path, {private.peer_id})  # one hop is cheaper than two

        # An allowlist: the gateway routes only through the servers it names.
        time.sleep(3)  # a few announce intervals: the member's record has reached every node
        assert [r.peer_id for r in allowed.servers()] == [private.peer_id]
    finally:
        for each in bridges:
            each.stop()
        stop_all(started)
