"""Runs inside the emulated aarch64 Python (see qemu_rpc.py): TVM's own RPC server, one process.

`python -m tvm.exec.rpc_server` starts its server in a `tvm.exec.popen_worker` subprocess, which
needs cloudpickle (not in the sysroot) and re-executes the interpreter (qemu-user cannot follow
that exec without binfmt_misc). This starts the same server state, `PopenRPCServerState`, in this
process; each session is still a forked child, as TVM does it. It imports only TVM's runtime (the
sysroot has no tvmdeploy) and exits by itself after --lifetime seconds.
Usage: python qemu_rpc_server.py --tracker HOST:PORT --key KEY [--host H] [--port P] [--lifetime S]
"""

import argparse
import os
import sys

sys.path.insert(0, os.environ["TVMDEPLOY_ARM_SITE"])

import tvm
import tvm.runtime.vm  # the Relax VM that clients drive remotely
from tvm.rpc.server import PopenRPCServerState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int, default=9199)
    parser.add_argument(
        "--lifetime", type=float, default=3600.0, help="seconds until the server exits"
    )
    args = parser.parse_args()
    host, port = args.tracker.rsplit(":", 1)
    state = PopenRPCServerState(
        args.host,
        args.port,
        args.port_end,
        tracker_addr=(host, int(port)),
        key=args.key,
        silent=False,
    )
    print(
        f"tvm {tvm.__version__} rpc server on {args.host}:{state.port}, key {args.key}", flush=True
    )
    state.thread.join(args.lifetime)
    os._exit(0)  # the listening thread never returns on its own


if __name__ == "__main__":
    main()
