"""Run untrusted candidate code against trusted checks, isolated (design and coverage: docs/sandbox.md).

Threat model. A candidate is code written by the policy being trained. It may be broken, slow or hostile:
fork bombs, daemons that outlive it, loops that ignore signals, memory bombs, unbounded output, reads from
stdin, sockets, writes outside its directory, ``sys.exit(0)`` / ``os._exit(0)``, printing "passed",
redefining the checker, reaching ``Popen`` through ``object.__subclasses__()``. Under RL pressure such tricks
get *found*, so the verdict must not be forgeable and nothing may leak out of a run.

Three processes per candidate::

    scorer   (this process; a worker thread of run_jobs)            trusted, owns the verdict and the cgroup
     └─ referee   (python -I -S _sandbox_referee.py; own session, root)   trusted; runs the checker
          └─ bwrap ... candidate  (fresh interpreter, sandbox uid)          untrusted

The referee executes the *trusted* checker (the task's helper code and its test, instrumented so that each
assertion unit reports pass/fail, see :mod:`shapegrpo_core.tasks.code`) and hands it, as ``candidate``, a
proxy: a call sends the arguments to the candidate process over a pipe and decodes the reply, which may only
be plain data (see :func:`decode_value`; bounded in size, depth, element count, int size and time). So
candidate code never runs in a process that computes or records a verdict. The referee writes one JSON
record holding a random nonce that only the scorer and the referee know; the scorer requires that nonce and
a complete record, else the candidate scores zero.

Isolation (details, tests and what is *not* covered: docs/sandbox.md):

1. bubblewrap: user, PID, IPC, network, UTS, mount and cgroup namespaces; a read-only root of /usr only, a
   private /proc, a minimal /dev, a private size-capped /tmp; ``--die-with-parent``, ``--new-session``.
2. A seccomp filter (:mod:`shapegrpo_core.tasks._sandbox_seccomp`, loaded by bwrap): EPERM for ptrace,
   process_vm_*, unshare/setns/clone with namespace flags, mounts, chroot, keyctl, bpf, perf_event_open,
   personality changes, userfaultfd, io_uring, module/kexec/reboot/swap calls, iopl/ioperm and a few more;
   ENOSYS for clone3 (glibc then uses clone, whose flags the filter sees).
3. A cgroup per candidate (v1 memory + pids + freezer + cpu, or v2) capping total memory, tasks and CPU
   bandwidth (``SandboxLimits.cpu_cores``; uncapped, and reported, where there is no cpu controller);
   teardown by root: freeze, SIGKILL every member, thaw, wait until empty, remove. No process of the
   candidate's identity is ever started outside the sandbox.
4. An unprivileged uid leased per running sandbox, rlimits, per-call / per-candidate / hard deadlines.
5. A Python audit hook (defence in depth only; the tests pass without it).

Where root, bubblewrap, libseccomp or cgroups are missing, :func:`run_job` refuses (an "error" verdict saying
why) unless ``SandboxLimits.unsafe_allow_unisolated`` is set. Nothing the sandbox raises escapes
:func:`run_job`: an infrastructure failure is a recorded "error"/"timeout" verdict. Not covered: the filter
is a deny list (a kernel bug in an allowed call is not stopped), everything under /usr is readable, and the
trusted checker runs as root outside the namespaces (a malicious dataset is out of scope).
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shapegrpo_core.tasks import _sandbox_referee as referee
from shapegrpo_core.tasks._sandbox_referee import (
    CANDIDATE_STUB,
    CHECK_FUNCTION,
    GUARDED_EVENTS,
    SOCKET_EVENTS,
    CandidateFailure,
    candidate_env,
    decode_value,
    encode_value,
)
from shapegrpo_core.tasks._sandbox_seccomp import SeccompUnavailable, seccomp_program

STATUSES = ("ok", "timeout", "error")
CPU_PERIOD_US = 100_000  # CFS period of the candidate's cgroup
CPU_MIN_QUOTA_US = 1_000  # the kernel rejects smaller quotas
# Sandbox uids are leased from [UID_BASE, UID_BASE + UID_COUNT); none of them is a real account. The count
# bounds the lock files (empty, kept: unlinking a lock file races with a concurrent opener).
UID_BASE = 1_700_000
UID_COUNT = 4096
_LOCK_DIR_NAME = "shapegrpo-sandbox-uids"  # under the temporary directory

# ----------------------------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one candidate run. Times in seconds, sizes in bytes."""

    timeout_s: float = 10.0  # total budget of the referee for all calls of one candidate
    call_timeout_s: float = 3.0  # one call of the candidate's function
    load_timeout_s: float = 5.0  # starting the candidate's interpreter and running its module-level code
    startup_grace_s: float = 5.0  # scorer's hard deadline = timeout_s + this (interpreter start-up, teardown)
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process and the cgroup's total memory cap
    # CPU bandwidth of the candidate's cgroup, in cores (CFS quota over a 100 ms period: v1 cpu.cfs_quota_us,
    # v2 cpu.max); None: no cap. Applied where the cgroup cpu controller exists (capabilities().cpu_cap).
    cpu_cores: float | None = 1.0
    cpu_s: int | None = None  # RLIMIT_CPU; default ceil(timeout_s) + 1
    max_processes: int = 16  # RLIMIT_NPROC of the sandbox uid (threads count too)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_bytes: int = 64 << 20  # size of the candidate's private /tmp
    max_reply_bytes: int = 8 << 20  # one reply frame from the candidate
    max_reply_items: int = 1_000_000  # elements decoded from one reply (and stopped at the call deadline)
    max_output_bytes: int = 4 << 20  # what the scorer reads from the referee
    max_restarts: int = 2  # fresh candidate processes after a crash or a late call
    audit_hook: bool = True  # Python-level guard in the candidate (defence in depth only)
    hidden_paths: tuple[str, ...] = ()  # paths under /usr hidden from the candidate (nothing else is visible)
    # Run candidates although root, bubblewrap or cgroups are missing: NO isolation beyond rlimits and the
    # audit hook. Off by default: without it such a machine refuses to execute (an "error" verdict, the reason
    # in ``detail``).
    unsafe_allow_unisolated: bool = False

    def __post_init__(self) -> None:
        for name in ("timeout_s", "call_timeout_s", "load_timeout_s", "startup_grace_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"SandboxLimits.{name} must be a positive finite number, got {v!r}")
        for name in ("memory_bytes", "max_processes", "max_file_bytes", "max_open_files", "tmpfs_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1")
        if self.max_open_files < 16:
            raise ValueError("SandboxLimits.max_open_files must be >= 16 (the interpreter needs a few)")
        if self.max_restarts < 0:
            raise ValueError("SandboxLimits.max_restarts must be >= 0")
        c = self.cpu_cores
        if c is not None and not (
            isinstance(c, (int, float)) and math.isfinite(c) and c * CPU_PERIOD_US >= CPU_MIN_QUOTA_US
        ):
            raise ValueError(
                "SandboxLimits.cpu_cores must be None or a finite number >= "
                f"{CPU_MIN_QUOTA_US / CPU_PERIOD_US} (the kernel's smallest quota: 1 ms a period), got {c!r}"
            )
        for p in self.hidden_paths:
            if not os.path.isabs(p):
                raise ValueError(f"hidden path must be absolute, got {p!r}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1

    @property
    def cpu_quota_us(self) -> int | None:
        """CFS quota per ``CPU_PERIOD_US`` period for ``cpu_cores`` (None: no cap)."""
        return None if self.cpu_cores is None else round(self.cpu_cores * CPU_PERIOD_US)


@dataclass(frozen=True)
class SandboxJob:
    """One candidate against one checker.

    ``program`` (untrusted) is executed in the candidate process and must define ``entry_point``. ``checker``
    (trusted) is executed in the referee and must define ``CHECK_FUNCTION(candidate, record)`` that calls
    ``record(i, None)`` (unit i passed) or ``record(i, exc)`` (failed) for each i in ``range(num_units)``.
    ``label`` (letters, digits, ``_-``) is put on the candidate's command line, so that its processes can be
    found (tests grep for it).
    """

    program: str
    entry_point: str
    checker: str
    num_units: int
    seed: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if not self.entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {self.entry_point!r}")
        if self.num_units < 0:
            raise ValueError(f"num_units must be >= 0, got {self.num_units}")
        if not all(ch.isalnum() or ch in "_-" for ch in self.label) or not self.label.isascii():
            raise ValueError(f"label may hold only ASCII letters, digits, '_' and '-', got {self.label!r}")


@dataclass(frozen=True)
class SandboxResult:
    """Verdict of one job. ``passed[i]`` is True only if the referee's record says unit i passed.

    status: "ok" (a complete, authentic record), "timeout" (the scorer's hard deadline or the CPU-time limit
    killed the referee)
    or "error" (no valid record: the referee crashed, its output was malformed or over the cap). Anything
    but "ok" fails every unit: a recorded zero, with the reason in ``detail``.

    ``reasons[i]``: "pass"; "assertion" (the check's assert failed); "candidate-raised" (the function raised
    or returned a non-plain value); "candidate-timeout" (a call took longer than ``call_timeout_s``);
    "candidate-crashed" (its process died); "bad-reply" (malformed or oversized reply); "deadline"
    (``timeout_s`` spent); "unavailable" (no restarts left, or a restart failed to load); "load-error" (the
    program did not load: see ``load_error``); "not-run" (the checker never reached the unit);
    "error:<Type>" (the check itself raised, e.g. TypeError comparing a wrong type); or the status when it
    is not "ok".
    """

    status: str
    passed: tuple[bool, ...]
    reasons: tuple[str, ...]
    load_error: str | None = None
    detail: str = ""
    wall_s: float = 0.0
    uid: int | None = None
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def num_passed(self) -> int:
        return sum(self.passed)


@dataclass(frozen=True)
class SandboxCapabilities:
    """What this machine allows; probed once per process (:func:`capabilities`)."""

    root: bool  # uid switch, cgroup creation, per-uid process limit
    bwrap: str | None  # bubblewrap binary that started a sandboxed interpreter as a sandbox uid, else None
    cgroup_version: int | None  # 1 (memory + pids + freezer hierarchies) or 2 (unified), else None
    child_python: str  # interpreter the candidate runs (under /usr, so it exists in the minimal root)
    missing: tuple[str, ...] = ()  # why full isolation is unavailable (empty when it is)
    seccomp: bool = False  # the seccomp filter was built and bwrap loaded it into a probe sandbox
    cpu_cap: bool = False  # the cgroup cpu controller caps each candidate's CPU (SandboxLimits.cpu_cores)
    notes: tuple[str, ...] = ()  # weaker-than-designed but still isolated (e.g. no cgroup cpu controller)

    @property
    def isolated(self) -> bool:
        return not self.missing


# ----------------------------------------------------------------------------------------- capabilities probe

_CAPS: SandboxCapabilities | None = None
_CAPS_LOCK = threading.Lock()
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_V1_CONTROLLERS = ("memory", "pids", "freezer")
_CGROUP_PARENT = "shapegrpo-sandbox"


def capabilities() -> SandboxCapabilities:
    """Probe (once per process, cached) what isolation this machine allows."""
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is None:
            _CAPS = _probe_capabilities()
        return _CAPS


def _cgroup_version() -> int | None:
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        with open(os.path.join(CGROUP_ROOT, "cgroup.controllers")) as f:
            have = set(f.read().split())
        return 2 if {"memory", "pids"} <= have else None
    if all(os.path.isdir(os.path.join(CGROUP_ROOT, c)) for c in CGROUP_V1_CONTROLLERS):
        return 1
    return None


def _cpu_controller(version: int) -> bool:
    """Whether the cgroup cpu controller (CFS bandwidth) is there to cap a candidate's CPU."""
    if version == 2:
        with open(os.path.join(CGROUP_ROOT, "cgroup.controllers")) as f:
            return "cpu" in f.read().split()
    return os.path.exists(os.path.join(CGROUP_ROOT, "cpu", "cpu.cfs_quota_us"))


# The probe sandbox exits 0 only when its own /proc says a seccomp filter is loaded (mode 2).
_PROBE_PROGRAM = (
    "import json, os, struct, sys\n"
    "status = open('/proc/self/status').read()\n"
    "sys.exit(0 if '\\nSeccomp:\\t2\\n' in status else 3)\n"
)


def _probe_capabilities() -> SandboxCapabilities:
    import shutil

    root = os.geteuid() == 0
    missing: list[str] = []
    notes: list[str] = []
    if not root:
        missing.append("not root (no uid switch, no cgroups)")
    version = _cgroup_version() if root else None
    if root and version is None:
        missing.append("no usable cgroup v1 (memory, pids, freezer) or v2 (memory, pids) hierarchy")
    cpu_cap = False
    if root and version is not None:
        try:
            _remove_cgroup(_make_cgroup(SandboxLimits(), version))
        except OSError as e:
            missing.append(f"cannot create a cgroup: {e}")
            version = None
    if root and version is not None:
        try:
            cpu_cap = _cpu_controller(version)
            if cpu_cap:
                _remove_cgroup(_make_cgroup(SandboxLimits(), version, cpu=True))
        except OSError as e:
            notes.append(f"cgroup cpu controller unusable ({e}): candidates' CPU is not capped by a cgroup")
            cpu_cap = False
        else:
            if not cpu_cap:
                notes.append("no cgroup cpu controller: candidates' CPU is not capped by a cgroup")
    try:
        program: bytes | None = seccomp_program()
    except SeccompUnavailable as e:
        program = None
        missing.append(f"no seccomp filter: {e} (apt-get install libseccomp2; pip install pyseccomp)")
    bwrap = shutil.which("bwrap")
    child = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)
    seccomp = False
    if bwrap is None:
        missing.append("bubblewrap (bwrap) not installed: apt-get install bubblewrap")
    elif root:
        with _UidLease() as uid:
            spec = {"bwrap": bwrap, "limits": {"tmpfs_bytes": 1 << 20, "hidden_paths": ()}}
            fd = referee.seccomp_memfd(program) if program is not None else None
            try:
                probe = [child, "-s", "-S", "-B", "-c", _PROBE_PROGRAM]
                r = subprocess.run(
                    referee.bwrap_command(spec, probe, seccomp_fd=fd),
                    user=uid,
                    group=uid,
                    extra_groups=[],
                    capture_output=True,
                    timeout=60,
                    env=candidate_env("/", 0),
                    cwd="/",
                    pass_fds=() if fd is None else (fd,),
                    check=False,
                )
                if r.returncode == 3 and program is not None:
                    missing.append("bwrap started the probe, but no seccomp filter was in force in it")
                elif r.returncode not in (0, 3):
                    missing.append(f"bwrap cannot start {child} as a sandbox uid: {r.stderr[-300:]!r}")
                    bwrap = None
                seccomp = r.returncode == 0 and program is not None
            except (OSError, subprocess.SubprocessError) as e:
                missing.append(f"bwrap failed: {e}")
                bwrap = None
            finally:
                if fd is not None:
                    os.close(fd)
    return SandboxCapabilities(root, bwrap, version, child, tuple(missing), seccomp, cpu_cap, tuple(notes))


# ------------------------------------------------------------------------------------------ cgroup per run


def _make_cgroup(limits: SandboxLimits, version: int, cpu: bool = False) -> list[str]:
    """Create the candidate's cgroup(s) with the memory and process caps, and the CPU cap when ``cpu`` (the
    cpu controller is there) and ``limits.cpu_cores`` is set; their directories."""
    name = f"c{os.getpid()}-{threading.get_ident()}-{random.SystemRandom().getrandbits(48):012x}"
    quota = limits.cpu_quota_us if cpu else None
    dirs: list[str] = []
    try:
        if version == 2:
            parent = os.path.join(CGROUP_ROOT, _CGROUP_PARENT)
            os.makedirs(parent, exist_ok=True)
            controllers = "+memory +pids" + (" +cpu" if cpu else "")
            _write_file(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), controllers)
            _write_file(os.path.join(parent, "cgroup.subtree_control"), controllers)
            d = os.path.join(parent, name)
            os.mkdir(d)
            dirs.append(d)
            _write_file(os.path.join(d, "memory.max"), str(limits.memory_bytes))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write_file(os.path.join(d, "memory.swap.max"), "0")
            _write_file(os.path.join(d, "pids.max"), str(limits.max_processes))
            if quota is not None:
                _write_file(os.path.join(d, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
            return dirs
        for ctrl in CGROUP_V1_CONTROLLERS + (("cpu",) if quota is not None else ()):
            d = os.path.join(CGROUP_ROOT, ctrl, _CGROUP_PARENT, name)
            os.makedirs(d)
            dirs.append(d)
        mem, pids = dirs[0], dirs[1]
        # RAM, page cache, tmpfs, SysV shm and memfd pages are all charged to the memory cgroup.
        _write_file(os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_bytes))
        if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
            _write_file(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(limits.memory_bytes))
        _write_file(os.path.join(pids, "pids.max"), str(limits.max_processes))
        if quota is not None:
            _write_file(os.path.join(dirs[3], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write_file(os.path.join(dirs[3], "cpu.cfs_quota_us"), str(quota))
        return dirs
    except OSError:
        _remove_cgroup(dirs)
        raise


def _write_file(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _memory_peak(dirs: list[str]) -> int | None:
    for d in dirs:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            try:
                with open(os.path.join(d, name)) as f:
                    return int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return None


def _cpu_accounting(dirs: list[str]) -> dict[str, Any]:
    """The CPU cap the cgroup holds, read back from it, and its throttling counters (empty without a cap)."""
    out: dict[str, Any] = {}
    for d in dirs:
        try:
            if os.path.exists(os.path.join(d, "cpu.max")):  # v2: "quota period" or "max period"
                with open(os.path.join(d, "cpu.max")) as f:
                    quota, period = f.read().split()
                if quota == "max":
                    continue
                out["cpu_quota_us"], out["cpu_period_us"] = int(quota), int(period)
            elif os.path.exists(os.path.join(d, "cpu.cfs_quota_us")):
                with open(os.path.join(d, "cpu.cfs_quota_us")) as f:
                    out["cpu_quota_us"] = int(f.read())
                with open(os.path.join(d, "cpu.cfs_period_us")) as f:
                    out["cpu_period_us"] = int(f.read())
            else:
                continue
            with open(os.path.join(d, "cpu.stat")) as f:
                stat = dict(line.split() for line in f if len(line.split()) == 2)
            out["cpu_throttled_periods"] = int(stat.get("nr_throttled", 0))
        except (OSError, ValueError):
            continue
    return out


def _remove_cgroup(dirs: list[str]) -> bool:
    """Kill everything in the cgroup (freeze, SIGKILL, thaw) and remove it; True when it is gone."""
    if not dirs:
        return True
    empty = referee.kill_cgroup(dirs)
    gone = True
    for d in dirs:
        for _ in range(200):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: a member is still exiting
                time.sleep(0.005)
        else:
            gone = False
    return empty and gone


# -------------------------------------------------------------------------------------------------- uid lease


class _UidLease:
    """An exclusive sandbox uid for the duration of a ``with`` block (None when not root).

    Exclusive across threads and processes: a ``flock`` on a per-uid lock file, released by the kernel even if
    this process dies. Uids are drawn at random from the range so that concurrent scorers rarely contend.
    """

    def __init__(self) -> None:
        self.uid: int | None = None
        self._fd: int | None = None

    def __enter__(self) -> int | None:
        if os.geteuid() != 0:
            return None
        import fcntl
        import tempfile

        lock_dir = os.path.join(tempfile.gettempdir(), _LOCK_DIR_NAME)
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        rng = random.SystemRandom()
        for _ in range(1000):
            uid = UID_BASE + rng.randrange(UID_COUNT)
            fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return uid
        raise RuntimeError("could not lease a sandbox uid (1000 tries)")

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


# ------------------------------------------------------------------------------------------------- the scorer


def _referee_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def run_job(job: SandboxJob, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run one candidate against its checker in the sandbox. Never raises: anything that goes wrong, in the
    candidate or in the sandbox itself (no cgroup, no bwrap, a failed launch, a stuck teardown), is a
    recorded failed candidate -- "timeout" or "error" with the reason in ``detail``."""
    limits = limits or SandboxLimits()
    n = job.num_units
    if n == 0:
        return SandboxResult("ok", (), ())
    start = time.monotonic()
    try:
        return _run_job(job, limits, start)
    except Exception as e:  # noqa: BLE001 -- an infrastructure failure is a recorded verdict, not a crash
        detail = f"sandbox failure: {type(e).__name__}: {e}"[:2000]
        return SandboxResult("error", (False,) * n, ("error",) * n, None, detail, time.monotonic() - start)


def _run_job(job: SandboxJob, limits: SandboxLimits, start: float) -> SandboxResult:
    import secrets
    import tempfile

    n = job.num_units
    caps = capabilities()
    if caps.missing and not limits.unsafe_allow_unisolated:
        detail = (
            "refused to execute untrusted code without isolation: "
            + "; ".join(caps.missing)
            + " (SandboxLimits.unsafe_allow_unisolated=True runs it anyway, unisolated)"
        )
        return SandboxResult("error", (False,) * n, ("refused",) * n, None, detail, 0.0)
    isolated = not caps.missing
    nonce = secrets.token_hex(16)
    cgroups: list[str] = []
    with (
        _UidLease() as uid,
        tempfile.TemporaryDirectory(prefix="shapegrpo-sbx-", ignore_cleanup_errors=True) as wd,
    ):
        if uid is not None:
            os.chown(wd, uid, uid)
            os.chmod(wd, 0o700)
        if caps.cgroup_version is not None:
            cgroups = _make_cgroup(limits, caps.cgroup_version, cpu=caps.cpu_cap)
        blocked = GUARDED_EVENTS if limits.audit_hook else (() if isolated else SOCKET_EVENTS)
        spec = {
            "nonce": nonce,
            "program": job.program,
            "entry_point": job.entry_point,
            "checker": job.checker,
            "num_units": n,
            "seed": job.seed,
            "label": job.label,
            "uid": uid,
            "workdir": wd,
            "child_python": caps.child_python,
            "limits": asdict(limits) | {"cpu_s": limits.cpu_seconds},
            "bwrap": caps.bwrap if isolated else None,
            "seccomp_bpf": seccomp_program().hex() if isolated else None,
            "cgroups": cgroups,
            "blocked_events": list(blocked),
        }
        try:
            status, detail, record = _run_referee(spec, limits, start)
        finally:
            peak = _memory_peak(cgroups)
            cpu = _cpu_accounting(cgroups)
            clean = _remove_cgroup(cgroups)
        if not clean:
            status, detail, record = "error", f"candidate cgroup not empty after kill: {cgroups}", None
    wall = time.monotonic() - start
    if status != "ok" or record is None:
        return SandboxResult(status, (False,) * n, (status,) * n, None, detail, wall, uid)
    units = record["units"]
    isolation = dict(record.get("isolation", {})) | {"memory_peak_bytes": peak} | cpu
    return SandboxResult(
        "ok",
        tuple(bool(u[0]) for u in units),
        tuple(str(u[1]) for u in units),
        record.get("load_error"),
        detail,
        wall,
        uid,
        isolation,
    )


def _run_referee(
    spec: dict[str, Any], limits: SandboxLimits, start: float
) -> tuple[str, str, dict[str, Any] | None]:
    """Start the referee, read its record (capped, hard deadline), kill its group; (status, detail, rec)."""
    import tempfile

    deadline = start + limits.timeout_s + limits.startup_grace_s
    with tempfile.TemporaryFile() as spec_file, tempfile.TemporaryFile() as err_file:
        spec_file.write(json.dumps(spec).encode())
        spec_file.seek(0)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", referee.__file__, "--referee"],
            stdin=spec_file,
            stdout=subprocess.PIPE,
            stderr=err_file,
            start_new_session=True,  # own process group: one killpg ends the referee and the candidate
            close_fds=True,
            env=_referee_env(),
            cwd="/",
        )
        assert proc.stdout is not None
        try:
            out, why = _read_capped(proc.stdout.fileno(), deadline, limits.max_output_bytes)
        finally:
            # The group leader is not reaped yet, so its pgid cannot have been reused by anyone else.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            proc.stdout.close()
        err_file.seek(0)
        stderr_tail = err_file.read()[-4000:].decode(errors="replace")
    if why == "timeout":
        return "timeout", f"referee exceeded the hard deadline of {deadline - start:.1f}s", None
    if why == "overflow":
        return "error", f"referee output exceeded {limits.max_output_bytes} bytes", None
    record = _parse_record(out, spec["nonce"], spec["num_units"])
    if record is None and proc.returncode == -signal.SIGXCPU:
        # RLIMIT_CPU fired before the wall-clock deadline (a busy loop on an idle machine, or a loaded one):
        # the same outcome as the deadline, a CPU-time timeout.
        return "timeout", f"referee exceeded its CPU-time limit of {limits.cpu_seconds}s", None
    if record is None:
        return "error", f"no valid record from the referee (exit {proc.returncode}): {stderr_tail}", None
    if "error" in record:
        return "error", f"referee: {record['error']}", None
    return "ok", stderr_tail, record


def _read_capped(fd: int, deadline: float, cap: int) -> tuple[bytes, str]:
    """Read fd to EOF; stop at the deadline or past cap bytes. (data, "eof" | "timeout" | "overflow")."""
    chunks: list[bytes] = []
    total = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        if not poller.poll(left * 1000):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks), "eof"
        total += len(chunk)
        if total > cap:
            return b"", "overflow"
        chunks.append(chunk)


def _parse_record(out: bytes, nonce: str, num_units: int) -> dict | None:
    """The referee's record if it is authentic (nonce) and complete (one [bool, str] per unit), else None."""
    try:
        record = json.loads(out.decode())
    except ValueError:
        return None
    if type(record) is not dict or record.get("nonce") != nonce:
        return None
    if "error" in record:
        return record
    units = record.get("units")
    if type(units) is not list or len(units) != num_units:
        return None
    for u in units:
        if type(u) is not list or len(u) != 2 or type(u[0]) is not bool or type(u[1]) is not str:
            return None
    return record


def run_jobs(
    jobs: Sequence[SandboxJob], limits: SandboxLimits | None = None, max_workers: int | None = None
) -> list[SandboxResult]:
    """Run jobs concurrently (threads, each driving its own subprocesses); results in job order."""
    if not jobs:
        return []
    workers = max(1, min(len(jobs), max_workers or os.cpu_count() or 1))
    if workers == 1:
        return [run_job(j, limits) for j in jobs]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda j: run_job(j, limits), jobs))


__all__ = [
    "CANDIDATE_STUB",
    "CHECK_FUNCTION",
    "GUARDED_EVENTS",
    "SOCKET_EVENTS",
    "STATUSES",
    "CandidateFailure",
    "SandboxCapabilities",
    "SandboxJob",
    "SandboxLimits",
    "SandboxResult",
    "capabilities",
    "decode_value",
    "encode_value",
    "run_job",
    "run_jobs",
    "seccomp_program",
]
