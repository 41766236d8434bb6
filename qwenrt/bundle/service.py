"""``qwenrt serve`` as a systemd service, for an installed bundle (``install.sh --service``).

The service runs as a system user of its own, with its state (the probe's outcomes, tune's
profiles) under ``/var/lib/<user>`` (systemd's ``StateDirectory``), restarts on failure,
is held to a memory limit, and reads its API key from a file only that user can read
(the key never appears in the unit or in the process's arguments). The unit is hardened
the way systemd's own documentation suggests for a network daemon (``ProtectSystem=strict``
and friends): the server needs to read its model and write nothing but its state.

    python -m qwenrt.bundle.service --prefix DIR --model MODEL_DIR [--user qwenrt] [--port 8000] ...
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")
CONFIG_DIR = Path("/etc/qwenrt")
GIB = 1 << 30


@dataclass(frozen=True)
class Service:
    prefix: Path  # the installed bundle's virtual environment
    model: Path
    user: str = "qwenrt"
    host: str = "0.0.0.0"
    port: int = 8000
    runtime: str | None = None  # None: serve's default
    memory_max: str = "2G"
    api_key_file: Path = CONFIG_DIR / "api-key"

    name = "qwenrt.service"

    def command(self) -> list[str]:
        command = [str(self.prefix / "bin" / "qwenrt"), "serve", "--model", str(self.model), "--host", self.host,
                   "--port", str(self.port), "--api-key-file", str(self.api_key_file), "--no-access-log"]  # fmt: skip
        return command + (["--runtime", self.runtime] if self.runtime else [])

    def unit(self) -> str:
        return f"""\
# Written by qwenrt's install.sh --service. `systemctl edit {self.name}` to change it.
[Unit]
Description=qwenrt serve: OpenAI-compatible API for {self.model.name}
Documentation=file://{self.prefix}/BUNDLE-README.md
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
User={self.user}
Group={self.user}
ExecStart={shlex.join(self.command())}
Environment=QWENRT_HOME=/var/lib/{self.user}
StateDirectory={self.user}
Restart=on-failure
RestartSec=5
# serve finishes answers in flight for up to 10 s after SIGTERM.
TimeoutStopSec=20
MemoryMax={self.memory_max}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def memory_limit(model_bytes: int) -> str:
    """A default MemoryMax: room for the larger artifact three times over (weights, their
    repacked copy at load, the KV cache and the runtime), and at least 1 GiB."""
    return f"{max(1, -(-3 * model_bytes // GIB))}G"


def ensure_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        _run(["useradd", "--system", "--no-create-home", "--home-dir", f"/var/lib/{user}", "--shell", nologin, user])


def ensure_api_key(path: Path, user: str) -> bool:
    """A random key in ``path``, readable by ``user`` only; an existing key is kept. True if made now."""
    made = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    if made:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(user).gr_gid)
    path.chmod(0o600)
    return made


def install(service: Service, unit_dir: Path = UNIT_DIR, start: bool = True) -> str:
    """Write the unit, the user and the key; enable and start it where systemd runs. Returns a report."""
    ensure_user(service.user)
    made = ensure_api_key(service.api_key_file, service.user)
    unit_path = unit_dir / service.name
    unit_path.write_text(service.unit(), encoding="utf-8")
    key_state = "new" if made else "kept"
    lines = [f"wrote {unit_path} (user {service.user}, port {service.port}, MemoryMax={service.memory_max})",
             f"API key: {service.api_key_file} ({key_state}; readable by {service.user} only)"]  # fmt: skip
    if start and Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", "--now", service.name])
        lines.append(f"started: systemctl status {service.name}")
    else:
        lines.append(f"systemd is not running here: start it later with 'systemctl enable --now {service.name}'")
    return "\n".join(lines)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SystemExit(f"install.sh: error: {' '.join(command[:2])} failed: {detail[-1] if detail else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenrt.bundle.service", description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--user", default="qwenrt")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runtime", default=None)
    parser.add_argument("--memory-max", default=None, help="systemd MemoryMax [default: from the model's size]")
    parser.add_argument("--unit-dir", type=Path, default=UNIT_DIR)
    parser.add_argument("--api-key-file", type=Path, default=CONFIG_DIR / "api-key")
    parser.add_argument("--print", action="store_true", help="Print the unit and change nothing.")
    args = parser.parse_args(argv)
    model_bytes = max((sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
                       for p in args.model.iterdir() if p.name != "manifest.json"), default=0)  # fmt: skip
    service = Service(prefix=args.prefix.resolve(), model=args.model.resolve(), user=args.user, host=args.host,
                      port=args.port, runtime=args.runtime, memory_max=args.memory_max or memory_limit(model_bytes),
                      api_key_file=args.api_key_file)  # fmt: skip
    if args.print:
        print(service.unit(), end="")
        return 0
    if os.geteuid() != 0:
        print("install.sh: error: --service needs root (it adds a user and a systemd unit)", file=sys.stderr)
        return 1
    print(install(service, args.unit_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
