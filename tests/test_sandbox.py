"""The sandbox against hostile candidates (docs/sandbox.md): every attack ends as a failed unit or a timeout, no
process survives, nothing outside the sandbox changes, and honest candidates scored alongside keep their
verdicts. The suite runs under several isolation configurations, so that each layer is shown to hold alone."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
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

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="uid isolation needs the scorer to run as root")

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
    os.kill(os.getppid(), signal.SIGKILL)
    return x * x
""",
}


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


def _run_hostile_suite(limits: SandboxLimits, tmp_path: Path, listener) -> None:
    srv, port = listener
    marker = f"shapegrpo-hostile-{uuid.uuid4().hex[:12]}"
    tmp_path.chmod(0o755)
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    canary.chmod(0o644)
    before = canary.stat()
    escape = f"/tmp/{marker}-escape"
    fill = {"marker": marker, "canary": str(canary), "escape": escape, "port": port, "check": CHECK_FUNCTION}
    names = list(HOSTILE)
    jobs = [SandboxJob(HOSTILE[n].format(**fill), "f", CHECKER, 2, label=marker) for n in names]
    jobs += [SandboxJob(GOOD, "f", CHECKER, 2, label=marker), SandboxJob(HALF, "f", CHECKER, 2, label=marker)]
    results = run_jobs(jobs, limits, max_workers=2)

    verdicts = {n: r for n, r in zip([*names, "good", "half"], results, strict=True)}
    for name in names:
        r = verdicts[name]
        assert r.status in ("ok", "timeout"), (name, r)
        assert not any(r.passed), (name, r)
    assert verdicts["good"].passed == (True, True), verdicts["good"]
    assert verdicts["half"].passed == (True, False), verdicts["half"]
    # Timeouts are per call: the loops fail their units inside the referee, which still reports.
    for name in ("fork_bomb", "ignores_alarm", "output_flood"):
        assert "candidate-timeout" in verdicts[name].reasons, (name, verdicts[name])
    assert verdicts["memory_bomb"].reasons[0] == "candidate-raised"
    assert verdicts["os_exit"].reasons[0] == "candidate-crashed"
    assert verdicts["os_exit_at_import"].load_error is not None

    # Nothing survives: no process with the marker on its command line, none of any sandbox uid.
    assert _pgrep(marker) == []
    if capabilities().root:
        for r in results:
            assert r.uid is not None and _live_processes_of(r.uid) == [], r
    # Nothing changed outside: the canary, the host's /tmp (when the mount namespace hides it), the listener.
    assert canary.read_text() == "untouched"
    assert canary.stat().st_mtime_ns == before.st_mtime_ns
    if limits.isolate_mounts and capabilities().mountns:
        assert not os.path.exists(escape)
    elif os.path.exists(escape):
        os.unlink(escape)  # residual risk without a mount namespace (documented): world-writable /tmp
    with pytest.raises(BlockingIOError):
        srv.accept()


@needs_root
def test_hostile_candidates_all_layers(tmp_path, listener):
    _run_hostile_suite(HOSTILE_LIMITS, tmp_path, listener)


@needs_root
def test_hostile_candidates_os_layers_only(tmp_path, listener):
    """No Python audit hook, no mount namespace: uid, rlimits, network namespace and the kill sweep alone."""
    _run_hostile_suite(replace(HOSTILE_LIMITS, audit_hook=False, isolate_mounts=False), tmp_path, listener)


@needs_root
def test_socket_blocked_by_audit_hook_without_network_namespace(listener):
    srv, port = listener
    prog = HOSTILE["socket"].format(port=port, marker="x")
    limits = replace(FAST, isolate_network=False, audit_hook=False, isolate_mounts=False)
    r = run_job(SandboxJob(prog, "f", CHECKER, 2), limits)
    assert r.passed == (False, False) and r.reasons[0] == "candidate-raised", r
    assert r.isolation["netns"] is False
    with pytest.raises(BlockingIOError):
        srv.accept()


@needs_root
def test_hard_deadline_kills_the_whole_group_and_sweeps_the_uid():
    """A referee stuck past the scorer's deadline (here a checker that never ends) is killed with its process
    group, and processes that left the group (setsid) are swept by uid."""
    marker = f"shapegrpo-deadline-{uuid.uuid4().hex[:12]}"
    prog = HOSTILE["daemon"].format(marker=marker)
    stuck = f"def {CHECK_FUNCTION}(candidate, record):\n    candidate(1)\n    while True:\n        pass\n"
    limits = replace(FAST, timeout_s=1.0, startup_grace_s=2.0, audit_hook=False)  # let the daemon start
    r = run_job(SandboxJob(prog, "f", stuck, 1, label=marker), limits)
    assert r.status == "timeout" and r.passed == (False,), r
    assert _pgrep(marker) == []
    assert _live_processes_of(r.uid) == []


def test_degraded_mode_without_root_still_gives_verdicts(monkeypatch, listener):
    """The fallback when the scorer is not root (simulated): no uid switch and no namespaces. Verdicts stay
    right, sockets are blocked by the audit hook, and processes left in the group die with it."""
    srv, port = listener
    caps = capabilities()
    monkeypatch.setattr(sandbox, "_CAPS", sandbox.SandboxCapabilities(False, False, False, caps.child_python))
    monkeypatch.setattr(sandbox._UidLease, "__enter__", lambda self: None)
    marker = f"shapegrpo-degraded-{uuid.uuid4().hex[:12]}"
    daemon = (
        "import os\ndef f(x):\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep-{m}', '300'])\n"
    )
    daemon += "    return -1\n"
    limits = replace(FAST, audit_hook=False)
    progs = [GOOD, HALF, HOSTILE["socket"].format(port=port, marker=marker), daemon.format(m=marker)]
    results = run_jobs([SandboxJob(p, "f", CHECKER, 2, label=marker) for p in progs], limits, max_workers=2)
    assert [r.passed for r in results] == [(True, True), (True, False), (False, False), (False, False)]
    assert all(r.uid is None and r.isolation["netns"] is False for r in results)
    assert _pgrep(marker) == []
    with pytest.raises(BlockingIOError):
        srv.accept()


def test_isolation_is_reported_and_verdicts_are_reproducible():
    prog = "def f(x):\n    return sorted({str(i) for i in range(x)})[: 2] == list({'0': 0, '1': 1})\n"
    checker = (
        f"def {CHECK_FUNCTION}(candidate, record):\n    record(0, None if candidate(5) else ValueError())\n"
    )
    a = run_job(SandboxJob(prog, "f", checker, 1, seed=3), FAST)
    b = run_job(SandboxJob(prog, "f", checker, 1, seed=3), FAST)
    assert a.passed == b.passed == (True,)
    caps = capabilities()
    assert a.isolation["netns"] == caps.netns
    assert a.isolation["mountns"] == caps.mountns


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


@needs_root
def test_hidden_paths_are_unreadable():
    """A world-readable file outside the sandbox's private scratch dirs disappears when it (or its folder) is
    hidden. The file is made here rather than taken from the HumanEval package, because a checkout under /tmp
    (as CI may use) is already invisible behind the sandbox's private /tmp and the control would fail."""
    if not capabilities().mountns:
        pytest.skip("needs a mount namespace")
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run for a file outside the sandbox's scratch dirs")
    folder = Path(tempfile.mkdtemp(prefix="shapegrpo-hidden-", dir="/run"))
    try:
        folder.chmod(0o755)
        data = folder / "answers.bin"
        data.write_bytes(b"\x1f\x8bsecret")
        data.chmod(0o644)
        prog = f"def f(x):\n    return x * x if open({str(data)!r}, 'rb').read(2) == b'\\x1f\\x8b' else -1\n"
        visible = run_job(SandboxJob(prog, "f", CHECKER, 2), FAST)
        hidden = run_job(SandboxJob(prog, "f", CHECKER, 2), replace(FAST, hidden_paths=(str(folder),)))
        hidden_file = run_job(SandboxJob(prog, "f", CHECKER, 2), replace(FAST, hidden_paths=(str(data),)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert visible.passed == (True, True)  # the control: without hiding, the candidate can read it
    assert hidden.passed == (False, False) and hidden_file.passed == (False, False)


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
