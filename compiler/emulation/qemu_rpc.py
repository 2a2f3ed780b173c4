"""An emulated aarch64 device for RPC: TVM's `rpc_server` in the arm64 Python under qemu-user.

Why: `--rpc HOST:PORT --rpc-key KEY` is meant for real boards, but a machine without one can still
exercise the whole path (tracker → server → upload → run on aarch64) with the sysroot of qemu.py.
The server listens on loopback by default and exits after `lifetime` seconds.

    python -m tvmdeploy.compiler.emulation.qemu_rpc --tracker 127.0.0.1:9190 --key arm64-qemu

Emulated timings say nothing about a real device: use it for verification, not for benchmarks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from . import qemu

SERVER = Path(__file__).with_name("qemu_rpc_server.py")


def server_command(
    arm: qemu.ArmPython,
    tracker: str,
    key: str,
    cpu: str = "cortex-a72",
    host: str = "127.0.0.1",
    port: int = 9090,
    port_end: int = 9199,
    lifetime: float = 3600.0,
) -> list[str]:
    """argv of an emulated aarch64 RPC server registered with `tracker` under `key`."""
    return arm.command(
        str(SERVER),
        "--tracker",
        tracker,
        "--key",
        key,
        "--host",
        host,
        "--port",
        str(port),
        "--port-end",
        str(port_end),
        "--lifetime",
        str(lifetime),
        cpu=cpu,
    )


def start_server(
    tracker: str,
    key: str,
    cpu: str = "cortex-a72",
    host: str = "127.0.0.1",
    port: int = 9090,
    port_end: int = 9199,
    lifetime: float = 3600.0,
    arm: qemu.ArmPython | None = None,
    log: Path | None = None,
) -> subprocess.Popen:
    """Start the emulated server in its own process group (kill the group to stop its sessions too).

    Registration takes a while (importing TVM under emulation is ~10 s): wait for it with
    `tvmdeploy.runtime.remote.wait_for_server`.
    """
    arm = arm or qemu.find_arm64_python()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it open
    try:
        return subprocess.Popen(
            server_command(arm, tracker, key, cpu, host, port, port_end, lifetime),
            env=arm.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log:
            out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvmdeploy.compiler.emulation.qemu_rpc", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    parser.add_argument(
        "--key", default="arm64-qemu", help="key to register under (default arm64-qemu)"
    )
    parser.add_argument("--cpu", default="cortex-a72", help="qemu CPU model (default cortex-a72)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default loopback)"
    )
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="seconds until it exits")
    args = parser.parse_args(argv)
    try:
        arm = qemu.find_arm64_python()
    except qemu.QemuUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    command = server_command(
        arm, args.tracker, args.key, args.cpu, args.host, args.port, args.port + 100, args.lifetime
    )
    return subprocess.run(command, env=arm.env(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
