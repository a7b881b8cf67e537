"""Crash-safe files for long mining jobs: :func:`atomic_write` (a reader sees the old file or the
complete new one, never a partial one) and :class:`CheckpointDir`, the directory of finished query
batches that makes :func:`hnsample.mine_hard_negatives` resumable."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .mining_io import PathLike


def _fsync_dir(path: Path) -> None:
    """Makes the renames in a directory durable, where the platform lets a directory be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's file-mode creation mask (read from /proc where it can be, so that no other thread
    ever sees a changed umask; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Calls write(file_object) on a temporary file ``.<name>.<random>.tmp`` in path's directory, fsyncs
    it, renames it over path and fsyncs the directory: a reader sees either the old file or the complete
    new one, never a partial file, and a process killed mid-write leaves only the temporary file. The
    file gets the mode a plain ``open(path, "w")`` would give it (0o666 less the umask), not the 0o600
    of a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _lock_directory(path: Path) -> int | None:
    """An exclusive advisory lock (flock) on ``path/.lock`` held by the returned descriptor until it is
    closed; the kernel drops it when the process dies, so a killed run never leaves a stale lock. None
    where the platform or file system has no flock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(path / CheckpointDir.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise ValueError(f"checkpoint_dir {str(path)!r} is in use by another running process"
                         f"{f' (pid {owner})' if owner else ''}; two runs must not share a directory") from None
    except OSError:  # no flock support (some network file systems): run unlocked
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


_BATCH_NAME = re.compile(r"batch_(\d{7})\.npz")
_TEMP_NAME = re.compile(r"\.(?:batch_\d{7}\.npz|manifest\.json)\..+\.tmp")


class CheckpointDir:
    """A directory of finished query batches: ``manifest.json`` (the run's parameters) plus one
    ``batch_<i>.npz`` per finished batch, every file written atomically (:func:`atomic_write`).

    Opening (the writer, ``write=True``): takes an exclusive lock on ``.lock`` (a second process opening
    the directory gets ValueError), removes the temporary files of killed writes, then checks the
    manifest. A stored manifest that differs from the run's parameters raises ValueError listing the
    differing keys; an unreadable one raises ValueError naming it. Batch files with no manifest beside
    them are refused (ValueError): nothing shows which run wrote them, so they are never reused.

    Every batch file carries the SHA-256 of the manifest it was written under and its batch number, and
    :meth:`read` validates the file whole (arrays, shapes, dtypes, id range, padding) before any of it is
    used; a bad file raises ValueError naming the file and the problem. Since writes are atomic, such a
    file was damaged or replaced after it was written: deleting it makes the next run recompute it.
    """

    MANIFEST = "manifest.json"
    LOCK = ".lock"

    def __init__(self, path: PathLike, manifest: dict[str, Any], write: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"checkpoint_dir is not a directory: {str(path)!r}")
        # json round-trip so that tuples/lists and ints/floats compare as they were stored
        self.manifest = json.loads(json.dumps(manifest))
        self.digest = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        self._lock: int | None = None
        try:
            if write:
                self.path.mkdir(parents=True, exist_ok=True)
                self._lock = _lock_directory(self.path)
                for p in self.path.iterdir():
                    if _TEMP_NAME.fullmatch(p.name):
                        p.unlink(missing_ok=True)
            self._check_manifest(write)
        except BaseException:
            self.close()
            raise

    def _check_manifest(self, write: bool) -> None:
        stored = self.stored_manifest(self.path)
        if stored is not None:
            if stored != self.manifest:
                keys = sorted(k for k in set(stored) | set(self.manifest)
                              if stored.get(k) != self.manifest.get(k))
                detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {self.manifest.get(k)!r}" for k in keys)
                raise ValueError(f"checkpoint_dir {str(self.path)!r} was written by a run with different "
                                 f"parameters ({detail}); use a new directory or the same parameters")
            return
        orphans = sorted(self.finished())
        if orphans:
            raise ValueError(
                f"checkpoint_dir {str(self.path)!r} holds {len(orphans)} batch file(s) (first: "
                f"{self.batch_path(orphans[0]).name}) but no {self.MANIFEST}, so nothing shows which run "
                "wrote them and they are never reused; delete them or use a new directory")
        if write:
            data = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
            atomic_write(self.path / self.MANIFEST, lambda f: f.write(data))

    def close(self) -> None:
        """Releases the directory lock (also released when the process exits or is killed)."""
        if getattr(self, "_lock", None) is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> CheckpointDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @staticmethod
    def stored_manifest(path: PathLike) -> dict[str, Any] | None:
        """The manifest stored in ``path`` (None when there is none); ValueError naming the file when it
        is not a JSON object."""
        mpath = Path(path) / CheckpointDir.MANIFEST
        if not mpath.is_file():
            return None
        try:
            stored = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint manifest {str(mpath)!r} is not valid JSON ({e}); it was damaged "
                             "after it was written: use a new checkpoint_dir") from None
        if not isinstance(stored, dict):
            raise ValueError(f"checkpoint manifest {str(mpath)!r} is not a JSON object; use a new "
                             "checkpoint_dir")
        return stored

    def batch_path(self, index: int) -> Path:
        return self.path / f"batch_{index:07d}.npz"

    def finished(self, filter_columns: int | None = None) -> set[int]:
        """Indices of the batch files present (named exactly as :meth:`batch_path` names them). Atomic
        renames make a present file a complete one; :meth:`read` still validates it. With
        ``filter_columns`` (a run that wants filter statistics), a file written without them does not
        count as finished: the batch is mined again and its file replaced."""
        if not self.path.is_dir():
            return set()
        done = {int(m.group(1)) for p in self.path.iterdir() if (m := _BATCH_NAME.fullmatch(p.name))}
        if filter_columns is None:
            return done
        return {i for i in done if _holds_array(self.batch_path(i), "filter_counts")}

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        stamped = dict(arrays, checkpoint_manifest_sha256=np.array(self.digest),
                       checkpoint_batch=np.array(index, dtype=np.int64))
        atomic_write(self.batch_path(index), lambda f: np.savez(f, **stamped))

    def read(self, index: int, *, rows: int, k: int, num_corpus: int, filter_columns: int | None,
             positive_columns: int = 0) -> dict[str, np.ndarray]:
        """Batch ``index``'s arrays after checking the whole file: exactly the arrays a batch of ``rows``
        queries holds (indices (rows, k) int64 in [-1, num_corpus), no id twice in a row; scores
        (rows, k) float32, -inf exactly at padding and never NaN elsewhere; positive_scores (rows,)
        float32; positive_pair_scores (rows, positive_columns) float32; filter_counts (rows,
        filter_columns) int64 in [0, num_corpus] per row when filter_columns is given, and ignored when a
        file holds them but filter_columns is None), this directory's manifest digest and this batch
        number. Anything else raises ValueError naming the file."""
        path = self.batch_path(index)
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with z:
                arrays = {name: z[name] for name in z.files}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise self._bad(path, f"cannot be read ({type(e).__name__}: {e})") from None
        if filter_columns is None:
            arrays.pop("filter_counts", None)
        problem = _batch_problem(arrays, index, self.digest, rows, k, num_corpus, filter_columns, positive_columns)
        if problem is not None:
            raise self._bad(path, problem)
        return {name: a for name, a in arrays.items() if not name.startswith("checkpoint_")}

    @staticmethod
    def _bad(path: Path, problem: str) -> ValueError:
        return ValueError(f"checkpoint batch file {str(path)!r} {problem}; checkpoint files are written "
                          "atomically, so it was damaged or replaced afterwards: delete it and run again "
                          "to recompute that batch")


def _holds_array(path: Path, name: str) -> bool:
    """Whether the .npz at path lists an array `name` (False for an unreadable file: read() reports it)."""
    try:
        with zipfile.ZipFile(path) as z:
            return f"{name}.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return True


def _batch_problem(arrays: dict[str, np.ndarray], index: int, digest: str, rows: int, k: int, n: int,
                   filter_columns: int | None, positive_columns: int = 0) -> str | None:
    """What is wrong with a checkpoint batch's arrays, or None (see :meth:`CheckpointDir.read`)."""
    expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "indices": ((rows, k), np.dtype(np.int64)), "scores": ((rows, k), np.dtype(np.float32)),
        "positive_scores": ((rows,), np.dtype(np.float32)), "checkpoint_batch": ((), np.dtype(np.int64)),
        "positive_pair_scores": ((rows, positive_columns), np.dtype(np.float32)),
    }
    if filter_columns is not None:
        expected["filter_counts"] = ((rows, filter_columns), np.dtype(np.int64))
    names = set(expected) | {"checkpoint_manifest_sha256"}
    if set(arrays) != names:
        return f"holds the arrays {sorted(arrays)}, expected {sorted(names)}"
    stamp = arrays["checkpoint_manifest_sha256"]
    if stamp.dtype.kind != "U" or stamp.shape != () or str(stamp) != digest:
        return "was written under another manifest (another run's parameters)"
    for name, (shape, dtype) in expected.items():
        a = arrays[name]
        if a.shape != shape or a.dtype != dtype:
            return f"holds {name} of shape {a.shape} and dtype {a.dtype}, expected {shape} and {dtype}"
    if int(arrays["checkpoint_batch"]) != index:
        return f"holds batch {int(arrays['checkpoint_batch'])}, not batch {index}"
    idx, sc = arrays["indices"], arrays["scores"]
    if idx.size and (int(idx.min()) < -1 or int(idx.max()) >= n):
        return f"holds indices outside [-1, {n}) (min {int(idx.min())}, max {int(idx.max())})"
    pad = idx < 0
    if not np.isneginf(sc[pad]).all():
        return "holds padding (index -1) whose score is not -inf"
    if np.isnan(sc[~pad]).any():
        return "holds a NaN score for a found negative"
    s = np.sort(idx, axis=1)
    if ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any():
        return "holds the same corpus id twice in a row"
    if filter_columns is not None:
        fc = arrays["filter_counts"]
        if (fc < 0).any() or (fc.sum(axis=1) > n).any():
            return f"holds filter counts below 0 or above {n} per row"
    return None
