"""The OS sandbox a worker enters before any agent code runs (the security boundary).

Used by `sandbox_worker.py` (standard library only, like it: it runs inside the worker process):

1. new mount, network, PID, IPC and UTS namespaces (a user namespace too when not root): no
   network at all (an empty network namespace), no other process visible;
2. a new root file system: an empty read-only tmpfs holding only the Python standard library,
   bind-mounted read-only at /python (site-packages hidden under an empty mount). Nothing of the
   project, the home directories, /etc, /proc, /dev or /tmp; nothing writable; nothing that
   persists past the worker;
3. a fork: the agent's process is PID 1 of the new PID namespace, killed when its parent goes;
4. its own uid/gid (SANDBOX_UID_BASE + its host pid, no groups) when started as root, otherwise
   every capability dropped; no_new_privs;
5. rlimits: RLIMIT_AS (memory), RLIMIT_CPU (per cell, see `sandbox_worker.run_cell`),
   RLIMIT_FSIZE = 0, RLIMIT_NOFILE = its open fds + 32, RLIMIT_CORE = 0, RLIMIT_NPROC = 0;
6. a seccomp filter (libseccomp through ctypes) that fails with EPERM: execve, process and thread
   creation, sockets, ptrace and cross-process memory access, every signal-sending call, new
   namespaces and mounts, opening files for writing and every call that changes a file system,
   keyrings, bpf, perf, io_uring, module loading, uid changes.

Every step that fails raises `SandboxUnavailable` (or OSError); the worker then refuses to run
anything.
"""
import ctypes
import errno
import os
import resource
import sys

SANDBOX_UID_BASE = 3_000_000_000  # worker uid = this + its host pid (unique while it lives)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 38, 24
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ, SCMP_CMP_EQ = 7, 4
ROOT = "/tmp"  # where the new root is built (a mount point in the worker's own mount namespace)

# Syscalls the filter fails with EPERM (names unknown on this architecture are skipped).
DENIED_SYSCALLS = (
    # programs, processes, threads
    "execve execveat fork vfork clone clone3 "
    # network and IPC endpoints
    "socket socketpair connect bind listen accept accept4 "
    # other processes: debugging, memory, signals, sessions
    "ptrace process_vm_readv process_vm_writev kcmp kill tkill tgkill rt_sigqueueinfo "
    "rt_tgsigqueueinfo pidfd_open pidfd_send_signal pidfd_getfd setsid setpgid "
    # namespaces, mounts, root
    "setns unshare mount umount2 pivot_root chroot move_mount open_tree fsopen fsmount fsconfig "
    "fspick mount_setattr open_by_handle_at name_to_handle_at memfd_secret "
    # the kernel's other doors
    "keyctl add_key request_key bpf perf_event_open userfaultfd io_uring_setup io_uring_enter "
    "io_uring_register kexec_load kexec_file_load init_module finit_module delete_module reboot "
    "swapon swapoff acct quotactl syslog vhangup sethostname setdomainname iopl ioperm "
    "modify_ldt personality uselib "
    # credentials
    "setuid setgid setreuid setregid setresuid setresgid setgroups setfsuid setfsgid capset "
    "msgget semget shmget mq_open").split()
# File system changes and files opened for writing: denied too unless the sandbox's own mount view
# is what confines them (`build_seccomp(file_changes=True)`: AppWorld's worker writes its outputs
# to a tmpfs of its own).
FILE_CHANGE_SYSCALLS = (
    "creat openat2 mknod mknodat chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat "
    "unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir symlink symlinkat link linkat "
    "truncate ftruncate fallocate utime utimes utimensat futimesat setxattr lsetxattr fsetxattr "
    "removexattr lremovexattr fremovexattr memfd_create inotify_init inotify_init1 "
    "fanotify_init").split()
# Open flags that write or create: open/openat with any of them fail.
WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND,
               getattr(os, "O_TMPFILE", 0) & ~getattr(os, "O_DIRECTORY", 0))
TIOCSTI = 0x5412


class SandboxUnavailable(Exception):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise SandboxUnavailable(f"{what} failed: {os.strerror(err)} (errno {err})")


def mount(libc, src, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
           f"mount {src or fstype} on {target}")


def _write(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def stdlib_dirs():
    """The standard library's directories (source and extension modules), outermost first."""
    std = os.path.dirname(os.__file__)
    dyn = os.path.dirname(getattr(sys.modules.get("_ctypes"), "__file__", "") or "") or \
        os.path.join(std, "lib-dynload")
    return std, dyn


def unshare(libc, user_namespace=False) -> bool:
    """New mount (private), network, PID, IPC and UTS namespaces; returns whether they were
    made as root (else inside a new user namespace mapping this uid only)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    privileged = not user_namespace and os.geteuid() == 0 and libc.unshare(flags) == 0
    if not privileged:  # an unprivileged user namespace gives the rights to set the rest up
        uid, gid = os.geteuid(), os.getegid()
        check(libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespaces)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    return privileged


def pivot(libc, new_root: str) -> None:
    """Makes the mount `new_root` the root and detaches the old one."""
    os.mkdir(new_root + "/old")
    check(libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), (new_root + "/old").encode()),
           "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/old", MNT_DETACH), "umount of the old root")
    os.rmdir("/old")


def enter_namespaces(libc, user_namespace=False):
    """Unshare the namespaces and pivot into the minimal read-only root. Runs before the fork.

    As root the namespaces are made directly; otherwise (or with user_namespace) inside a new
    user namespace."""
    std, dyn = stdlib_dirs()
    privileged = unshare(libc, user_namespace)
    mount(libc, "tmpfs", ROOT, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16k,mode=0755")
    os.mkdir(ROOT + "/python")
    bind_ro(libc, std, ROOT + "/python")
    if os.path.isdir(ROOT + "/python/site-packages"):  # third-party packages are not offered
        mount(libc, "tmpfs", ROOT + "/python/site-packages", "tmpfs",
               MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k")
    if not dyn.startswith(std + os.sep):
        os.mkdir(ROOT + "/python-dynload")
        bind_ro(libc, dyn, ROOT + "/python-dynload")
        dyn_inside = "/python-dynload"
    else:
        dyn_inside = "/python" + dyn[len(std):]
    pivot(libc, ROOT)
    mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
           | MS_NOEXEC)
    sys.path[:] = ["/python", dyn_inside]
    sys.path_importer_cache.clear()
    return privileged


_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203,
                   "s390x": 217}.get(os.uname().machine, -1)


def bind_ro(libc, src, target):
    mount(libc, src, target, None, MS_BIND | MS_REC)
    st = os.statvfs(src)
    locked = (MS_NOSUID if st.f_flag & os.ST_NOSUID else 0) | \
        (MS_NODEV if st.f_flag & os.ST_NODEV else 0) | \
        (MS_NOEXEC if st.f_flag & os.ST_NOEXEC else 0)
    mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
           | locked)


def drop_privileges(libc, privileged, host_pid):
    """In the forked child: its own uid (when root) or no capabilities; never regain any."""
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if privileged:
        uid = SANDBOX_UID_BASE + host_pid
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to non-root: every capability is dropped
    else:
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (ctypes.c_uint32 * 6)()
        check(libc.syscall(_SYS_CAPSET, header, data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184,
               "s390x": 185}.get(os.uname().machine, -1)


def build_seccomp(file_changes: bool = False, threads: bool = False):
    """The syscall filter (see the module docstring), built (not loaded): `load()` loads it.
    `file_changes`: allow writing and changing files (the mount view must confine them).
    `threads`: allow clone with CLONE_THREAD (a thread of this process, never a new process);
    clone3, whose flags a filter cannot read, then fails with ENOSYS, so libc falls back to clone.

    Built before the new root hides the host's libseccomp; fails if libseccomp is missing."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as e:
        raise SandboxUnavailable(f"libseccomp is not installed ({e}); on Debian/Ubuntu: "
                                 "apt-get install libseccomp2") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SandboxUnavailable("seccomp_init failed")
    eperm = 0x00050000 | errno.EPERM  # SCMP_ACT_ERRNO(EPERM)

    def rule(name, *cmps, action=eperm):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return
        arr = (_ArgCmp * max(len(cmps), 1))(*cmps)
        ret = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if ret != 0:
            raise SandboxUnavailable(f"seccomp rule for {name} failed ({ret})")

    for name in DENIED_SYSCALLS + ([] if file_changes else FILE_CHANGE_SYSCALLS):
        if not (threads and name in ("clone", "clone3")):
            rule(name)
    if threads:
        rule("clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))
        rule("clone3", action=0x00050000 | errno.ENOSYS)
    for flag in () if file_changes else WRITE_FLAGS:
        if flag:
            rule("open", _ArgCmp(1, SCMP_CMP_MASKED_EQ, flag, flag))
            rule("openat", _ArgCmp(2, SCMP_CMP_MASKED_EQ, flag, flag))
    rule("ioctl", _ArgCmp(1, SCMP_CMP_EQ, TIOCSTI, 0))

    def load():
        if lib.seccomp_load(ctx) != 0:
            raise SandboxUnavailable("seccomp_load failed")
        lib.seccomp_release(ctx)
    return load


def set_rlimits(limits, top_fd):
    mem = int(limits["memory_mb"]) * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (int(limits["cpu_total_s"]),) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top_fd, top_fd))


def enter_os_sandbox(limits, rfd, wfd, refuse):
    """Namespaces, new root, fork, own uid, rlimits, seccomp. Returns in the sandboxed child only.

    The parent stays outside the new PID namespace and only waits for the child (whose exit
    status it passes on), so the trainer's process-group kill reaches both. `refuse(reason)`
    tells the trainer why the child could not finish the sandbox, and exits.
    """
    libc = _libc()
    load_seccomp = build_seccomp()
    privileged = enter_namespaces(libc, bool(limits.get("user_namespace")))
    host_pid = os.getpid()
    pid = os.fork()
    if pid:  # the parent: nothing of the agent's runs here
        os.close(rfd)
        os.close(wfd)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    try:  # the uid is derived from the parent's host pid: unique while the worker lives
        drop_privileges(libc, privileged, host_pid)
        set_rlimits(limits, max(rfd, wfd) + 33)  # room to read the (read-only) standard library
        load_seccomp()
    except SandboxUnavailable as e:
        refuse(str(e))
