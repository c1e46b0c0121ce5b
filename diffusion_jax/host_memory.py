"""How the process gets and returns host memory (Linux with glibc; elsewhere every function here does nothing).

Why this matters on CPU: XLA:CPU allocates a compiled program's temporaries afresh on every call (one buffer, 1.3 GB
for the ddpm_cifar10 step at batch 16) and frees them after it. glibc serves an allocation that large with a fresh
`mmap` and returns it with `munmap`, so every step faulted in and zeroed all of it again: 320,000 page faults per
step, 0.55 s of kernel time (fmnist_small on 4 host devices: 572 MB per step). Two remedies, measured in
alternating processes on an Intel Xeon host with 2 cores (README's lever table):
- Transparent huge pages for what glibc maps (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc >= 2.35): 512x fewer
  faults; ddpm_cifar10 b16 2594-2689 -> 2449-2553 ms per step, fmnist_small (4 devices) 835-837 -> 741-778 ms.
  glibc reads the tunable only at start-up, so `reexec_with_host_memory` runs the same command again with it set.
- The heap kept and reused (`reuse_freed_heap`: no mmap for the main thread's large blocks, no trimming after a
  free) with the single-device program run on the calling thread (JAX's CPU async dispatch off), so its
  temporaries come from that heap: no faults and no zeroing at all; ddpm_cifar10 b16 with huge pages 2437-2467 ->
  2261-2323 ms. The reused heap settles over the first calls: small allocations carved out of a freed block can
  leave no block large enough, and the heap grows by one more (a 256 MB test program stopped at 2-3 blocks over
  200 calls, a call now and then faulting its temporaries in again). A program over several devices still runs on
  XLA's threads (their glibc arenas map large blocks afresh), so there the huge pages are what helps.
- On several host devices, jemalloc in place of glibc's malloc where the system has it (Debian:
  `apt-get install libjemalloc2`, which launch/install_data.sh runs), its freed pages kept for reuse
  (JEMALLOC_CONF): each device's temporaries are over the 64 MB a glibc thread arena can hold, so glibc maps and
  zeroes them afresh on every step, ~100 ms of kernel time per fmnist_small step on 2 devices; jemalloc reuses
  them. Alternating processes, an Intel Xeon host, 2 cores: fmnist_small b64 on 2 devices 723-743 -> 652-699 ms per
  step, the quick start's fashion_mnist step 156-162 -> 144-146 ms. Not on one device, where the reused heap
  already does it (ddpm_cifar10 b16: the same time, peak RSS 2634 vs 2803 MB under jemalloc). The memory compiling
  freed goes back to the OS as under glibc (release_freed_host_memory purges jemalloc's arenas): fmnist_small's
  peak RSS 1164-1180 MB -> 1133. (It was opt-in for one session after a quick start under it aborted on an
  all-reduce timeout; the cause was the training loop running 32 steps ahead of the devices, under any allocator,
  now bounded: loop.MAX_STEPS_IN_FLIGHT.)
Both are set in the environment of a re-exec of the same command (reexec_with_host_memory), since glibc reads its
tunables and the dynamic loader LD_PRELOAD only when a process starts. `DJ_HOST_MEMORY=glibc` keeps glibc's malloc
(tuned, without jemalloc); `DJ_HOST_MEMORY=default` leaves the C library and JAX as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2 ** 31 - 1


# DJ_HOST_MEMORY's values (environment.read_environment checks): everything above (the default), glibc tuned without
# jemalloc, 'jemalloc' (the same as 'tuned': its name while jemalloc was opt-in), nothing.
MODES = ("tuned", "glibc", "jemalloc", "default")
_JEMALLOC_MODES = ("tuned", "jemalloc")
# jemalloc's options where this module preloads it: freed pages are kept for reuse, never handed back on a timer
# (its default decay handed a step's temporaries back between steps: 153,000 page faults per fmnist_small step).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def tuned(env: Mapping[str, str] | None = None) -> bool:
  """Whether DJ_HOST_MEMORY asks for this module's settings (any mode but 'default')."""
  return (os.environ if env is None else env).get("DJ_HOST_MEMORY", "tuned") != "default"


def jemalloc_library() -> str | None:
  """The system's jemalloc as the dynamic loader names it (e.g. 'libjemalloc.so.2'), or None."""
  return ctypes.util.find_library("jemalloc")


def allocator_environment(env: Mapping[str, str], library: str | None, devices: int) -> dict | None:
  """`env` with jemalloc (`library`) preloaded and JEMALLOC_CONF as its MALLOC_CONF (unless that is set), or None
  where it would not apply: DJ_HOST_MEMORY is 'glibc' or 'default', one host device (see the module's docstring),
  there is no library, or LD_PRELOAD already names a jemalloc (the user's, or this process after its re-exec)."""
  preload = env.get("LD_PRELOAD", "")
  if (env.get("DJ_HOST_MEMORY", "tuned") not in _JEMALLOC_MODES or devices < 2 or not library
      or "jemalloc" in preload):
    return None
  return {**env, "LD_PRELOAD": f"{library}:{preload}" if preload else library,
          "MALLOC_CONF": env.get("MALLOC_CONF", JEMALLOC_CONF)}


def glibc_version() -> tuple[int, ...] | None:
  """(major, minor) of the running glibc; None elsewhere (macOS, musl)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  return tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) if name == "glibc" else None


def transparent_huge_pages() -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'; '' where unknown)."""
  try:
    with open(_THP_SETTING) as f:
      text = f.read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def huge_pages_environment(env: Mapping[str, str], glibc: tuple[int, ...] | None, thp: str) -> dict | None:
  """`env` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES, or None where it would not apply: DJ_HOST_MEMORY is
  'default', glibc is missing or older than 2.35, the kernel has no transparent huge pages, or GLIBC_TUNABLES
  already says something of glibc.malloc.hugetlb (the user's setting, or this process after its re-exec)."""
  tunables = env.get("GLIBC_TUNABLES", "")
  if (not tuned(env) or glibc is None or glibc < _MIN_GLIBC or thp not in ("always", "madvise")
      or "glibc.malloc.hugetlb" in tunables):
    return None
  return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def reexec_with_host_memory() -> None:
  """Replace this process by the same command (sys.orig_argv) with glibc's huge pages on and, on several host
  devices, jemalloc preloaded, where they apply (huge_pages_environment, allocator_environment); else return. Call
  it before any work and before JAX starts, after XLA_FLAGS has the host's device count
  (parallel.mesh.split_host_devices)."""
  from diffusion_jax.parallel.mesh import host_device_count
  huge = huge_pages_environment(os.environ, glibc_version(), transparent_huge_pages())
  preloaded = allocator_environment(huge or os.environ, jemalloc_library(), host_device_count())
  env = preloaded or huge
  if env is None or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def _libc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
  except OSError:
    return None


def reuse_freed_heap() -> bool:
  """Keep freed heap memory for reuse and run single-device CPU programs on the calling thread, so a step's
  temporaries come from memory the previous step freed (see the module's docstring). Call before JAX creates its
  CPU client. Memory freed stays in the process until release_freed_host_memory hands it back. Returns whether
  anything was set (not with DJ_HOST_MEMORY=default, nor without glibc)."""
  libc = _libc() if tuned() and glibc_version() is not None else None
  if libc is None:
    return False
  libc.mallopt(_M_MMAP_MAX, 0)  # the calling thread's large blocks from the heap, not fresh mmaps
  libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)  # and a freed block at the heap's top kept, not returned
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def release_freed_host_memory() -> None:
  """Hand the memory the process has freed back to the OS (glibc's malloc_trim; elsewhere nothing).

  Why: compiling a program (LLVM on XLA:CPU) allocates hundreds of MB that are freed afterwards but stay in
  glibc's heap, counted in the resident memory of the whole run, and the step's buffers then come on top. Called
  once, between compiling the train step and running it: on the fmnist_small step with 4 host devices the resident
  memory after compiling fell from 1019 to 560 MB, and the peak of bench/vs_peers.py's memory run (compile and 3
  steps) from 1617 to 1209-1218 MB.
  """
  libc = _libc()
  if libc is not None:
    libc.malloc_trim(0)
  process = ctypes.CDLL(None)
  if hasattr(process, "mallctl"):  # jemalloc preloaded: every arena's unused pages back (MALLCTL_ARENAS_ALL = 4096)
    process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
