"""Regenerate ``conveyor-worker.json``, the seccomp profile of worker containers.

Docker's and containerd's default profiles refuse ``clone``/``unshare`` with namespace flags,
``mount``, ``umount2``, ``pivot_root`` and ``setns`` unless the container holds CAP_SYS_ADMIN —
exactly what bubblewrap needs to build the sandbox of code steps as a non-root user
in a user namespace. This profile allows those without any capability and refuses, with EPERM,
the syscalls a workflow worker never needs and that have a record of container escapes or
kernel exploits (modules, kexec, bpf, perf, keyrings, io_uring, ptrace, handles, clocks …).
Every other syscall of the x86_64 and generic (aarch64) tables of the kernel headers is
allowed; a syscall newer than those headers gets ENOSYS, so libc falls back to an older one.

Run ``python configs/seccomp/generate.py`` on a machine with linux-libc-dev to refresh it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HEADERS = (
    Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    Path("/usr/include/asm-generic/unistd.h"),
)

#: Needed by bubblewrap and the fork-server (namespaces, private mounts, pid namespaces).
SANDBOX = (
    "clone",
    "clone3",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "sethostname",
    "setdomainname",
    "capget",
    "capset",
    "prctl",
    "seccomp",
)

#: Refused with EPERM: never needed by a worker, and the usual way out of a container.
DENIED = (
    # kernel modules, kexec, reboot
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    # tracing and kernel programs
    "bpf",
    "perf_event_open",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "lookup_dcookie",
    "userfaultfd",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # keyrings are not namespaced
    "add_key",
    "request_key",
    "keyctl",
    # file handles bypass the mount namespace ("shocker")
    "open_by_handle_at",
    "name_to_handle_at",
    # host-wide state
    "acct",
    "swapon",
    "swapoff",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "vhangup",
    "iopl",
    "ioperm",
    "migrate_pages",
    "move_pages",
    # obsolete or unimplemented
    "sysfs",
    "_sysctl",
    "uselib",
    "ustat",
    "tuxcall",
    "security",
    "afs_syscall",
    "putpmsg",
    "getpmsg",
    "vserver",
)


def syscall_names() -> set[str]:
    """Every syscall name of the x86_64 and generic tables."""
    names: set[str] = set()
    for header in HEADERS:
        for name in re.findall(r"#define __NR(?:3264)?_(\w+)\s", header.read_text()):
            names.add(name)
    names -= {"syscalls", "arch_specific_syscall"}
    return names


def profile() -> dict[str, object]:
    names = syscall_names() | set(SANDBOX)
    allowed = sorted(names - set(DENIED))
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [
            {
                "names": allowed,
                "action": "SCMP_ACT_ALLOW",
                "comment": "all syscalls of the kernel tables except the denied ones",
            },
            {
                "names": sorted(DENIED),
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 1,
                "comment": "never needed by a worker; refused with EPERM",
            },
        ],
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("conveyor-worker.json")
    out.write_text(json.dumps(profile(), indent=2) + "\n")
    print(f"wrote {out}")
