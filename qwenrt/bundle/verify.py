"""Check an unpacked bundle before installing it: the Python, every wheel, every model file.

``install.sh`` runs this file with the target's own ``python3`` before anything is
installed, so it uses the standard library only (the bundle carries a copy of it). A file
that is missing, of another size or of another sha256 than recorded (the model's files in
the model's ``manifest.json``, the wheels in ``bundle.json``) stops the install with one
line naming it, and exit status 1.

    python3 verify.py BUNDLE_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

BUNDLE_FILE = "bundle.json"
MODEL_DIR = "model"
CHUNK = 1 << 20


class VerifyError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def expected_files(bundle: Path) -> list[tuple[Path, int, str]]:
    """(path, size, sha256) of every wheel and model file the bundle records."""
    try:
        info = json.loads((bundle / BUNDLE_FILE).read_text(encoding="utf-8"))
        manifest = json.loads((bundle / MODEL_DIR / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerifyError(f"{bundle} is not a whole qwenrt bundle ({exc})") from None
    files = [(bundle / "wheels" / wheel["file"], wheel["size"], wheel["sha256"]) for wheel in info["wheels"]]
    for key in info["model"]["artifacts"]:
        record = manifest.get("artifacts", {}).get(key)
        if not isinstance(record, dict) or not record.get("files"):
            raise VerifyError(f"the model's manifest.json has no file list for its {key} artifact")
        files += [(bundle / MODEL_DIR / entry["path"], entry["size"], entry["sha256"]) for entry in record["files"]]
    return files


def check_python(bundle: Path) -> None:
    info = json.loads((bundle / BUNDLE_FILE).read_text(encoding="utf-8"))
    wanted = info["python"]
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != wanted:
        raise VerifyError(
            f"this bundle's wheels are for Python {wanted}, and {sys.executable} is Python {running}; "
            f"run install.sh with PYTHON=/path/to/python{wanted}, or make a bundle with --python {running}"
        )


def verify(bundle: Path) -> int:
    """Check everything; returns how many files were checked."""
    check_python(bundle)
    files = expected_files(bundle)
    for path, size, sha256 in files:
        shown = path.relative_to(bundle)
        if not path.is_file():
            raise VerifyError(f"{shown} is missing from the bundle")
        if path.stat().st_size != size:
            raise VerifyError(f"{shown} has changed: {path.stat().st_size} bytes where the bundle recorded {size}")
        if sha256_of(path) != sha256:
            raise VerifyError(f"{shown} has changed: its sha256 is not the one the bundle recorded")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    bundle = Path(args[0] if args else Path(__file__).parent).resolve()
    try:
        count = verify(bundle)
    except VerifyError as exc:
        print(f"install.sh: error: {exc}", file=sys.stderr)
        return 1
    print(f"checked {count} files against their recorded sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
