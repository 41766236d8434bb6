"""``qwenrt eval``: each engine's artifact against the float checkpoint it was made from.

The reference (transformers, float32, on the source checkpoint) reads the corpus once:
its top tokens at every scored position and its greedy continuations of a few prompts
are cached beside the model, keyed by the corpus's hash, the window, the budget and the
checkpoint's digest, so a second evaluation (or ``compare --quality``) costs only the
engines' time. Each engine then reads the same token ids in a process of its own, window
by window, and only figures come back (qwenrt.eval.worker).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwenrt import __version__
from qwenrt.child import run_child
from qwenrt.errors import QwenrtError
from qwenrt.eval.corpora import corpus as find_corpus
from qwenrt.eval.scoring import TOP_K
from qwenrt.host import this_host

SCHEMA = "qwenrt.eval/1"
CACHE_DIR = "eval-cache"
CHILD_TIMEOUT_S = 3600.0
# Prompts whose greedy continuations are set against the reference's, in the languages and
# kinds of text the product's users write.
CONTINUATION_PROMPTS = (
    ("english", "Explain in two sentences what a Python generator is."),
    ("code", "Write a Python function that returns the n-th Fibonacci number."),
    ("chinese", "请用两句话介绍一下长城。"),
    ("arithmetic", "A train leaves at 3 pm and travels 120 km at 60 km/h. When does it arrive?"),
)


@dataclass(frozen=True)
class EvalSpec:
    model_dir: str
    corpus: str = "english"  # a named corpus or a file
    context: int = 512
    max_tokens: int = 8192  # scored tokens
    threads: int | None = None
    continuation_tokens: int = 32
    # Engine settings (--set), ahead of the host profile and qwenrt's rules; each engine takes
    # those it has. Precision settings change the answers, which is what eval is there to show.
    settings: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.context < 16:
            raise QwenrtError(f"--context must be 16 tokens or more, not {self.context}")
        if self.max_tokens < 1:
            raise QwenrtError(f"--max-tokens must be 1 or more, not {self.max_tokens}")


def reference_path(spec: EvalSpec, corpus_sha256: str, checkpoint_digest: str) -> Path:
    """Where the reference for this corpus, window, budget and checkpoint is cached."""
    key = json.dumps({"corpus": corpus_sha256, "context": spec.context, "max_tokens": spec.max_tokens, "top_k": TOP_K,
                      "checkpoint": checkpoint_digest, "prompts": CONTINUATION_PROMPTS,
                      "continuation_tokens": spec.continuation_tokens}, sort_keys=True)  # fmt: skip
    return Path(spec.model_dir) / CACHE_DIR / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def evaluate(spec: EvalSpec, runtimes: list[str], progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every engine in ``runtimes`` against the reference; the report (schema qwenrt.eval/1)."""
    from qwenrt.runtimes import engine_class
    from qwenrt.runtimes.fingerprint import artifact_digest

    spec.check()
    corpus = find_corpus(spec.corpus)
    reference_engine = engine_class("transformers")
    checkpoint = reference_engine.artifact_path(Path(spec.model_dir))
    path = reference_path(spec, corpus.sha256, artifact_digest(checkpoint))
    started = time.monotonic()
    cached = path.is_file()
    if cached:
        progress(f"reference: cached in {path.parent}")
    else:
        progress("reference: the float model reads the corpus (once; cached beside the model)")
        _child("reference", spec, path, None, progress)
    reference = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    reference_seconds = time.monotonic() - started
    results = []
    for name in runtimes:
        progress(f"{name}: reading the corpus")
        results.append(_child("engine", spec, path, name, progress))
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qwenrt_version": __version__,
        "host": this_host().describe(),
        "spec": asdict(spec),
        "corpus": corpus.describe(),
        "prompts": [name for name, _ in CONTINUATION_PROMPTS],
        "reference": {**reference, "cached": cached, "seconds": round(reference_seconds, 1)},
        "engines": results,
    }


def _child(role: str, spec: EvalSpec, path: Path, engine: str | None, progress: Callable[[str], None]) -> Any:
    request = {"role": role, "spec": asdict(spec), "reference": str(path), "engine": engine}
    outcome = run_child("qwenrt.eval.worker", request, timeout_s=CHILD_TIMEOUT_S, progress=progress)
    if outcome.ok:
        return outcome.result
    who = engine or "the float reference (transformers)"
    if role == "engine":  # one engine failing costs its row, not the others'
        return {"engine": engine, "status": "failed", "error": outcome.reason()}
    raise QwenrtError(f"{who} could not read the corpus: {outcome.reason()}")
