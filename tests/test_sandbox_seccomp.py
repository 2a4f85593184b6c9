"""The sandbox's seccomp filter and CPU cap, against real candidates in the real sandbox (audit hook off).

Each hostile candidate makes one denied call -- through ctypes, through a child started by
``_posixsubprocess.fork_exec``, or from code loaded out of a memfd -- and reports the errno it observed.
Unit 0 passes only if the call succeeded (it must fail), unit 1 only if the errno is the filter's (EPERM;
ENOSYS for clone3). Without the filter most of these calls succeed inside the namespaces (ptrace of an own
child, keyctl, personality, process_vm_readv of itself, a nested user namespace: see
test_without_the_filter_the_same_calls_succeed), so unit 1 shows the filter at work.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import uuid
from dataclasses import replace

import pyseccomp
import pytest
from test_sandbox import (
    CHECKER,
    FAST,
    GOOD,
    HALF,
    _ipcs,
    _live_processes_of,
    _pgrep,
    _sandbox_cgroups,
    needs_isolation,
)

from shapegrpo_core.tasks import _sandbox_seccomp, sandbox
from shapegrpo_core.tasks.sandbox import (
    CHECK_FUNCTION,
    SandboxJob,
    SandboxLimits,
    capabilities,
    run_job,
    run_jobs,
)

# Unit 0: the call worked (an escape); unit 1: the errno the filter returns.
ERRNO_CHECKER = f"""
def {CHECK_FUNCTION}(candidate, record):
    r = candidate(0)
    record(0, None if r == 0 else AssertionError(r))
    record(1, None if r == {{expected}} else AssertionError(r))
"""


def _nr(name: str) -> int:
    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)


PRELUDE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
def errno_of(ret):
    return 0 if ret != -1 else ctypes.get_errno()
"""

# Each f(x) returns the errno its denied call got (0 if the call succeeded). {nr_*} are this machine's
# syscall numbers; {marker} labels processes.
ATTACKS = {
    "ptrace_attach": """
import time
def f(x):
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    libc.ptrace.argtypes = [L, L, ctypes.c_void_p, ctypes.c_void_p]
    r = errno_of(libc.ptrace(16, pid, None, None))  # PTRACE_ATTACH to its own child
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return r
""",
    "unshare_newuser": """
def f(x):
    return errno_of(libc.unshare(0x10000000))  # CLONE_NEWUSER
""",
    "clone_newuser": """
def f(x):
    r = libc.syscall(L({nr_clone}), L(0x10000000 | 17), L(0), L(0), L(0), L(0))  # CLONE_NEWUSER | SIGCHLD
    if r == 0:
        os._exit(0)  # the child of a clone that should not have happened
    if r > 0:
        os.waitpid(r, 0)
    return errno_of(r)
""",
    "clone3": """
def f(x):
    args = (ctypes.c_uint64 * 11)()
    args[0] = 0x10000000  # flags: CLONE_NEWUSER
    args[4] = 17  # exit_signal: SIGCHLD
    r = libc.syscall(L({nr_clone3}), ctypes.byref(args), L(ctypes.sizeof(args)))
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
    return errno_of(r)
""",
    "setns": """
def f(x):
    fd = os.open("/proc/self/ns/user", os.O_RDONLY)
    return errno_of(libc.setns(fd, 0))
""",
    "mount": """
def f(x):
    return errno_of(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
""",
    "keyctl": """
def f(x):
    # KEYCTL_GET_KEYRING_ID of the session keyring, creating it
    return errno_of(libc.syscall(L({nr_keyctl}), L(0), L(-3), L(1)))
""",
    "bpf": """
def f(x):
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    return errno_of(libc.syscall(L({nr_bpf}), L(0), ctypes.byref(attr), L(ctypes.sizeof(attr))))
""",
    "perf_event_open": """
def f(x):
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1] = 1, 128  # PERF_TYPE_SOFTWARE, size; config 0 = PERF_COUNT_SW_CPU_CLOCK
    attr[10] = 1 << 5 | 1 << 6  # exclude_kernel | exclude_hv
    return errno_of(libc.syscall(L({nr_perf_event_open}), ctypes.byref(attr), L(0), L(-1), L(-1), L(0)))
""",
    "personality": """
def f(x):
    libc.personality.argtypes = [ctypes.c_ulong]
    if libc.personality(0xFFFFFFFF) == -1:  # the query stays allowed
        return -1
    return errno_of(libc.personality(0x0400000))  # READ_IMPLIES_EXEC
""",
    "process_vm_readv": """
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
def f(x):
    src, dst = ctypes.create_string_buffer(b"secret", 64), ctypes.create_string_buffer(64)
    local, remote = IOVec(ctypes.addressof(dst), 64), IOVec(ctypes.addressof(src), 64)
    r = libc.syscall(L({nr_process_vm_readv}), L(os.getpid()), ctypes.byref(local), L(1),
                     ctypes.byref(remote), L(1), L(0))
    return errno_of(r)
""",
    "posixsubprocess_child_unshare": """
import _posixsubprocess
CHILD = ("import ctypes; l = ctypes.CDLL(None, use_errno=True); "
         "print(0 if l.unshare(0x10000000) == 0 else ctypes.get_errno())")
def f(x):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = [b"/usr/bin/python3", b"-S", b"-c", CHILD.encode()]
    args = (argv, [argv[0]], True, (), None, None, -1, -1, -1, out_w, -1, -1, err_r, err_w,
            True, False, -1, None, None, None, -1, None)
    try:
        pid = _posixsubprocess.fork_exec(*args, False)
    except TypeError:
        pid = _posixsubprocess.fork_exec(*args)
    os.close(out_w)
    os.close(err_w)
    report = os.read(out_r, 100)
    os.waitpid(pid, 0)
    return int(report)
""",
    "memfd_exec_ptrace": """
SCRIPT = b'''#!/usr/bin/python3 -S
import ctypes
l = ctypes.CDLL(None, use_errno=True)
print(0 if l.ptrace(0, 0, None, None) == 0 else ctypes.get_errno())  # PTRACE_TRACEME
'''
def f(x):
    fd = os.memfd_create("{marker}", 0)  # inherited by the exec below: the script runs from the memfd
    os.write(fd, SCRIPT)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(out_w, 1)
        os.execv("/proc/self/fd/%d" % fd, ["memfd-{marker}"])
    os.close(out_w)
    report = os.read(out_r, 100)
    os.waitpid(pid, 0)
    return int(report)
""",
}
EXPECTED = {"clone3": errno.ENOSYS}  # every other attack: EPERM

# Under the filter, an honest candidate still has threads (clone3 -> ENOSYS -> clone fallback in glibc),
# fork and exec.
HONEST_PROCESSES = """
import os, subprocess, threading
def f(x):
    box = []
    t = threading.Thread(target=lambda: box.append(x * x))
    t.start()
    t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    ok = subprocess.run(["/bin/true"], check=False).returncode == 0
    return box[0] if code == 7 and ok else -1
"""


def _child_has_os_unshare() -> bool:
    child = capabilities().child_python
    probe = "import os; print(hasattr(os, 'unshare'))"
    r = subprocess.run([child, "-c", probe], capture_output=True, text=True, check=False)
    return r.stdout.strip() == "True"


@needs_isolation
def test_seccomp_denies_each_call_without_the_audit_hook():
    assert capabilities().seccomp, capabilities()
    marker = f"shapegrpo-seccomp-{uuid.uuid4().hex[:12]}"
    fill = {f"nr_{n}": _nr(n) for n in ("clone", "clone3", "keyctl", "bpf", "perf_event_open")}
    fill |= {"nr_process_vm_readv": _nr("process_vm_readv"), "marker": marker}
    attacks = dict(ATTACKS)
    if _child_has_os_unshare():  # Python >= 3.12 in the sandbox
        attacks["os_unshare"] = (
            "def f(x):\n    try:\n        os.unshare(os.CLONE_NEWUSER)\n    except OSError as e:\n"
            "        return e.errno\n    return 0\n"
        )
    names = list(attacks)
    jobs = [
        SandboxJob(
            PRELUDE + attacks[n].format(**fill),
            "f",
            ERRNO_CHECKER.format(expected=EXPECTED.get(n, errno.EPERM)),
            2,
            label=marker,
        )
        for n in names
    ]
    jobs += [SandboxJob(p, "f", CHECKER, 2, label=marker) for p in (GOOD, HALF, HONEST_PROCESSES)]
    limits = replace(FAST, audit_hook=False, max_restarts=0)
    ipcs_before = _ipcs()
    results = run_jobs(jobs, limits, max_workers=2)

    verdicts = dict(zip([*names, "good", "half", "honest_processes"], results, strict=True))
    for name in names:
        r = verdicts[name]
        assert r.status == "ok" and r.isolation["seccomp"] is True, (name, r)
        assert r.passed == (False, True), (name, r)  # the call failed, with the filter's errno
    assert verdicts["good"].passed == (True, True), verdicts["good"]
    assert verdicts["half"].passed == (True, False), verdicts["half"]
    assert verdicts["honest_processes"].passed == (True, True), verdicts["honest_processes"]
    assert _pgrep(marker) == []
    for r in results:
        assert r.uid is not None and _live_processes_of(r.uid) == [], r
    assert _sandbox_cgroups() == []
    assert _ipcs() == ipcs_before


@needs_isolation
def test_without_the_filter_the_same_calls_succeed(monkeypatch):
    """Control: the same candidates in the same sandbox minus the filter. Namespaces alone do not stop a
    process from ptracing its own child, changing its personality or reading its own memory by
    process_vm_readv, so the errno checks above measure the filter, not the namespaces."""
    monkeypatch.setattr(sandbox, "seccomp_program", lambda: b"")  # the referee then passes no --seccomp
    fill = {"nr_process_vm_readv": _nr("process_vm_readv")}
    names = ("ptrace_attach", "personality", "process_vm_readv")
    checker = ERRNO_CHECKER.format(expected=errno.EPERM)
    jobs = [SandboxJob(PRELUDE + ATTACKS[n].format(**fill), "f", checker, 2) for n in names]
    for name, r in zip(names, run_jobs(jobs, replace(FAST, audit_hook=False), max_workers=2), strict=True):
        assert r.isolation["seccomp"] is False and r.passed == (True, False), (name, r)


@needs_isolation
def test_cpu_cap_is_written_into_the_cgroup_and_throttles():
    """The cgroup holds the quota of ``cpu_cores`` (read back from it at the end of the run) and a candidate
    that spins past it is throttled by the kernel -- and still scored correctly."""
    if not capabilities().cpu_cap:
        pytest.skip(f"no cgroup cpu controller: {capabilities().notes}")
    spin = "import time\ndef f(x):\n    t = time.time()\n    while time.time() - t < 0.5:\n        pass\n"
    spin += "    return x * x\n"
    limits = replace(FAST, cpu_cores=0.05, timeout_s=15, call_timeout_s=5, load_timeout_s=8, audit_hook=False)
    throttled = run_job(SandboxJob(spin, "f", CHECKER, 2), limits)
    assert throttled.passed == (True, True), throttled
    assert throttled.isolation["cpu_quota_us"] == 5_000, throttled.isolation
    assert throttled.isolation["cpu_period_us"] == sandbox.CPU_PERIOD_US
    assert throttled.isolation["cpu_throttled_periods"] >= 1, throttled.isolation
    default = run_job(SandboxJob(GOOD, "f", CHECKER, 2), FAST)
    assert default.passed == (True, True) and default.isolation["cpu_quota_us"] == 100_000, default
    uncapped = run_job(SandboxJob(GOOD, "f", CHECKER, 2), replace(FAST, cpu_cores=None))
    assert uncapped.passed == (True, True) and "cpu_quota_us" not in uncapped.isolation, uncapped
    assert _sandbox_cgroups() == []


def test_cpu_cores_validation():
    assert SandboxLimits(cpu_cores=None).cpu_quota_us is None
    assert SandboxLimits(cpu_cores=1.5).cpu_quota_us == 150_000
    for bad in (0, -1, 0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cpu_cores"):
            SandboxLimits(cpu_cores=bad)


def test_without_libseccomp_the_sandbox_is_not_isolated(monkeypatch):
    """With the binding unimportable (as on a machine without libseccomp) the probe reports the sandbox as not
    isolated, says why, and run_job refuses."""
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import pyseccomp -> ImportError
    _sandbox_seccomp.seccomp_program.cache_clear()
    try:
        caps = sandbox._probe_capabilities()
        assert not caps.isolated and not caps.seccomp, caps
        assert any("no seccomp filter" in m and "libseccomp unavailable" in m for m in caps.missing), caps
        monkeypatch.setattr(sandbox, "_CAPS", caps)
        r = run_job(SandboxJob(GOOD, "f", CHECKER, 2), FAST)
        assert r.status == "error" and r.reasons == ("refused", "refused"), r
        assert "no seccomp filter" in r.detail, r
    finally:
        _sandbox_seccomp.seccomp_program.cache_clear()


def test_filter_program_is_built_once_and_is_bpf():
    program = sandbox.seccomp_program()
    assert program is sandbox.seccomp_program()  # cached bytes, one build per process
    assert len(program) % 8 == 0 and len(program) >= 8 * (len(_sandbox_seccomp.DENIED_SYSCALLS) + 4)
