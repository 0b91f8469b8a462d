"""The program the python sandbox executes: set up isolation, drop privileges, run the user's code.

Standard library only (it must not import appo_jax). Two ways in, both by `appo_jax.tools.python_sandbox`:

* ``python -I -u -B sandbox_runner.py --serve FD`` (launcher "zygote", the default): the process server of one
  sandbox slot (`serve`); per call it forks the runner R, which makes itself what the other way starts (own
  session, the call's pipes as stdout / stderr, no other descriptor, the call's directory and environment).
* ``python -I -u -B sandbox_runner.py CONFIG_JSON`` (launcher "spawn"): R is a fresh interpreter.

R runs with the user's code in the file ``code_path`` and, when the sandbox's process is root, as root. Any
failure before the user's code starts exits with `SETUP_FAILED` and one ``[sandbox setup failed]`` line on
stderr. The cell's process ends through `_exit_after_cell` (threads joined, atexit handlers, flush, no teardown).

Level "full" (``cfg["namespaces"]``; the parent is root):

1. The runner R reads and deletes the code file, forbids core dumps, enters new mount, network and PID
   namespaces (``unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)``: no network at all, not even loopback),
   forks the cell process C and then only waits for it, exiting with C's exit status (or dying by C's signal).
2. C is PID 1 of the new PID namespace: when it ends — normally, by an exception, or killed — the kernel kills
   and reaps every process it started, wherever they moved (``setsid`` included). C (still root) makes mounts
   private, covers directories the sandbox uid cannot traverse but the interpreter needs (e.g. a Python under
   ``/root``) with an empty tmpfs holding only the needed paths bound back in (hiding the rest), mounts a fresh
   ``/proc`` (only the namespace's processes are visible), mounts a private tmpfs of ``disk_mb`` MiB on the run
   directory (bounded disk use, gone with the namespace), makes everything else read-only and nosuid
   (``mount_setattr``, recursive), sets the resource limits (RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE,
   RLIMIT_NPROC, RLIMIT_NOFILE), drops to the run's own uid/gid (``setgroups([])``, real = effective = saved),
   sets ``PR_SET_NO_NEW_PRIVS`` and a parent-death SIGKILL, and runs the cell.

Levels "user" and "basic": the runner sets the resource limits, drops to ``cfg["uid"]`` ("user": not None) as
above, and runs the cell itself.

At every level the ``socket`` module refuses internet sockets (a second line behind the network namespace;
otherwise the only one), the working directory is the run directory, and the cell runs like a notebook cell:
its statements are executed and, if the last statement is an expression, its ``repr`` is printed unless it is
None. An exception prints a traceback of the user's frames only (exit status 1); ``sys.exit(n)`` exits with n.
"""
import ast
import atexit
import ctypes
import ctypes.util
import functools
import json
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback

SETUP_FAILED = 121
FILENAME = "<python>"

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and the generic table (aarch64, riscv)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


@functools.lru_cache(maxsize=None)
def _libc():
    """libc (resolved once: ``find_library`` runs ``ldconfig``; forked runners inherit the server's handle)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(text):
    return None if text is None else os.fsencode(text)


def _mount(libc, source, target, fstype, flags, data=None):
    _check(libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)), f"mount {target}")


def _mount_setattr(libc, path, recursive, attr_set=0, attr_clr=0):
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_uint(flags),
        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, f"mount_setattr {path}")


def _needed_paths():
    """Directories the interpreter reads after privileges are dropped: prefixes and import paths."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in sys.path if p)
    out = set()
    for p in paths:
        real = os.path.realpath(p)
        if os.path.isdir(real):
            out.add(real)
    return sorted(out)


def _blocked_ancestor(path):
    """The top-most strict ancestor of `path` that others cannot traverse, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & stat.S_IXOTH:
            return anc
    return None


def _isolate_filesystem(libc, cfg):
    """In C (root, new mount + PID namespaces): the file-system view described in the module docstring."""
    run_dir = cfg["run_dir"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    covers = {}
    for p in _needed_paths():
        anc = _blocked_ancestor(p)
        if anc is not None:
            covers.setdefault(anc, []).append(p)
    for anc, inner in sorted(covers.items()):
        inner = [p for p in inner if not any(p != q and p.startswith(q + "/") for q in inner)]
        fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in inner]
        _mount(libc, "tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for p, fd in fds:
            os.makedirs(p, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            os.close(fd)
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(libc, "tmpfs", run_dir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,mode=0700,uid={cfg['uid']},gid={cfg['gid']}")
    _mount_setattr(libc, "/", True, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    _mount_setattr(libc, run_dir, False, attr_clr=MOUNT_ATTR_RDONLY)


def _set_limits(cfg):
    mb = 1024 * 1024
    limits = [
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, cfg["file_size_mb"] * mb),
        (resource.RLIMIT_NPROC, cfg["max_processes"]),
        (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
    ]
    for res, value in limits:
        resource.setrlimit(res, (value, value))
    cpu = cfg["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _drop_privileges(libc, uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getuid() == 0:
        raise OSError(f"privilege drop to uid {uid} did not take effect")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _block_internet_sockets():
    import socket

    blocked = {socket.AF_INET, socket.AF_INET6}

    class NoNetworkSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and (family == -1 or family in blocked):
                raise PermissionError("network access is disabled in the python sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = NoNetworkSocket


def _print_user_traceback(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != FILENAME:
        tb = tb.tb_next
    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))


def _run_cell(code):
    import linecache

    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, filename=FILENAME, mode="exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, FILENAME, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, FILENAME, "eval"), namespace)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except SyntaxError as exc:
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        return 1
    except BaseException as exc:  # noqa: BLE001 - the user's exception is the result
        _print_user_traceback(exc)
        return 1
    return 0


def _setup_failed(exc):
    sys.stderr.write(f"[sandbox setup failed] {type(exc).__name__}: {exc}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


def _cell(cfg, code, libc):
    """Prepare this process (C at level "full", the runner itself otherwise) and run the cell."""
    try:
        if cfg["namespaces"]:
            _isolate_filesystem(libc, cfg)
        _set_limits(cfg)
        if cfg["uid"] is not None:
            _drop_privileges(libc, cfg["uid"], cfg["gid"])
        os.chdir(cfg["run_dir"])
        _block_internet_sockets()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a setup failure
        _setup_failed(exc)
    sys.argv = [FILENAME]
    try:
        status = _run_cell(code)
    except SystemExit as exc:
        status = exc.code
    _exit_after_cell(status)


def _exit_after_cell(code):
    """End the cell's process as the interpreter would after ``sys.exit(code)`` — non-daemon threads joined, atexit
    handlers run, output flushed; status 0 for None, ``code & 0xFF`` for an int, else ``code`` printed to stderr
    and 1 — but without tearing the interpreter down (``os._exit``): in a runner forked from the process server
    the teardown would write, and so copy, nearly every page it shares with the server (~10 ms a call). Objects
    still alive are not finalized, which Python never promises at exit either."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException as exc:  # noqa: BLE001 - as the interpreter: reported, and the exit goes on
        traceback.print_exception(exc)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed stream has nothing left to flush
            pass
    os._exit(status)


def _wait_and_mirror(pid):
    """R: wait for C and end the same way (its exit status, or death by the same signal)."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


def run(cfg):
    """The runner R for one call (``cfg``: the JSON object `PythonSandbox` builds); never returns."""
    pid = 0
    try:
        with open(cfg["code_path"], encoding="utf-8") as f:
            code = f.read()
        os.unlink(cfg["code_path"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        libc = _libc()
        if cfg["namespaces"]:
            _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare(NEWNS | NEWNET | NEWPID)")
            pid = os.fork()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a setup failure
        _setup_failed(exc)
    if pid:
        _wait_and_mirror(pid)
    _cell(cfg, code, libc)


# -- the process server ("zygote" launcher) ----------------------------------------------------------------------


def _send(sock, message):
    sock.send(json.dumps(message).encode())


def _start_runner(sock, request, fds):
    """In the forked child: become a runner started like a fresh ``python -I -u -B sandbox_runner.py CONFIG`` —
    own session, stdin /dev/null, stdout / stderr the two pipes of the request, no other descriptor (the server's
    socket included), the request's working directory and environment — and run. An exception here ends the child
    with `SETUP_FAILED`."""
    try:
        sock.detach()  # closed below with every other descriptor; its object must not close a reused number
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
    except BaseException as exc:  # noqa: BLE001 - stderr may be unset: the exit status still says it
        _setup_failed(exc)
    run(request["cfg"])


def _finish(pid, pidfd, uid):
    """After the run (or on its timeout): SIGKILL every process of ``uid`` (a child that becomes that uid and calls
    ``kill(-1)``; at level "full" that kills the cell, PID 1 of its namespace, and the runner then exits by
    itself), then the runner's process group, then reap the runner. Returns its exit code (``-signal`` when a
    signal ended it)."""
    if uid is not None:
        killer = os.fork()
        if killer == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            except OSError:  # ESRCH: nothing of that uid is left
                pass
            os._exit(0)
        os.waitpid(killer, 0)
        deadline = time.monotonic() + 1.0  # at "full" the runner ends with its cell: let it, as a spawned one would
        while not _has_exited(pid) and time.monotonic() < deadline:
            select.select([] if pidfd is None else [pidfd], [], [], 0.002 if pidfd is None else 1.0)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def serve(sock_fd):
    """The process server of one sandbox slot (``--serve FD``; FD a SOCK_SEQPACKET socket to the sandbox).

    Per request — a JSON object ``{"cfg", "env", "cwd"}`` with the write ends of the run's stdout and stderr
    pipes attached (SCM_RIGHTS) — it forks a runner (`_start_runner`), answers ``{"pid"}`` (or ``{"error"}``),
    sends ``{"exited": true}`` once the runner has exited (left unreaped, so that its pid and process-group id
    cannot be reused), and on ``{"finish": uid}`` kills and reaps (`_finish`) and answers ``{"status"}``. One
    request at a time; it exits when the sandbox closes the socket, which its process's death does too (then it
    kills the run first; no parent-death signal: that follows the thread that started the server). A fork of
    this small, already started interpreter replaces a fresh interpreter per call: the runner and the cell start
    in about a millisecond instead of tens."""
    import socket

    sock = socket.socket(fileno=sock_fd)
    _libc()  # resolved here once, not in every runner
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
        if not data:
            os._exit(0)
        request = json.loads(data)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"error": f"fork: {exc}"})
            continue
        if pid == 0:
            try:
                _start_runner(sock, request, fds)  # ends the process itself (os._exit)
            finally:
                os._exit(SETUP_FAILED)  # never back into the server loop
        for fd in fds:
            os.close(fd)
        _send(sock, {"pid": pid})
        _supervise(sock, pid, request["cfg"]["uid"])


def _has_exited(pid):
    """Whether the child ``pid`` has exited, leaving it unreaped."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _pidfd(pid):
    """A pidfd of ``pid`` (readable once it exits), or None where the kernel has none (Linux < 5.3, some
    sandboxed kernels): then `_supervise` polls."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _supervise(sock, pid, uid):
    """Until the sandbox's ``{"finish": uid}``: say ``{"exited": true}`` once the runner has exited; then kill,
    reap and answer ``{"status"}``. The sandbox closing the socket (its process died) ends the run's processes
    (those of ``uid`` too) and the server."""
    pidfd = _pidfd(pid)
    watching = [sock] if pidfd is None else [sock, pidfd]
    exited = False
    while True:
        ready, _, _ = select.select(watching, [], [], None if pidfd is not None or exited else 0.01)
        if not exited and (pidfd in ready if pidfd is not None else _has_exited(pid)):
            exited, watching = True, [sock]
            _send(sock, {"exited": True})
        if sock in ready:
            data = sock.recv(1 << 16)
            if not data:
                _finish(pid, pidfd, uid)
                os._exit(0)
            _send(sock, {"status": _finish(pid, pidfd, json.loads(data)["finish"])})
            if pidfd is not None:
                os.close(pidfd)
            return


def main():
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        run(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
