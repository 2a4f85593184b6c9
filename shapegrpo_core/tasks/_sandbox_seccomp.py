"""The seccomp filter of the sandbox's candidate (bubblewrap loads it by ``--seccomp FD``; docs/sandbox.md).

Default: allow. Denied calls return an errno (EPERM; ENOSYS for ``clone3``) instead of killing the process, so
a candidate that tries one fails the way any failed call fails -- its unit fails, nothing crashes. The list
covers the kernel interfaces a candidate never needs and a kernel exploit or a sandbox escape usually starts
from: debugging other processes, nested namespaces, mounts, the key store, BPF, perf, execution domains,
userfaultfd, module loading, raw I/O ports and the like. Every other call (files, memory, fork, threads, exec,
pipes) stays allowed: the namespaces, the cgroup and the rlimits bound what they can do.

The program is compiled by libseccomp (through the ``pyseccomp`` ctypes binding) once per process and kept as
bytes; the referee hands it to bwrap through a memfd for every candidate start.
"""

from __future__ import annotations

import errno
import functools
import tempfile

# Denied with EPERM, unconditionally. libseccomp must know every one of these names.
DENIED_SYSCALLS: tuple[str, ...] = (
    # other processes' memory and control (a survivor attaching to a sibling, reading the referee's pipes)
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    # nested namespaces (clone with namespace flags is handled below)
    "unshare",
    "setns",
    # the filesystem view
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_by_handle_at",
    # kernel key store, BPF, perf, userfaultfd: large, exploit-prone kernel surfaces
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    # the machine itself
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "iopl",
    "ioperm",
    "acct",
    "quotactl",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
)
# Also denied where the installed libseccomp knows them (newer calls: the new mount API, io_uring).
DENIED_IF_KNOWN: tuple[str, ...] = (
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
# clone() with any of these flags (one rule per flag: a masked compare cannot test "any bit of a set").
CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
# personality() is allowed only as the query personality(0xffffffff); the interpreter never sets it, and
# READ_IMPLIES_EXEC / ADDR_NO_RANDOMIZE / MMAP_PAGE_ZERO are exploit helpers.
PERSONALITY_QUERY = 0xFFFFFFFF


class SeccompUnavailable(RuntimeError):
    """libseccomp or its binding is missing, or it cannot build the filter: the sandbox is not isolated."""


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes:
    """The candidate's seccomp filter as a compiled BPF program (``struct sock_filter`` array, what bwrap's
    ``--seccomp`` reads). Built once per process. Raises :class:`SeccompUnavailable`."""
    try:
        import pyseccomp as sc  # ctypes over libseccomp.so.2; raises RuntimeError when the library is absent
    except (ImportError, RuntimeError, OSError) as e:
        raise SeccompUnavailable(f"libseccomp unavailable ({type(e).__name__}: {e})") from e
    try:
        return _build(sc)
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp cannot build the filter: {e}") from e


def _build(sc) -> bytes:  # sc: the pyseccomp module
    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    native = sc.system_arch()
    # The other ABIs the kernel may accept from a native process get the same rules (an i386 `int 0x80` or an
    # x32 call would otherwise be a way around them); any other architecture is denied outright.
    extra = {sc.Arch.X86_64: (sc.Arch.X86, sc.Arch.X32), sc.Arch.AARCH64: (sc.Arch.ARM,)}.get(native, ())
    for arch in extra:
        f.add_arch(arch)
    f.set_attr(sc.Attr.ACT_BADARCH, eperm)
    for name in DENIED_SYSCALLS:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) == -1:  # __NR_SCMP_ERROR: a name libseccomp lacks
            raise OSError(errno.EINVAL, f"libseccomp does not know syscall {name!r}")
        f.add_rule(eperm, name)
    for name in DENIED_IF_KNOWN:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) != -1:
            f.add_rule(eperm, name)
    # clone's flags are its first argument except on s390, where the stack comes first.
    flags_arg = 1 if native in (sc.Arch.S390, sc.Arch.S390X) else 0
    for flag in CLONE_NAMESPACE_FLAGS.values():
        f.add_rule(eperm, "clone", sc.Arg(flags_arg, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes glibc fall back to clone(),
    # whose flags the rules above do see.
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(eperm, "personality", sc.Arg(0, sc.NE, PERSONALITY_QUERY))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)  # libseccomp writes to the descriptor itself, past Python's buffer
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:  # sock_filter entries are 8 bytes
        raise OSError(errno.EINVAL, f"libseccomp exported {len(program)} bytes, not a BPF program")
    return program
