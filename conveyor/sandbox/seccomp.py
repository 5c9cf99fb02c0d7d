"""A seccomp filter for step processes: the kernel interfaces user code never needs.

Namespaces, mounts and the fork-server's other tools are for the sandbox, not for a step:
once a child is locked down it may not create user (or any other) namespaces, mount, use
keyrings, bpf, perf, userfaultfd, io_uring, ptrace, kexec or kernel modules, and it may not
``clone(CLONE_PARENT)`` a process out of its own tree. Everything else is allowed, so the
standard library, threads, ``fork`` and ``subprocess`` keep working; ``clone3`` answers
``ENOSYS`` so glibc falls back to ``clone``, whose flags the filter can inspect.

The classic-BPF program is built here with ctypes (no libseccomp): it checks the
architecture first (a foreign one, or an x32 syscall number, is refused), then the syscall
number, then ``clone``'s flags. It needs ``PR_SET_NO_NEW_PRIVS``, which the lock-down sets.
"""

from __future__ import annotations

import ctypes
import errno
import platform
from typing import Any

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_LD_ABS_W = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16

_CLONE_NEWNS = 0x00020000
_CLONE_PARENT = 0x00008000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_CLONE_FORBIDDEN = (
    _CLONE_NEWNS
    | _CLONE_PARENT
    | _CLONE_NEWCGROUP
    | _CLONE_NEWUTS
    | _CLONE_NEWIPC
    | _CLONE_NEWUSER
    | _CLONE_NEWPID
    | _CLONE_NEWNET
)

# Syscall numbers per architecture: (audit arch, clone, clone3, denied…)
_DENIED_NAMES = (
    "mount", "umount2", "pivot_root", "unshare", "setns", "ptrace", "keyctl", "add_key",
    "request_key", "bpf", "userfaultfd", "perf_event_open", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "open_by_handle_at", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "mount_setattr",
)  # fmt: skip
_TABLES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,
        {
            "clone": 56, "clone3": 435, "mount": 165, "umount2": 166, "pivot_root": 155,
            "unshare": 272, "setns": 308, "ptrace": 101, "keyctl": 250, "add_key": 248,
            "request_key": 249, "bpf": 321, "userfaultfd": 323, "perf_event_open": 298,
            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
            "finit_module": 313, "delete_module": 176, "open_by_handle_at": 304,
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
            "fsmount": 432, "mount_setattr": 442,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "clone": 220, "clone3": 435, "mount": 40, "umount2": 39, "pivot_root": 41,
            "unshare": 97, "setns": 268, "ptrace": 117, "keyctl": 219, "add_key": 217,
            "request_key": 218, "bpf": 280, "userfaultfd": 282, "perf_event_open": 241,
            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
            "finit_module": 273, "delete_module": 106, "open_by_handle_at": 265,
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
            "fsmount": 432, "mount_setattr": 442,
        },
    ),
}  # fmt: skip
#: x86_64's x32 ABI marks syscall numbers with this bit; a step must not use it to dodge.
_X32_BIT = 0x40000000


class _Insn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    )


class _Prog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn)))


def supported() -> bool:
    """Whether this machine's architecture has a syscall table here."""
    return platform.machine() in _TABLES


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as ``(code, jt, jf, k)`` instructions for ``machine`` (default: this one)."""
    arch, nrs = _TABLES[machine or platform.machine()]
    deny_perm = _RET_ERRNO | errno.EPERM
    denied = [nrs[name] for name in _DENIED_NAMES]
    insns: list[tuple[int, int, int, int]] = [
        (_LD_ABS_W, 0, 0, _ARCH),
        (_JEQ, 1, 0, arch),  # our architecture: go on; else refuse
        (_RET, 0, 0, deny_perm),
        (_LD_ABS_W, 0, 0, _NR),
        (_JGE, 0, 1, _X32_BIT),
        (_RET, 0, 0, deny_perm),
        (_JEQ, 0, 1, nrs["clone3"]),
        (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),  # glibc falls back to clone(2)
        (_JEQ, 0, 3, nrs["clone"]),
        (_LD_ABS_W, 0, 0, _ARG0_LOW),
        (_JSET, 0, 1, _CLONE_FORBIDDEN),
        (_RET, 0, 0, deny_perm),
    ]
    # After the clone check the accumulator may hold clone's flags: reload the number.
    insns.append((_LD_ABS_W, 0, 0, _NR))
    for nr in denied:
        insns.append((_JEQ, 0, 1, nr))
        insns.append((_RET, 0, 0, deny_perm))
    insns.append((_RET, 0, 0, _RET_ALLOW))
    return insns


def _compile() -> tuple[Any, Any] | None:
    if not supported():
        return None
    insns = program()
    array = (_Insn * len(insns))(*(_Insn(*i) for i in insns))
    return array, _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Insn)))


# Built once, in the fork-server (which imports this module before it forks): a fresh child
# then only makes the two prctl calls.
_COMPILED = _compile()
_LIBC = ctypes.CDLL(None, use_errno=True)


def install() -> bool:
    """Apply the filter to the calling process (and everything it starts); False when this
    architecture has no table (the caller carries on without it)."""
    if _COMPILED is None:
        return False
    if _LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    prog = ctypes.byref(_COMPILED[1])
    if _LIBC.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, prog, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP failed")
    return True
