"""Test hosts on one machine: network namespaces joined by a bridge, each host with an sshd.

:func:`host_network` makes a small private network that nothing else on the machine can reach:

- a *launcher* namespace holding a bridge (``10.77.0.1/24``), where horovodrun and the MLflow
  server run; the bridge is named ``eth0`` like the hosts' interfaces, because horovodrun's
  ``--network-interface`` must name an interface of every machine, the launcher's included;
- one namespace per host (``hostA`` → ``10.77.0.2``, ``hostB`` → ``10.77.0.3``, ...), each
  joined to the bridge by a veth pair (its end named ``eth0``), with its own host name (a UTS
  namespace) and an sshd on :data:`SSH_PORT` that accepts only a throwaway key made for the test.

Names resolve through ``/etc/netns/<namespace>/hosts``, which ``ip netns exec`` mounts over
``/etc/hosts`` for the processes it starts; the launcher's ssh client reads
``/etc/netns/<launcher>/ssh/ssh_config`` the same way (the test's known_hosts and key), so
nothing in the machine's own ``/etc`` or ``~/.ssh`` changes. Everything is removed on exit,
including after a failure.

It needs root (``CAP_NET_ADMIN``), iproute2 and Debian's openssh-server
(``scripts/setup_test_hosts.sh``); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import die_with_parent, stop_process_groups

SSHD = Path("/usr/sbin/sshd")
SSH_PORT = 2222
SUBNET = "10.77.0"
NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class HostNetwork:
    """The network :func:`host_network` made.

    Attributes:
        launcher: the launcher's namespace (run horovodrun and servers in it with :meth:`run`).
        launcher_address: the launcher's address on the bridge.
        hosts: host name → its namespace.
        addresses: host name → its address.
        identity: the private key the hosts' sshd accept (``horovodrun --ssh-identity-file``).
        ssh_port: the port of every host's sshd (``horovodrun --ssh-port``).
        interface: the hosts' interface on the bridge (``horovodrun --network-interface``).
    """

    launcher: str
    launcher_address: str
    hosts: dict[str, str]
    addresses: dict[str, str]
    identity: Path
    ssh_port: int
    interface: str = "eth0"

    def command(self, namespace: str, command: Sequence[str]) -> list[str]:
        """``command`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *command]

    def answers(self, url: str) -> bool:
        """Whether ``url`` answers 200 when asked from the launcher's namespace."""
        probe = (
            "import sys, urllib.request\n"
            f"sys.exit(0 if urllib.request.urlopen({url!r}, timeout=2).status == 200 else 1)\n"
        )
        done = subprocess.run(
            self.command(self.launcher, [sys.executable, "-c", probe]), capture_output=True
        )
        return done.returncode == 0

    def run(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the launcher's namespace; its output captured, never raising."""
        return subprocess.run(
            self.command(self.launcher, command),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def unavailable() -> str | None:
    """Why :func:`host_network` cannot work here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); CI runs as root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (apt-get install iproute2)"
    if not SSHD.is_file():
        return f"{SSHD} is missing (apt-get install openssh-server; make test does it as root)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the ssh client is missing (apt-get install openssh-client)"
    probe = f"esmm-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _sshd_config(root: Path, address: str, host_key: Path, authorized: Path) -> Path:
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {address}",
                f"Port {SSH_PORT}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {root / 'sshd.pid'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # the key files live in a pytest temp dir
                "PrintMotd no",
                "",
            ]
        )
    )
    return config


def _wait_for_port(namespace: str, address: str, port: int, timeout: float, log: Path) -> None:
    """Until ``address:port`` accepts a connection from inside ``namespace``."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket();s.settimeout(1)\n"
        f"sys.exit(s.connect_ex(({address!r},{port})))\n"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, "python3", "-c", probe], capture_output=True
        )
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"sshd on {address}:{port} did not start; its log:\n{log.read_text()}")


@contextlib.contextmanager
def host_network(root: Path, names: Sequence[str] = ("hostA", "hostB")) -> Iterator[HostNetwork]:
    """Make the launcher and one namespace + sshd per name (see the module docstring)."""
    tag = f"esmm{os.getpid() % 100000}"
    launcher = f"{tag}-launch"
    namespaces = {name: f"{tag}-{name}" for name in names}
    addresses = {name: f"{SUBNET}.{i + 2}" for i, name in enumerate(names)}
    launcher_address = f"{SUBNET}.1"
    sshds: list[subprocess.Popen] = []
    made: list[str] = []
    etc_dirs: list[Path] = []
    root.mkdir(parents=True, exist_ok=True)
    try:
        keys = root / "keys"
        keys.mkdir()
        identity, host_key = keys / "id_ed25519", keys / "host_ed25519"
        for key in (identity, host_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "esmm-test", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        authorized = keys / "authorized_keys"
        shutil.copy(identity.with_suffix(".pub"), authorized)
        host_public = host_key.with_suffix(".pub").read_text().split()[:2]
        known_hosts = keys / "known_hosts"
        known_hosts.write_text(
            "".join(
                f"[{n}]:{SSH_PORT},[{addresses[n]}]:{SSH_PORT} {' '.join(host_public)}\n"
                for n in names
            )
        )

        hosts_file = "".join(
            [
                "127.0.0.1 localhost\n",
                # gloo resolves the machine's own name (a -H localhost run in the launcher)
                f"{launcher_address} launcher {socket.gethostname()}\n",
                *(f"{addresses[n]} {n}\n" for n in names),
            ]
        )
        for namespace in [launcher, *namespaces.values()]:
            _ip("netns", "add", namespace)
            made.append(namespace)
            etc = NETNS_ETC / namespace
            etc.mkdir(parents=True, exist_ok=True)
            etc_dirs.append(etc)
            (etc / "hosts").write_text(hosts_file)
            _ip("-n", namespace, "link", "set", "lo", "up")
        # The launcher's ssh client: the test's known_hosts and key, nothing of ~/.ssh.
        ssh_etc = NETNS_ETC / launcher / "ssh"
        ssh_etc.mkdir()
        (ssh_etc / "ssh_config").write_text(
            f"Host {' '.join(names)}\n"
            f"  Port {SSH_PORT}\n"
            f"  IdentityFile {identity}\n"
            f"  UserKnownHostsFile {known_hosts}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
        )

        _ip("-n", launcher, "link", "add", "eth0", "type", "bridge")
        _ip("-n", launcher, "addr", "add", f"{launcher_address}/24", "dev", "eth0")
        _ip("-n", launcher, "link", "set", "eth0", "up")
        for i, name in enumerate(names):
            namespace, port = namespaces[name], f"v{i}"
            _ip(
                "-n",
                launcher,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                namespace,
            )
            _ip("-n", launcher, "link", "set", port, "master", "eth0", "up")
            _ip("-n", namespace, "addr", "add", f"{addresses[name]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")

        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for name in names:
            host_root = root / name
            host_root.mkdir()
            config = _sshd_config(host_root, addresses[name], host_key, authorized)
            log = host_root / "sshd.log"
            # Its own UTS namespace, so the host name its sessions see is the test host's.
            script = f'hostname {name} && exec {SSHD} -D -e -f "{config}"'
            with log.open("w") as out:
                sshds.append(
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            namespaces[name],
                            "unshare",
                            "--uts",
                            "sh",
                            "-c",
                            script,
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=die_with_parent,
                    )
                )
            _wait_for_port(launcher, addresses[name], SSH_PORT, 20, log)
        yield HostNetwork(
            launcher, launcher_address, namespaces, addresses, identity, SSH_PORT, "eth0"
        )
    finally:
        stop_process_groups(sshds, timeout=10)
        for namespace in made:
            _kill_namespace(namespace)
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        for etc in etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)


def _kill_namespace(namespace: str) -> None:
    """Kill what still runs in ``namespace`` (a rank or server a failed test left behind)."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
