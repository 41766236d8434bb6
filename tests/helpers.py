"""Helpers shared by the test modules."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder`` with its size, mtime and hash: equal snapshots mean nothing was rewritten."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, sha256(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def staging_folders(out: Path) -> list[Path]:
    """The staging folders a conversion into ``out`` makes beside it."""
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def kernel_collapses() -> bool:
    """Whether this kernel rebuilds memory in huge pages on MADV_COLLAPSE: Linux 6.1 and
    later, with transparent huge pages not switched off."""
    if platform.system() != "Linux":
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return (major, minor) >= (6, 1) and setting.exists() and "[never]" not in setting.read_text()


def anonymous_huge_page_bytes(pid: int) -> int:
    """Process ``pid``'s anonymous memory in transparent huge pages, as the kernel counts it."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no AnonHugePages line for process {pid}")


def make_cell(**fields: object):
    """A compare cell with plausible figures, for tests of what reads cells; ``fields`` override them."""
    from qwenrt.compare.cells import Cell, CpuUse, Summary

    def summary(median: float) -> Summary:
        return Summary(median=median, p90=median, min=median, max=median, mean=median, stdev=0.0, n=1)

    values: dict = {
        "runtime": "gguf", "threads": 1, "scenario": "short", "label": None, "batch": 1,
        "settings": {"artifact": "model.gguf"}, "resolved": {}, "engine_defaults": False, "prompt_tokens": 10,
        "prompt_ids_sha256": "a", "generated_tokens": 4, "load_s": 0.5, "first_token_s": summary(0.05),
        "first_token_cached_s": None, "prefill_tps": summary(200.0), "decode_tps": summary(10.0),
        "inter_token_ms": summary(100.0), "end_to_end_s": summary(0.4),
        "cpu": CpuUse(summary(1.0), 100.0, 50.0, [100.0, 0.0]), "rss_after_load_bytes": 1, "peak_rss_bytes": 2,
        "rss_private_bytes": 1, "rss_file_backed_bytes": 1, "artifact_bytes": 1, "token_ids": [1, 2, 3, 4],
        "repeat": 1, "pid": 1,
    }  # fmt: skip
    values.update(fields)
    return Cell(**values)


# How far an engine's log-probabilities may be from log-softmax of its own logits computed over the
# whole sequence at once (Engine.window_logits). Generation feeds the answer a token at a time, and
# the kernels that do (llama.cpp's, and OpenVINO's with its dynamic quantisation of activations)
# now and then round a step differently from the whole-sequence pass.
LOGPROB_TOLERANCE = 1e-3


def scored_tokens(events) -> list:
    """The generated tokens of a stream (TokenEvents with an id), in order."""
    from qwenrt.runtimes import TokenEvent

    return [e for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]


def logprob_deviation(tokens: list, logit_engine, prompt_ids: list[int], alternatives: int) -> float:
    """The largest gap between the tokens' log-probabilities (each chosen token's and its
    alternatives') and log-softmax of ``logit_engine``'s logits over the prompt and the answer,
    read in one pass; the shape of each token's figures is checked on the way: the chosen
    token's at most 0, ``alternatives`` distinct alternatives, most likely first, and they are
    the most likely tokens (their figures are the highest of the distribution's)."""
    import numpy as np

    answer = [token.token_id for token in tokens]
    # Row i of the window predicts the token after its position i: the answer's first from the prompt's last.
    rows = logit_engine.window_logits(prompt_ids + answer[:-1])[len(prompt_ids) - 1 :].astype(np.float64)
    worst = 0.0
    for token, row in zip(tokens, rows, strict=True):
        expected = row - row.max() - np.log(np.exp(row - row.max()).sum())
        chosen, top = token.logprobs.logprob, token.logprobs.top
        values = [logprob for _, logprob in top]
        assert chosen <= 0 and len({t for t, _ in top}) == len(top) == alternatives, token
        assert values == sorted(values, reverse=True), top
        highest = np.sort(expected)[::-1][:alternatives]
        gaps = [abs(chosen - expected[token.token_id]), *(abs(lp - expected[t]) for t, lp in top),
                *np.abs(np.array(values) - highest)]  # fmt: skip
        worst = max(worst, *map(float, gaps))
    return worst
