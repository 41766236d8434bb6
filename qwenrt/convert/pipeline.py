"""``qwenrt convert``: one source checkpoint, two artifacts, one manifest, all or nothing.

New artifacts are written into a staging folder beside the model folder, checked
in their own engine, and only then moved into place, one rename per artifact, the
manifest last. A failed or interrupted conversion removes the staging folder and
leaves the model folder as it was; one killed outright leaves its staging folder,
which the next conversion to the same folder removes.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwenrt import __version__, procfs
from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.demo import sha256_of
from qwenrt.convert.fused_projections import FUSED_ATTENTION
from qwenrt.convert.gguf_writer import write_gguf
from qwenrt.convert.openvino_int8 import Int8Scheme, export_openvino_int8
from qwenrt.convert.sources import ResolvedSource, resolve_source, source_reference
from qwenrt.convert.staging import make_staging, remove_stale_staging
from qwenrt.errors import QwenrtError, WriteError
from qwenrt.manifest import (
    ARTIFACT_KEYS,
    GGUF_KEY,
    MANIFEST_FILE,
    OPENVINO_DIR,
    OPENVINO_KEY,
    SCHEMA_VERSION,
    read_manifest,
    write_manifest,
)
from qwenrt.runtimes.fingerprint import package_version
from qwenrt.runtimes.probe import PROBE_NEW_TOKENS

FORMATS = ARTIFACT_KEYS
CONVERTER_TOOLS = ["qwenrt", "gguf", "optimum-intel", "nncf", "transformers", "torch"]
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass
class ArtifactResult:
    key: str
    path: Path
    skipped: bool
    seconds: float = 0.0
    size: int = 0
    weight_types: dict[str, int] = field(default_factory=dict)
    verified_text: str | None = None


@dataclass
class ConversionResult:
    out_dir: Path
    artifacts: list[ArtifactResult]
    seconds: float
    peak_rss_bytes: int


def convert(
    source: str,
    out_dir: Path,
    formats: tuple[str, ...] = FORMATS,
    *,
    force: bool = False,
    verify: bool = True,
    scheme: Int8Scheme = Int8Scheme(),
    log: Any = print,
) -> ConversionResult:
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise QwenrtError(f"{out_dir}: exists and is not a folder; choose another --out")
    for stale in remove_stale_staging(out_dir):
        log(f"removed {stale.name}, left behind by an interrupted conversion")
    manifest = read_manifest(out_dir)
    if manifest.get("source", {}).get("reference") != source_reference(source):
        manifest = {}  # another source's artifacts are replaced, never reused
    todo = []
    for key in formats:
        if force or not _is_complete(out_dir, manifest, key):
            todo.append(key)
        elif reason := _outdated(manifest["artifacts"][key], key, scheme):
            log(f"{key}: converting again, since {reason}")
            todo.append(key)
    results = [
        ArtifactResult(key, out_dir / manifest["artifacts"][key]["path"], skipped=True)
        for key in formats
        if key not in todo
    ]
    for result in results:
        log(f"{result.key}: {result.path} is complete; skipping (use --force to convert again)")
    if not todo:
        return ConversionResult(out_dir, results, time.perf_counter() - started, procfs.peak_rss_bytes())

    _check_writable(out_dir)
    with _ctrl_c_remembered() as stop_if_interrupted:
        try:
            resolved = resolve_source(source)
            log(f"source: {resolved.reference} ({resolved.kind}) → {resolved.checkpoint.path}")
            staging = make_staging(out_dir)
        except OSError as exc:
            raise _os_failure(exc, out_dir) from None
        try:
            names = {GGUF_KEY: f"{resolved.name}-q8_0.gguf", OPENVINO_KEY: OPENVINO_DIR}
            records: dict[str, dict[str, Any]] = {}
            for key in todo:
                result, record = _build(key, resolved.checkpoint, staging, names[key], scheme, log)
                stop_if_interrupted()
                if verify:
                    result.verified_text = _verify(key, staging, record, resolved.checkpoint, log)
                    stop_if_interrupted()
                results.append(result)
                records[key] = record
            manifest = _updated_manifest(manifest, resolved, records)
            stop_if_interrupted()  # the last moment at which the model folder is still as it was
            _install(staging, out_dir, records, manifest)
        except OSError as exc:
            raise _os_failure(exc, out_dir) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for result in results:
        result.path = out_dir / result.path.name
    return ConversionResult(out_dir, results, time.perf_counter() - started, procfs.peak_rss_bytes())


@contextmanager
def _ctrl_c_remembered() -> Iterator[Callable[[], None]]:
    """Ctrl-C raises KeyboardInterrupt as always, and is also remembered, so that a library
    that swallows it (a bare ``except:`` around an import, say) cannot make the conversion go
    on regardless: the returned function raises it again at the next step."""
    previous = signal.getsignal(signal.SIGINT)
    # Only the main thread may set handlers; an ignored Ctrl-C stays ignored, and a handler
    # set outside Python (getsignal gives None) could not be put back.
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield lambda: None
        return
    pressed = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        pressed.set()
        raise KeyboardInterrupt

    def stop_if_interrupted() -> None:
        if pressed.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop_if_interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_writable(out_dir: Path) -> None:
    """Refuse at once, not after minutes of work, a model folder that cannot be written."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{existing} is a file, so the folder {out_dir} cannot be made; choose another --out")
    # Staging folders go beside the model folder, so its parent must be writable too.
    folders = {existing, out_dir.parent} if out_dir.parent.is_dir() else {existing}
    for folder in sorted(folders):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise WriteError(f"no permission to write in {folder}; choose another --out")


def _os_failure(exc: OSError, out_dir: Path) -> QwenrtError:
    """What an OSError met while converting means to the user, and the way out."""
    where = exc.filename or out_dir
    reason = exc.strerror or str(exc)
    cleaned = "the partial work was removed"
    # numpy's tofile (the GGUF writer's) reports a short write with no errno.
    if exc.errno in SPACE_ERRNOS or (exc.errno is None and "written" in reason):
        return WriteError(
            f"no space left writing {where} ({reason}); {cleaned}: free some space or choose another --out, "
            "then convert again"
        )
    if exc.errno in PERMISSION_ERRNOS:
        return WriteError(f"no permission to write {where} ({reason}); {cleaned}: choose another --out")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return WriteError(f"{where} is in the way of the model folder ({reason}); {cleaned}: choose another --out")
    return QwenrtError(f"conversion failed at {where} ({reason}); {cleaned}")


def _is_complete(out_dir: Path, manifest: dict[str, Any], key: str) -> bool:
    """An artifact counts as complete when every file the manifest lists is there at its size."""
    record = manifest.get("artifacts", {}).get(key)
    if not record:
        return False
    for entry in record.get("files", []):
        path = out_dir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return False
    return bool(record.get("files"))


def _build(
    key: str, checkpoint: Checkpoint, staging: Path, name: str, scheme: Int8Scheme, log: Any
) -> tuple[ArtifactResult, dict[str, Any]]:
    started = time.perf_counter()
    target = staging / name
    if key == GGUF_KEY:
        log("gguf: writing Q8_0 …")
        types = write_gguf(checkpoint, target)
        extra: dict[str, Any] = {"format": "gguf", "quantization": "Q8_0"}
    else:
        log(f"openvino: exporting with {scheme.describe()} weights …")
        target.mkdir()
        export = export_openvino_int8(checkpoint, target, scheme)
        types = export.weight_types
        extra = {"format": "openvino-ir", "quantization": scheme.describe(), "symmetric": scheme.symmetric,
                 "fused_projections": export.fused_projections}  # fmt: skip
    seconds = time.perf_counter() - started
    files = _file_entries(staging, target)
    record = {"path": name, **extra, "weight_types": types, "files": files, "seconds": round(seconds, 1),
              "context_length": int(checkpoint.config["max_position_embeddings"])}  # fmt: skip
    size = sum(entry["size"] for entry in files)
    log(f"{key}: {name} written, {size / 1e6:.0f} MB in {seconds:.1f} s, weights {types}")
    return ArtifactResult(key, target, False, seconds, size, types), record


def _outdated(record: dict[str, Any], key: str, scheme: Int8Scheme) -> str | None:
    """Why a complete artifact differs from what this conversion would write, if it does."""
    if key != OPENVINO_KEY:
        return None
    if record.get("quantization") != scheme.describe():
        return f"its weights are {record.get('quantization')} and {scheme.describe()} were asked for"
    if FUSED_ATTENTION not in record.get("fused_projections", {}):
        return "it was written before qwenrt fused the q, k and v projections (faster decode)"
    return None


def _file_entries(root: Path, target: Path) -> list[dict[str, Any]]:
    paths = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    return [
        {"path": str(p.relative_to(root)), "size": p.stat().st_size, "sha256": sha256_of(p, desc=f"Hashing {p.name}")}
        for p in paths
    ]


def _verify(key: str, staging: Path, record: dict[str, Any], checkpoint: Checkpoint, log: Any) -> str:
    """Run the new artifact in its own engine, in a child process, and generate a few tokens.

    A native crash there ends the child, not the conversion: the engine's safe fallback is
    tried (and remembered for this host, like any probe), or the conversion fails with one
    line and leaves the model folder as it was."""
    from qwenrt.runtimes import EngineOptions, engine_for_artifact
    from qwenrt.runtimes.fingerprint import record_digest
    from qwenrt.runtimes.probe import EngineCrashError, safe_settings

    engine = engine_for_artifact(key)
    artifact = staging / record["path"]
    window = min(512, int(checkpoint.config["max_position_embeddings"]))
    options = EngineOptions(context_length=window, prefix_cache=False)
    settings, run_key = engine.resolve_settings(artifact, options, digest=record_digest(record))
    with warnings.catch_warnings(record=True) as fell_back:
        warnings.simplefilter("always")
        try:
            _, outcome = safe_settings(engine, artifact, settings, run_key, window, fresh=True)
        except EngineCrashError as exc:
            others = [other for other in FORMATS if other != key]
            instead = f"; --format {others[0]} makes the other artifact alone" if others else ""
            raise QwenrtError(
                f"{key}: {engine.description} crashes on this CPU ({exc.signal}) when it runs the new artifact, "
                f"with every safe fallback qwenrt knows; the model folder was left as it was{instead}"
            ) from None
    for warning in fell_back:
        log(f"{key}: {warning.message}")
    if outcome is not None and outcome["ok"] is None:
        raise QwenrtError(f"{key}: the new artifact failed in its engine: {outcome['error']}")
    if outcome is None or outcome.get("generated_tokens") != PROBE_NEW_TOKENS:
        raise QwenrtError(f"{key}: the new artifact did not generate {PROBE_NEW_TOKENS} tokens in its engine")
    log(f"{key}: verified in its engine: {outcome['text']!r}")
    return outcome["text"]


def _updated_manifest(
    manifest: dict[str, Any], resolved: ResolvedSource, records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    artifacts = {**manifest.get("artifacts", {}), **records}
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_name": resolved.name,
        # The checkpoint both artifacts came from; the transformers baseline engine runs on it.
        "source": {**resolved.describe(), "checkpoint": str(resolved.checkpoint.path)},
        "context_length": int(resolved.checkpoint.config["max_position_embeddings"]),
        "artifacts": artifacts,
        "tools": {tool: _version(tool) for tool in manifest_tools()},
    }


def manifest_tools() -> list[str]:
    """The converter's packages, then the packages of the engines that run what it wrote."""
    from qwenrt.runtimes import engine_for_artifact

    engines = [engine_for_artifact(key) for key in FORMATS]
    return list(dict.fromkeys([*CONVERTER_TOOLS, *(package for engine in engines for package in engine.packages)]))


def _version(package: str) -> str | None:
    return __version__ if package == "qwenrt" else package_version(package)


def _install(staging: Path, out_dir: Path, records: dict[str, dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Move each staged artifact into ``out_dir`` with one rename, then the manifest."""
    # The manifest is written in the staging folder too, so that everything that takes
    # space is on disk before the first rename: a full disk fails here, not half-way through.
    write_manifest(staging, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = read_manifest(out_dir).get("artifacts", {})
    for key, record in stale.items():
        if key not in manifest["artifacts"] or manifest["artifacts"][key]["path"] != record["path"]:
            _remove(out_dir / record["path"])
    for record in records.values():
        new, final = staging / record["path"], out_dir / record["path"]
        old = staging / f"{record['path']}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(new, final)
        _remove(old)
    os.replace(staging / MANIFEST_FILE, out_dir / MANIFEST_FILE)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = ["FORMATS", "MANIFEST_FILE", "ConversionResult", "convert"]
