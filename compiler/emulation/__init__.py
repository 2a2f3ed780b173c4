"""aarch64 emulation: the arm64 Python sysroot under qemu-user that verifies ARM artifacts, and an
emulated RPC device for tuning and benchmarking without a board.

``qemu_worker.py`` and ``qemu_rpc_server.py`` run inside the emulated Python, by path.
"""
