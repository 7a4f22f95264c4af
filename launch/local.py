#!/usr/bin/env python3
"""Run one jaxeff command as N cooperating processes on this machine (jax.distributed over localhost).

    python launch/local.py --num-processes 2 --devices-per-process 4 -- jaxeff train --config configs/debug.yaml
    python launch/local.py --num-processes 2 --gpus -- jaxeff train --config ...   # one GPU per process

Each process gets JAXEFF_COORDINATOR / JAXEFF_NUM_PROCESSES / JAXEFF_PROCESS_ID, and either M
simulated CPU devices or one GPU (CUDA_VISIBLE_DEVICES). Output lines are prefixed with [pI].
SIGTERM / SIGINT are forwarded to every process (they checkpoint together and exit). When a process
dies, JAX's coordination service stops the others once it has missed its heartbeats for
`--failure-timeout` seconds; any process still running 30 s after that is killed by this launcher.
The launcher exits with the first failing exit code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


KILL_GRACE_S = 30
REPO = Path(__file__).resolve().parents[1]


def resolve_executable(command: list[str]) -> list[str]:
    """Find the program on PATH, else in this checkout's .venv (so `jaxeff` works without activating it)."""
    if shutil.which(command[0]):
        return command
    in_venv = REPO / ".venv" / "bin" / command[0]
    if in_venv.exists():
        return [str(in_venv), *command[1:]]
    sys.exit(f"[launch] '{command[0]}' is not on PATH and not in {REPO / '.venv/bin'}; run `make train` once "
             "(it creates .venv) or `source .venv/bin/activate`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, args, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAXEFF_COORDINATOR=f"127.0.0.1:{port}", JAXEFF_NUM_PROCESSES=str(args.num_processes),
               JAXEFF_PROCESS_ID=str(process_id), JAXEFF_FAILURE_TIMEOUT=str(args.failure_timeout),
               PYTHONUNBUFFERED="1")
    if args.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(process_id)
    else:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices_per_process}"])
    return env


def forward_output(process_id: int, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(f"[p{process_id}] ".encode() + line)
        sys.stdout.buffer.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1, help="simulated CPU devices per process")
    parser.add_argument("--gpus", action="store_true", help="one GPU per process instead of CPU devices")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--failure-timeout", type=int, default=30, metavar="SECONDS",
                        help="heartbeat timeout after which the survivors of a failed process stop (default 30)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- jaxeff train --config configs/debug.yaml")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num-processes and --devices-per-process must be >= 1")
    command = resolve_executable(command)

    port = args.port or free_port()
    procs = [subprocess.Popen(command, env=child_env(i, args, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
             for i in range(args.num_processes)]
    readers = [threading.Thread(target=forward_output, args=(i, p.stdout), daemon=True) for i, p in enumerate(procs)]
    for r in readers:
        r.start()

    forwarded: list[int] = []

    def forward_signal(signum, frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)

    first_failure: tuple[int, int] | None = None
    failure_time = 0.0
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            code = p.poll()
            # 130/143: the process checkpointed and stopped on SIGINT/SIGTERM (preemption), not a crash.
            if code not in (None, 0, 130, 143) and first_failure is None and not forwarded:
                first_failure, failure_time = (i, code), time.time()
                print(f"[launch] process {i} exited with code {code}; the others should stop within "
                      f"{args.failure_timeout}s", file=sys.stderr, flush=True)
        if first_failure and time.time() - failure_time > args.failure_timeout + KILL_GRACE_S:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    print(f"[launch] killing process {i} (still running {time.time() - failure_time:.0f}s after "
                          f"process {first_failure[0]} failed)", file=sys.stderr, flush=True)
                    p.kill()
        time.sleep(0.2)
    for r in readers:
        r.join(timeout=5)
    codes = [p.returncode for p in procs]
    if first_failure is None and any(codes) and set(codes) <= {0, 130, 143}:  # preempted, checkpointed
        print(f"[launch] stopped by a signal; exit codes {codes}", file=sys.stderr, flush=True)
        return max(codes)
    if first_failure is None and any(codes):
        first_failure = next((i, c) for i, c in enumerate(codes) if c)
    if first_failure:
        print(f"[launch] exit codes {codes}; process {first_failure[0]} failed first", file=sys.stderr, flush=True)
        code = first_failure[1]
        return code if code > 0 else 128 - code  # killed by a signal: report it the shell's way
    return 0


if __name__ == "__main__":
    sys.exit(main())
