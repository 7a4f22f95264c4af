"""Test setup: 8 simulated CPU devices (set before JAX starts), parsed absl flags for grain, and a default SIGINT
disposition (a suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would
the jaxeff processes the Ctrl-C tests interrupt)."""

import os
import signal

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile-only GPU and TPU devices (jaxeff.parallel.hardware): no CUDA driver call, and the two xdist workers may
# both load libtpu (its lockfile guards real chips; we only compile).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
