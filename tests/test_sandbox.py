"""The sandbox against hostile candidates: every attack ends as a failed unit or a timeout, no
process survives, nothing outside the sandbox changes, and honest candidates scored alongside keep their
verdicts. The suite runs under several isolation configurations, so that each layer is shown to hold alone."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from shapegrpo_core.tasks import sandbox
from shapegrpo_core.tasks._sandbox_referee import _STUB_CODEC
from shapegrpo_core.tasks.sandbox import (
    CHECK_FUNCTION,
    SandboxJob,
    SandboxLimits,
    capabilities,
    decode_value,
    encode_value,
    run_job,
    run_jobs,
)

# Two units: candidate(3) == 9 and candidate(4) == 16.
CHECKER = f"""
def {CHECK_FUNCTION}(candidate, record):
    for i, (x, y) in enumerate([(3, 9), (4, 16)]):
        try:
            assert candidate(x) == y
        except Exception as e:
            record(i, e)
        else:
            record(i, None)
"""
FAST = SandboxLimits(timeout_s=8, call_timeout_s=1.5, load_timeout_s=4, max_restarts=1, startup_grace_s=10)
# The hostile suites: no restart after a late call, so each endless loop costs one call timeout, not two.
HOSTILE_LIMITS = replace(FAST, max_restarts=0)

GOOD = "def f(x):\n    return x * x\n"
HALF = "def f(x):\n    return 9\n"

# Each hostile program defines f. Where an attack could "work", f returns the right answer only if it did,
# so a failed unit means the attack was stopped. {marker}, {canary}, {escape}, {port} are filled in per test.
HOSTILE = {
    "fork_bomb": """
import os
def f(x):
    while True:
        try:
            os.fork()
        except OSError:
            pass
""",
    "daemon": """
import os, time
def f(x):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep-{marker}", "300"])
        os._exit(0)
    time.sleep(0.2)
    return -1
""",
    "ignores_alarm": """
import signal
def f(x):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.alarm(1)
    while True:
        pass
""",
    "memory_bomb": """
def f(x):
    block = bytearray(10 * 1024**3)
    return x * x + len(block)
""",
    "output_flood": """
import sys
def f(x):
    while True:
        sys.stdout.write("x" * 65536)
        sys.stderr.write("y" * 65536)
""",
    "stdin": """
import sys
def f(x):
    data = sys.stdin.read()
    return int(input()) if not data else int(data)
""",
    "socket": """
import socket
def f(x):
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    s.sendall(b"{marker}")
    return x * x
""",
    "canary": """
def f(x):
    try:  # world-writable on the host; a private tmpfs in the mount namespace (the host never sees it)
        with open({escape!r}, "w") as fh:
            fh.write("escaped")
    except OSError:
        pass
    with open({canary!r}, "w") as fh:
        fh.write("pwned")
    return x * x
""",
    "os_exit": """
import os
def f(x):
    os._exit(0)
""",
    "os_exit_at_import": """
import os
os._exit(0)
def f(x):
    return x * x
""",
    "sys_exit": """
import sys
def f(x):
    sys.exit(0)
""",
    "forged_verdict": """
import os, sys
def {check}(candidate, record):
    for i in range(2):
        record(i, None)
def check(candidate):
    pass
print("passed")
def f(x):
    fake = json_record = '{{"units": [[true, "pass"], [true, "pass"]], "swept": true}}'
    for fd in range(0, 32):
        try:
            os.write(fd, fake.encode())
        except OSError:
            pass
    print("passed")
    return None
""",
    "always_equal": """
class AlwaysEqual(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def f(x):
    return AlwaysEqual(0)
""",
    "subclasses_popen": """
def f(x):
    os_globals = None
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "_wrap_close":
            os_globals = cls.__init__.__globals__
    status = os_globals["system"](
        "(exec -a sleep-{marker} sleep 300 &); echo pwned > {canary}"
    )
    return x * x if status == 0 else -1
""",
    "kill_referee": """
import os, signal
def f(x):
    for pid in (os.getppid(), 1):  # inside the PID namespace: bwrap's init at most, never the referee
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return x * x + 1  # a wrong answer: the unit fails either way; the referee must survive (status "ok")
""",
}


# New attack families against the bubblewrap + cgroup layer. Each returns the right answer only if the attack
# worked; run with and without the audit hook (the suite must hold without it).
HOSTILE.update(
    {
        "stop_the_cleaner": """
import os, signal, time
def f(x):
    if os.fork() == 0:  # a survivor that stops or ptraces whatever process it can see
        import ctypes
        libc = ctypes.CDLL(None)
        while True:
            for p in os.listdir("/proc"):
                if p.isdigit() and int(p) != os.getpid():
                    try:
                        os.kill(int(p), signal.SIGSTOP)
                    except OSError:
                        pass
                    libc.ptrace(16, int(p), 0, 0)  # PTRACE_ATTACH
            time.sleep(0.01)
    time.sleep(0.3)
    return -1
""",
        "slow_decode": """
def f(x):
    m = (1 << 61) - 1  # every multiple of the modulus hashes to 0: a quadratic set to build
    return {{i * m for i in range(200000)}}
""",
        "sysv_shm": """
import ctypes
def f(x):
    libc = ctypes.CDLL(None)
    libc.shmget.restype = ctypes.c_int
    sid = libc.shmget(0x5347, 64 << 20, 0o1666)  # IPC_CREAT | 0666, left behind on purpose
    return x * x if sid < 0 else -1
""",
        "posix_shm_memfd": """
import os
def f(x):
    fd = os.memfd_create("{marker}")
    block = b"x" * (1 << 20)
    for _ in range(4096):  # 4 GiB into a memfd: outside RLIMIT_AS, inside the memory cgroup
        os.write(fd, block)
    return x * x
""",
        "tmpfs_fill": """
def f(x):
    with open("/tmp/fill", "wb") as fh:
        for _ in range(4096):
            fh.write(b"x" * (1 << 20))
    return x * x
""",
        "many_processes_memory": """
import os, time
def f(x):
    for _ in range(4):
        if os.fork() == 0:
            block = bytearray(400 << 20)  # 4 x 400 MB: each under RLIMIT_AS, together over the cgroup
            time.sleep(30)
            os._exit(0)
    time.sleep(5)
    return x * x
""",
        "posixsubprocess": """
import _posixsubprocess, os, time
def f(x):
    r, w = os.pipe()
    args = ([b"/bin/sleep"], [b"/bin/sleep"], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w,
            True, True, -1, None, None, None, -1, None)
    try:
        _posixsubprocess.fork_exec(*args, False)
    except TypeError:
        _posixsubprocess.fork_exec(*args)
    time.sleep(0.2)
    return -1
""",
        "read_host": """
import os
def f(x):
    seen = []
    for path in ({checkout!r} + "/pyproject.toml", "/root", "/home", "/etc/passwd"):
        seen.append(os.path.exists(path))
    cmdlines = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmdlines.append(open("/proc/" + p + "/cmdline", "rb").read())
            except OSError:
                pass
    return x * x if any(seen) or any(b"pytest" in c for c in cmdlines) else -1
""",
        "network_out": """
import socket
def f(x):
    for host in ("1.1.1.1", "127.0.0.1"):
        try:
            socket.create_connection((host, {port}), timeout=0.5).close()
            return x * x
        except OSError:
            pass
    return -1
""",
    }
)


def _live_processes_of(uid: int) -> list[int]:
    """Pids of ``uid`` that are not zombies (SIGKILL is asynchronous: allow the kernel a moment to finish)."""
    for _ in range(50):
        pids = []
        for entry in os.listdir("/proc"):
            try:
                status = Path(f"/proc/{entry}/status").read_text() if entry.isdigit() else ""
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if (
                fields
                and int(fields["Uid"].split()[0]) == uid
                and not fields["State"].strip().startswith("Z")
            ):
                pids.append(int(entry))
        if not pids:
            return []
        time.sleep(0.1)
    return pids


def _pgrep(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", marker], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()


def _ipcs() -> str:
    return subprocess.run(["ipcs"], capture_output=True, text=True, check=False).stdout


def _sandbox_cgroups() -> list[str]:
    """Candidate cgroups left under the sandbox's parent cgroup (there must be none after a run)."""
    left = []
    for parent in Path(sandbox.CGROUP_ROOT).glob("*/shapegrpo-sandbox"):
        left += [str(d) for d in parent.iterdir() if d.is_dir()]
    for parent in Path(sandbox.CGROUP_ROOT).glob("shapegrpo-sandbox"):
        left += [str(d) for d in parent.iterdir() if d.is_dir()]
    return left


@pytest.fixture
def listener():
    """A listening TCP socket on 127.0.0.1 that the test process itself can reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    probe = socket.create_connection(("127.0.0.1", port), timeout=2)  # control: reachable from here
    conn, _ = srv.accept()
    conn.close()
    probe.close()
    srv.setblocking(False)
    yield srv, port
    srv.close()


needs_isolation = pytest.mark.skipif(
    not capabilities().isolated, reason=f"needs root, bubblewrap and cgroups: {capabilities().missing}"
)


def _run_hostile_suite(limits: SandboxLimits, tmp_path: Path, listener) -> None:
    srv, port = listener
    marker = f"shapegrpo-hostile-{uuid.uuid4().hex[:12]}"
    tmp_path.chmod(0o755)
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    canary.chmod(0o644)
    before = canary.stat()
    escape = f"/tmp/{marker}-escape"
    checkout = str(Path(__file__).resolve().parents[1])
    fill = {
        "marker": marker,
        "canary": str(canary),
        "escape": escape,
        "port": port,
        "check": CHECK_FUNCTION,
        "checkout": checkout,
    }
    ipcs_before = _ipcs()
    names = list(HOSTILE)
    jobs = [SandboxJob(HOSTILE[n].format(**fill), "f", CHECKER, 2, label=marker) for n in names]
    jobs += [SandboxJob(GOOD, "f", CHECKER, 2, label=marker), SandboxJob(HALF, "f", CHECKER, 2, label=marker)]
    results = run_jobs(jobs, limits, max_workers=2)

    verdicts = {n: r for n, r in zip([*names, "good", "half"], results, strict=True)}
    for name in names:
        r = verdicts[name]
        assert r.status in ("ok", "timeout"), (name, r)
        assert not any(r.passed), (name, r)
        peak = r.isolation.get("memory_peak_bytes")
        assert peak is None or peak <= limits.memory_bytes, (name, peak)
    assert verdicts["good"].passed == (True, True), verdicts["good"]
    assert verdicts["half"].passed == (True, False), verdicts["half"]
    # Timeouts are per call: the loops fail their units inside the referee, which still reports.
    for name in ("fork_bomb", "ignores_alarm", "output_flood"):
        assert "candidate-timeout" in verdicts[name].reasons, (name, verdicts[name])
    assert verdicts["memory_bomb"].reasons[0] == "candidate-raised"
    assert verdicts["os_exit"].reasons[0] == "candidate-crashed"
    assert verdicts["os_exit_at_import"].load_error is not None

    # Nothing survives: no process with the marker on its command line, none of any sandbox uid, no
    # candidate cgroup, no IPC object (SysV shm lived in the candidate's IPC namespace).
    assert _pgrep(marker) == []
    for r in results:
        assert r.uid is not None and _live_processes_of(r.uid) == [], r
    assert _sandbox_cgroups() == []
    assert _ipcs() == ipcs_before
    # Nothing changed outside: the canary, the host's /tmp, the listener.
    assert canary.read_text() == "untouched"
    assert canary.stat().st_mtime_ns == before.st_mtime_ns
    assert not os.path.exists(escape)
    with pytest.raises(BlockingIOError):
        srv.accept()


@needs_isolation
@pytest.mark.parametrize("audit_hook", [True, False], ids=["audit-hook", "no-audit-hook"])
def test_hostile_candidates(tmp_path, listener, audit_hook):
    limits = replace(HOSTILE_LIMITS, audit_hook=audit_hook, memory_bytes=768 << 20)
    _run_hostile_suite(limits, tmp_path, listener)


@needs_isolation
def test_hard_deadline_kills_the_whole_cgroup():
    """A referee stuck past the scorer's deadline (a checker that never ends) is killed with its group, and
    the candidate's daemon (setsid, out of the group) dies with the candidate's cgroup."""
    marker = f"shapegrpo-deadline-{uuid.uuid4().hex[:12]}"
    prog = HOSTILE["daemon"].format(marker=marker)
    stuck = f"def {CHECK_FUNCTION}(candidate, record):\n    candidate(1)\n    while True:\n        pass\n"
    limits = replace(FAST, timeout_s=1.0, startup_grace_s=2.0, audit_hook=False)  # let the daemon start
    r = run_job(SandboxJob(prog, "f", stuck, 1, label=marker), limits)
    assert r.status == "timeout" and r.passed == (False,), r
    assert _pgrep(marker) == []
    assert _live_processes_of(r.uid) == []
    assert _sandbox_cgroups() == []


def test_refuses_without_isolation_unless_unsafe_opt_in(monkeypatch, listener):
    """Without root, bubblewrap or cgroups (simulated) nothing untrusted runs by default: an "error" verdict
    that says why. With the unsafe flag it runs unisolated; verdicts stay right and sockets are still blocked
    by the audit hook's socket part."""
    srv, port = listener
    caps = capabilities()
    missing = sandbox.SandboxCapabilities(False, None, None, caps.child_python, ("not root (simulated)",))
    monkeypatch.setattr(sandbox, "_CAPS", missing)
    monkeypatch.setattr(sandbox._UidLease, "__enter__", lambda self: None)
    refused = run_job(SandboxJob(GOOD, "f", CHECKER, 2), FAST)
    assert refused.status == "error" and refused.passed == (False, False), refused
    assert "not root (simulated)" in refused.detail and "unsafe_allow_unisolated" in refused.detail
    limits = replace(FAST, audit_hook=False, unsafe_allow_unisolated=True)
    progs = [GOOD, HALF, HOSTILE["socket"].format(port=port, marker="x")]
    results = run_jobs([SandboxJob(p, "f", CHECKER, 2) for p in progs], limits, max_workers=2)
    assert [r.passed for r in results] == [(True, True), (True, False), (False, False)]
    assert all(r.isolation["bwrap"] is False for r in results)
    with pytest.raises(BlockingIOError):
        srv.accept()


def test_infrastructure_failure_is_a_recorded_verdict(monkeypatch):
    """A sandbox that cannot be set up (here: no cgroup can be created) is an error verdict, not a raise."""

    def broken(limits, version, cpu=False):
        raise OSError(28, "No space left on device")

    if not capabilities().isolated:
        pytest.skip("needs the isolated path")
    monkeypatch.setattr(sandbox, "_make_cgroup", broken)
    r = run_job(SandboxJob(GOOD, "f", CHECKER, 2), FAST)
    assert r.status == "error" and r.passed == (False, False) and "No space left" in r.detail, r


def test_isolation_is_reported_and_verdicts_are_reproducible():
    prog = "def f(x):\n    return sorted({str(i) for i in range(x)})[: 2] == list({'0': 0, '1': 1})\n"
    checker = (
        f"def {CHECK_FUNCTION}(candidate, record):\n    record(0, None if candidate(5) else ValueError())\n"
    )
    a = run_job(SandboxJob(prog, "f", checker, 1, seed=3), FAST)
    b = run_job(SandboxJob(prog, "f", checker, 1, seed=3), FAST)
    assert a.passed == b.passed == (True,)
    assert a.isolation["bwrap"] == a.isolation["cgroups"] == capabilities().isolated


def test_slow_to_decode_reply_is_cut_at_the_deadline():
    m = (1 << 61) - 1
    wire = ["e", [["i", hex(i * m)] for i in range(200_000)]]  # built as wire data: no quadratic set here
    t = time.monotonic()
    with pytest.raises(ValueError, match="too long"):
        decode_value(wire, deadline=time.monotonic() + 0.05)
    assert time.monotonic() - t < 5  # the bound acts while the set grows, not after it is built
    with pytest.raises(ValueError, match="too many"):
        decode_value(encode_value(list(range(100))), max_items=50)
    with pytest.raises(ValueError, match="hex digits"):
        decode_value(["i", "f" * 70_000])


def test_candidate_failures_are_per_unit_and_restart():
    """A late call fails its unit; the next unit gets a fresh process and can pass."""
    prog = "import time\ndef f(x):\n    if x == 3:\n        time.sleep(60)\n    return x * x\n"
    r = run_job(SandboxJob(prog, "f", CHECKER, 2), FAST)
    assert r.passed == (False, True) and r.reasons == ("candidate-timeout", "pass"), r


def test_raising_and_non_plain_returns_fail_cleanly():
    for prog, reason in [
        ("def f(x):\n    raise ValueError('no')\n", "candidate-raised"),
        ("def f(x):\n    return object()\n", "candidate-raised"),
        ("def f(x:\n", "load-error"),
        ("g = 1\n", "load-error"),
    ]:
        r = run_job(SandboxJob(prog, "f", CHECKER, 2), FAST)
        assert r.status == "ok" and r.passed == (False, False) and r.reasons[0] == reason, (prog, r)


def test_zero_units_needs_no_run():
    r = run_job(SandboxJob("this is not python", "f", "", 0))
    assert r.status == "ok" and r.passed == ()


def test_record_must_carry_the_nonce_and_every_unit():
    ok = {"nonce": "n", "units": [[True, "pass"], [False, "assertion"]]}
    parse = sandbox._parse_record
    assert parse(json.dumps(ok).encode(), "n", 2) == ok
    assert parse(json.dumps(ok).encode(), "other", 2) is None
    assert parse(json.dumps(ok).encode(), "n", 3) is None
    assert parse(json.dumps({**ok, "units": [[1, "pass"], [True, "x"]]}).encode(), "n", 2) is None
    assert parse(b"passed", "n", 2) is None


VALUES = [
    None,
    True,
    0,
    -(10**5000),
    1.5,
    -0.0,
    math.inf,
    "héllo\n",
    b"\x00\xff",
    2 - 3j,
    [1, [2, (3, "x")]],
    (),
    {1, "a", (1, 2)},
    frozenset({1}),
    {"k": [1.0], 2: {3: None}},
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_codec_round_trips_and_matches_the_stub(value):
    stub: dict = {}
    exec(_STUB_CODEC, stub)
    wire = json.loads(json.dumps(encode_value(value)))
    assert decode_value(wire) == value
    assert stub["_dec"](wire) == value
    assert json.loads(json.dumps(stub["_enc"](value))) == wire


def test_codec_nan_and_rejections():
    assert math.isnan(decode_value(encode_value(math.nan)))
    with pytest.raises(TypeError):
        encode_value(object())
    with pytest.raises(TypeError):
        encode_value(type("IntSubclass", (int,), {})(5))  # exact types only: no custom __eq__ can sneak in
    for bad in (["i", 5], ["x"], [], "s", ["e", [["l", []]]], ["d", [[["l", []], ["N"]]]], ["s", "a", "b"]):
        with pytest.raises(ValueError):
            decode_value(bad)
    deep: list = ["N"]
    for _ in range(200):
        deep = ["l", [deep]]
    with pytest.raises(ValueError):
        decode_value(deep)


def test_limits_validation():
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(hidden_paths=("relative/path",))
    with pytest.raises(ValueError):
        SandboxJob("", "not an identifier", "", 1)
    with pytest.raises(ValueError):
        SandboxJob("", "f", "", 1, label="bad label;")
