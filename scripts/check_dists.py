"""Build Tessera's two distributions and use them as users would, outside the repository.

CI runs this after the tests (``make dist-check``); it needs the package
index (pip fetches the build tools and the pinned dependencies). In order:

1. Each distribution is built as users' tools build it: an sdist, then a
   wheel from that sdist (``python -m build``), so a file the sdist leaves
   out (the client's ``tessera/v1`` is a symlink in the checkout) is missing
   from the wheel too; from a copy of the files git knows, so no leftover
   of an earlier build can slip in.
2. Each wheel installs under ``tessera/`` alone (its RECORD names no other
   top-level folder: no ``scheduler``, no ``agent``); the client's holds
   the wire contract (code, stubs, ``.proto`` files) and the client, and
   nothing of the scheduler; no file is in both.
3. The client's wheel alone, in a clean virtualenv, places and releases
   against a real scheduler started from the repository
   (``scripts/client_smoke.py``: without ortools or redis installed).
4. Both wheels in another clean virtualenv; packages named ``scheduler`` and
   ``agent`` (built here, laid out as PyPI's unrelated ones are) install
   beside them and uninstall again without touching one of Tessera's files
   (every file keeps the hash its RECORD gives); then ``tessera --version``
   answers and ``tessera demo`` runs to "demo OK" from a folder outside the
   repository.

Usage::

    .venv/bin/python scripts/check_dists.py [--keep DIR]

Exit 0 when every check holds; otherwise the failed check and exit 1.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tessera.scheduler.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "scripts" / "client_smoke.py"

#: The distributions built from this repository, by the folder of each pyproject.toml.
SCHEDULER, CLIENT = "tessera-scheduler", "tessera-scheduler-client"
SOURCES = {SCHEDULER: ROOT, CLIENT: ROOT / "clients" / "python"}

#: The build frontend, pinned like every other tool.
BUILD = "build==1.6.1"

#: The only top-level folder a Tessera wheel may install (beside its metadata).
ALLOWED_TOP_LEVEL = {"tessera"}

#: What the client's wheel must hold, and where it must not reach.
CLIENT_REQUIRED = (
    "tessera/v1/__init__.py",
    "tessera/v1/py.typed",
    "tessera/v1/scheduler.proto",
    "tessera/v1/scheduler_pb2.py",
    "tessera/v1/scheduler_pb2.pyi",
    "tessera/v1/scheduler_pb2_grpc.py",
    "tessera/client/__init__.py",
    "tessera/client/py.typed",
)
CLIENT_FORBIDDEN = (
    "tessera/__init__.py",
    "tessera/scheduler/",
    "tessera/agent/",
    "tessera/security/",
)

#: Stand-ins for PyPI's unrelated ``scheduler`` and ``agent``: a top-level
#: package of that name, as those distributions install.
IMPOSTORS = ("scheduler", "agent")

#: The fake host the client's smoke test places on.
SMOKE_HOST = "virt"


class CheckFailedError(Exception):
    """A check did not hold; the message says which and why."""


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 1800) -> str:
    """Run a command; its standard output, or :class:`CheckFailedError` with its output."""
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise CheckFailedError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{tail}")
    return done.stdout


def new_venv(path: Path) -> Path:
    """A clean virtualenv of this interpreter's base Python (its own pip, as users get it)."""
    run(sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


def checkout_copy(dest: Path) -> Path:
    """The files git knows (tracked, and new ones it does not ignore), copied to ``dest``.

    setuptools makes an sdist from the files it finds and from what an earlier
    build left in the tree (``*.egg-info/SOURCES.txt`` is merged, never
    pruned): building from a copy keeps a stale file list out of the wheels
    this check vouches for.
    """
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source, target = ROOT / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)
    return dest


def build(work: Path) -> dict[str, Path]:
    """Each distribution's wheel, built from its sdist, from a copy of the checkout."""
    source_root = checkout_copy(work / "source")
    builder = new_venv(work / "build-venv")
    run(builder, "-m", "pip", "install", "-q", BUILD)
    wheels: dict[str, Path] = {}
    for name, folder in SOURCES.items():
        out = work / "dist" / name
        source = source_root / folder.relative_to(ROOT)
        run(builder, "-m", "build", "--quiet", "--outdir", out, source)
        (wheels[name],) = out.glob("*.whl")
    return wheels


def wheel_files(wheel: Path) -> list[str]:
    """The paths a wheel's RECORD lists."""
    with zipfile.ZipFile(wheel) as z:
        (record,) = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        return [row[0] for row in csv.reader(z.read(record).decode().splitlines()) if row]


def check_contents(wheels: dict[str, Path]) -> None:
    """Each wheel under ``tessera/`` alone; the client's whole and free of the scheduler."""
    for wheel in wheels.values():
        files = wheel_files(wheel)
        tops = {f.split("/", 1)[0] for f in files if not f.split("/", 1)[0].endswith(".dist-info")}
        if stray := sorted(tops - ALLOWED_TOP_LEVEL):
            raise CheckFailedError(f"{wheel.name} installs top-level {stray}: only tessera/")
        print(f"ok: {wheel.name} installs under tessera/ only ({len(files)} files)")
    client = set(wheel_files(wheels[CLIENT]))
    problems = [f"misses {n}" for n in CLIENT_REQUIRED if n not in client]
    problems += [f"ships {n}" for n in sorted(client) if n.startswith(CLIENT_FORBIDDEN)]
    if problems:
        raise CheckFailedError(f"{wheels[CLIENT].name}: {'; '.join(problems)}")
    # The client's folders are the client's alone: two owners of one file
    # would let uninstalling either delete it from under the other.
    if shared := sorted(set(wheel_files(wheels[SCHEDULER])) & client):
        raise CheckFailedError(f"both wheels ship {shared[:5]} ({len(shared)} files)")


def check_client_alone(work: Path, wheel: Path) -> None:
    """The client's wheel alone places and releases against a real scheduler."""
    python = new_venv(work / "client-venv")
    run(python, "-m", "pip", "install", "-q", wheel)
    with LocalCluster(work / "cluster") as cluster:
        cluster.start_valkey()
        cluster.start_scheduler()
        host = cluster.build_fake_host("virt-2s", SMOKE_HOST)
        cluster.start_agent(SMOKE_HOST, host, {"name": SMOKE_HOST})
        cluster.wait_for_hosts({SMOKE_HOST})
        tls = cluster.tls_dir("tenant", "acme")
        # From the work folder: the checkout's own tessera/ must not be on the path.
        run(python, SMOKE, cluster.scheduler_address, tls, SMOKE_HOST, cwd=work)
    print(f"ok: {wheel.name} alone places and releases (no solver, no store client)")


def intact_files(python: Path, dists: list[str]) -> int:
    """How many files of ``dists`` the venv holds, each as its RECORD hashes it."""
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", purelib, cwd=python.parent).strip())
    count = 0
    for dist in dists:
        (info,) = site.glob(f"{dist.replace('-', '_')}-*.dist-info")
        for row in csv.reader((info / "RECORD").read_text().splitlines()):
            if not row or not row[1]:
                continue  # RECORD itself, and what pip wrote after (no hash)
            path = site / row[0]
            algorithm, _, expected = row[1].partition("=")
            if not path.is_file():
                raise CheckFailedError(f"{dist}: {row[0]} is gone")
            digest = hashlib.new(algorithm, path.read_bytes()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != expected:
                raise CheckFailedError(f"{dist}: {row[0]} was changed")
            count += 1
    return count


def impostor_wheel(name: str, out: Path) -> Path:
    """A wheel of a distribution ``name`` whose top-level package is ``name``."""
    src = out / f"impostor-{name}"
    (src / name).mkdir(parents=True)
    (src / name / "__init__.py").write_text(
        f'"""Not Tessera: PyPI\'s {name}."""\nIMPOSTOR = True\n'
    )
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "99.0"\n'
        f'[tool.setuptools]\npackages = ["{name}"]\n'
    )
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src)
    (wheel,) = out.glob(f"{name}-*.whl")
    return wheel


def check_installed(work: Path, wheels: dict[str, Path]) -> None:
    """Both wheels together: impostors cannot touch them, and the demo runs."""
    # Every command in the venv runs from here: `python -c` puts its working
    # folder on sys.path, and the repository's would shadow what is installed.
    outside = work / "elsewhere"
    outside.mkdir(exist_ok=True)
    python = new_venv(work / "venv")
    run(python, "-m", "pip", "install", "-q", *wheels.values())
    intact = intact_files(python, list(wheels))
    print(f"ok: both wheels installed in a clean venv ({intact} files)")

    impostors = [impostor_wheel(name, work / "impostors") for name in IMPOSTORS]
    run(python, "-m", "pip", "install", "-q", *impostors)
    probe = "import scheduler, agent; assert scheduler.IMPOSTOR and agent.IMPOSTOR"
    run(python, "-c", probe, cwd=outside)
    run(python, "-m", "pip", "uninstall", "-q", "-y", *IMPOSTORS)
    if intact_files(python, list(wheels)) != intact:
        raise CheckFailedError("Tessera's files changed across the impostors' install")
    print(f"ok: packages named {' and '.join(IMPOSTORS)} came and went; Tessera's files intact")

    tessera = python.parent / "tessera"
    print(f"ok: {run(tessera, '--version', cwd=outside).strip()}")
    demo = run(tessera, "demo", cwd=outside, timeout=600)
    if "demo OK" not in demo:
        raise CheckFailedError(f"tessera demo did not say demo OK:\n{demo[-3000:]}")
    print("ok: tessera demo ran outside the repository on the installed wheels")


def main() -> int:
    """Run every check; 0 when all hold."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-dists-") as tmp:
        work = opts.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            wheels = build(work)
            check_contents(wheels)
            check_client_alone(work, wheels[CLIENT])
            check_installed(work, wheels)
        except CheckFailedError as err:
            print(f"FAILED: {err}", file=sys.stderr)
            return 1
    print("distribution check OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
