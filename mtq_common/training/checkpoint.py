"""Checkpoint files: atomic writes, safe loads, random-generator states, weight fingerprints and config checks
that name what changed. Which files a run writes (`best.pt` by the phase scripts; the rotating `latest.pt` and
its step files by `plumbing.py`, their one owner) is decided by their callers.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with `torch.save`
and read back with `torch.load(..., weights_only=True)`, which never executes code from the file.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the target: a run
killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mtq_common.training.config import hashed_values

try:
    import fcntl
except ImportError:  # (Windows: no run lock)
    fcntl = None

FORMAT = "mtquant-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A missing, corrupted, foreign or incompatible checkpoint; the message names the path and the fix."""


class WriteError(CheckpointError):
    """A checkpoint, report or manifest that could not be written (a full disk, a folder made read-only meanwhile);
    the message names the file, the reason and how to go on. Nothing is left half-written (`atomic_write_bytes`)."""


_HELD: dict[Path, int] = {}  # run folders this process holds, each with its nesting depth


def lock_path(folder: str | Path) -> Path:
    """The lock file of run folder `folder`: in the temporary folder, named by the folder's full path, so that
    taking it writes nothing into the run (nor makes a folder that does not exist yet); one folder per user."""
    key = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    user = getattr(os, "getuid", lambda: 0)()  # (a folder per user: another user's would not be writable)
    return Path(tempfile.gettempdir()) / f"mtquant-locks-{user}" / f"{key}.lock"


@contextlib.contextmanager
def holding(folder: str | Path, who: str) -> Iterator[None]:
    """Hold run folder `folder` while the block runs; another process asking for it meanwhile is refused with a
    `CheckpointError` naming the holder. Two processes in one run folder (a `--mode resume` while the run still
    trains) would write over each other's checkpoints and reports. An OS lock (`fcntl.flock`), released by the
    OS however the process ends, kill -9 included; nested holds in one process are free. One machine only; none
    where fcntl is missing (Windows) or the temporary folder cannot be written."""
    key, handle = Path(folder).resolve(), None
    if fcntl is not None and key not in _HELD:  # (else nothing to take: no lock here, or this process holds it)
        with contextlib.suppress(OSError):  # an unwritable temporary folder: run without the lock
            lock_path(key).parent.mkdir(exist_ok=True)
            handle = open(lock_path(key), "a+")  # (closed by the `with handle` below, after the block)
    if handle is None:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CheckpointError(f"{key} is in use by {holder}: wait for it to end, or stop it. Two processes "
                                  "writing one run would mix their checkpoints and reports.") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"{who} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]  # (closing the file releases the lock)


@contextlib.contextmanager
def holding_run(
    output_dir: str | Path, log_dir: str | Path, who: str, subfolders: tuple[str, ...] = ()
) -> Iterator[None]:
    """`holding` a run's output folder and its log folder, and `subfolders` of both (the pipeline's phase folders,
    which a phase script run by hand would hold): a second run sharing only the log folder (an `--overwrite` there
    deleted the first run's TensorBoard events) or one phase's folder is refused too. (A lock is a folder's own,
    not its subfolders': each folder a process writes is named.)"""
    with contextlib.ExitStack() as stack:
        for base in (output_dir, log_dir):
            for folder in (Path(base), *(Path(base) / name for name in subfolders)):
                stack.enter_context(holding(folder, who))  # (one folder given twice: the nested hold is free)
        yield


def read_manifest(path: str | Path) -> dict | None:
    """A run's manifest (`pipeline.json`, which `pipeline.py` writes), or None where there is none; one that is not
    JSON, or not the object pipeline.py writes (edited by hand), is a `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable manifest ({exc}); move it away to start over") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("phases", {}), dict):
        raise CheckpointError(f"{path} is not a readable manifest (expected a JSON object whose \"phases\" is an "
                              "object, as pipeline.py writes it); move it away to start over")  # fmt: skip
    return manifest


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync, rename). The file gets the
    usual permissions (the umask's; `tempfile.mkstemp` would make every report owner-only)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # (no temporary file where the folder itself could not be made)
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # (a full disk hours into a run: one line that says how to go on)
            raise WriteError(
                f"cannot write {path} ({exc.strerror or exc}); nothing was left half-written: free some space (or "
                "make the folder writable) and run again (training continues from its last checkpoint: "
                "`pipeline.py --mode resume`, or a phase script's --resume)"
            ) from exc
        raise


def json_safe(x: Any) -> Any:
    """`x` with every non-finite float replaced by None: JSON has no NaN or inf, and an undefined value
    (a diverged run's Sharpe) must read as missing (`null`), never as a number."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def atomic_write_json(path: str | Path, payload: Any, sort_keys: bool = True) -> None:
    """JSON (keys sorted unless `sort_keys=False`: a table keeps its row order), written atomically;
    NaN and inf are written as `null` (`json_safe`)."""
    text = json.dumps(json_safe(payload), indent=2, sort_keys=sort_keys, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Save a checkpoint dict atomically (adds the format tag)."""
    import io

    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, kind: str | None = None, hint: str = "") -> dict:
    """Load a checkpoint safely; a clear `CheckpointError` for a missing, corrupted or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. {hint}".strip())
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean the same thing to a user
        why = (str(exc).splitlines() or ["(no message)"])[0][:200]  # (an empty file's error has no message)
        if why.startswith("Weights only load failed"):  # (not torch's advice to load it unsafely)
            why = "it holds objects that a safe load (weights_only=True) refuses"
        raise CheckpointError(
            f"{path} is not a readable MTQuant checkpoint (corrupted, truncated or not written by MTQuant): "
            f"{type(exc).__name__}: {why}. {hint}".strip()
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an MTQuant checkpoint (format tag missing). {hint}".strip())
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {payload.get('kind')!r} checkpoint, expected {kind!r}. {hint}".strip())
    return payload


def config_differences(written: dict, current: dict, prefix: str = "") -> list[str]:
    """Every key whose value differs between two config dicts (`Config.to_dict()`), one
    `"section.key: A in the run, B now"` each, in the dicts' order."""
    lines = []
    for key in [*written, *(k for k in current if k not in written)]:
        name, old, new = f"{prefix}{key}", written.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_differences(old, new, f"{name}.")
        elif old != new:
            lines.append(f"{name}: {old!r} in the run, {new!r} now")
    return lines


def check_inputs_unchanged(state: dict, key: str, fingerprint: str, what: str, force: bool = False) -> None:
    """Refuse to resume `state` (a `latest.pt`) over input models other than those it was trained from: `state[key]`
    holds their `parameter_fingerprint`; `what` names the checkpoint and the inputs for the message. Checkpoints
    from before the fingerprint was recorded are not checked."""
    if force or state.get(key, fingerprint) == fingerprint:
        return
    raise CheckpointError(f"{what} (their weights differ): resume with the run's inputs, or pass --force to resume "
                          "anyway")  # fmt: skip


def check_config_hash(payload: dict, config_hash: str, path: str | Path, force: bool = False,
                      config: dict | None = None) -> None:  # fmt: skip
    """Refuse to resume with a different config unless forced. `payload` (a checkpoint or the pipeline's
    manifest) holds the run's `config_hash` and, since checkpoints record it, its `config`: then the message
    names every key that differs with both values (`config`: the current `Config.to_dict()`), among those the hash
    reads (`config.hashed_values`: a key added since the run, at its default, is no difference)."""
    written = payload.get("config_hash")
    if written == config_hash or force:
        return
    fix = "resuming would mix two experiments. Use the original config (and flags), or pass --force to resume anyway."
    if isinstance(payload.get("config"), dict) and config is not None:  # checkpoints and manifests record it
        changed = config_differences(hashed_values(payload["config"]), hashed_values(config))  # (what the hash reads)
        if changed:
            raise CheckpointError(f"{path}: the config differs from the run's: {'; '.join(changed)} (config hash "
                                  f"{written} in the run, {config_hash} now): {fix}")  # fmt: skip
    raise CheckpointError(f"{path} was written with config hash {written}, but the current config hashes to "
                          f"{config_hash}: {fix}")  # fmt: skip


def rng_state() -> dict:
    """The RNG states a resumed run needs (torch CPU, and CUDA when used)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clone_state(module: torch.nn.Module) -> dict:
    """A detached copy of a module's state dict (a best-so-far model kept in memory and saved later)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def parameter_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
