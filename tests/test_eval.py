"""qwenrt eval on the tiny model: every figure against an independent computation."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import QWENRT
from tiny_model import build_tiny_qwen2

from qwenrt.eval.corpora import NAMED, corpus
from qwenrt.eval.run import EvalSpec, evaluate
from qwenrt.eval.scoring import TOP_K, Reference, Scores, kl_top_k, make_windows, perplexity
from qwenrt.manifest import GGUF_KEY, artifact_files
from qwenrt.runtimes import EngineOptions, open_engine

CONTEXT, BUDGET = 64, 200


@pytest.fixture(scope="module")
def evaluation(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    result = subprocess.run([*QWENRT, "eval", "--model", str(tiny_model), "--context", str(CONTEXT), "--max-tokens",
                             str(BUDGET), "--threads", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(out.read_text()), out


def reference_windows(tiny_model: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """The windows eval scores, and the float model's logits for them, computed here apart from eval."""
    with open_engine("transformers", tiny_model, EngineOptions(threads=1, all_logits=True)) as reference:
        ids = reference.tokenize_text(corpus("english").text[:20000])
        windows = make_windows(ids, CONTEXT, BUDGET)
        return windows.ids, [reference.window_logits(window.tolist()) for window in windows.ids]


def test_eval_reports_every_engine_against_the_reference(evaluation: tuple[dict, Path]) -> None:
    report, _ = evaluation
    assert report["schema"] == "qwenrt.eval/1" and report["corpus"]["name"] == "english"
    per_window = CONTEXT - 1 - CONTEXT // 2
    assert report["reference"]["positions"] == report["reference"]["windows"] * per_window >= BUDGET
    engines = {entry["engine"]: entry for entry in report["engines"]}
    assert set(engines) == {"gguf", "openvino"}
    for name, entry in engines.items():
        assert entry["status"] == "ok", entry
        assert entry["same_token_ids"], name  # the same tokens for every engine
        quality = entry["quality"]
        assert quality["positions"] == report["reference"]["positions"]  # the same scored positions
        assert quality["perplexity"] > 1 and quality["kl_mean"] >= 0 and quality["kl_max"] >= quality["kl_p99"]
        assert quality["same_top_share"] > 0.8, (name, quality)
        assert quality["reference_perplexity"] == pytest.approx(report["reference"]["perplexity"])
        assert set(entry["continuations"]) == set(report["prompts"])


def test_the_reference_perplexity_is_the_float_model_s_own(evaluation: tuple[dict, Path], tiny_model: Path) -> None:
    """Recomputed here from transformers' logits with numpy alone, not through eval's code."""
    report, _ = evaluation
    windows, logits = reference_windows(tiny_model)
    first = CONTEXT // 2
    logps = []
    for ids, rows in zip(windows, logits, strict=True):
        rows = rows[first:-1].astype(np.float64)
        log_z = np.log(np.exp(rows - rows.max(axis=1, keepdims=True)).sum(axis=1)) + rows.max(axis=1)
        logps.append(rows[np.arange(len(rows)), ids[first + 1 :]] - log_z)
    assert report["reference"]["perplexity"] == pytest.approx(float(np.exp(-np.mean(np.concatenate(logps)))))


def test_identical_distributions_are_zero_apart_and_the_tail_bucket_bounds_kl(tiny_model: Path) -> None:
    windows_ids, logits = reference_windows(tiny_model)
    windows = make_windows(windows_ids.reshape(-1).tolist(), CONTEXT, BUDGET)
    reference = Reference.from_window_logits(windows, logits)
    same = Scores.against(reference, windows, logits)
    assert np.allclose(same.kl, 0, atol=1e-9) and same.same_top.all()
    assert perplexity(same.target_logp) == pytest.approx(perplexity(reference.target_logp))
    # Against a slightly different model: the top-k figure is a lower bound, close to the exact KL.
    rng = np.random.default_rng(0)
    noisy = [rows + rng.normal(0, 0.3, rows.shape).astype(np.float32) for rows in logits]
    scores = Scores.against(reference, windows, noisy)
    exact = []
    for rows, other in zip(logits, noisy, strict=True):
        p = _log_softmax(rows[CONTEXT // 2 : -1])
        q = _log_softmax(other[CONTEXT // 2 : -1])
        exact.append((np.exp(p) * (p - q)).sum(axis=1))
    exact_kl = np.concatenate(exact)
    assert (scores.kl <= exact_kl + 1e-9).all()
    assert scores.kl.mean() > 0.5 * exact_kl.mean()
    assert logits[0].shape[1] > TOP_K  # the tiny vocabulary is still larger than the kept head


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows.astype(np.float64) - rows.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_kl_of_a_distribution_with_itself_is_zero() -> None:
    logp = np.log(np.array([[0.5, 0.3, 0.1], [0.9, 0.05, 0.01]]))
    assert np.allclose(kl_top_k(logp, logp), 0)


def test_a_damaged_artifact_scores_worse(evaluation: tuple[dict, Path], tiny_model: Path, tmp_path: Path) -> None:
    """Another checkpoint's GGUF (same shapes and tokenizer) in the model's place: far from the float model."""
    from qwenrt.convert.pipeline import convert

    report, _ = evaluation
    other = build_tiny_qwen2(tmp_path / "other-checkpoint", seed=7)
    converted = convert(str(other), tmp_path / "other-model", formats=(GGUF_KEY,), log=lambda line: None)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    shutil.copyfile(artifact_files(converted.out_dir, GGUF_KEY)[0], artifact_files(damaged, GGUF_KEY)[0])
    spec = EvalSpec(str(damaged), "english", CONTEXT, BUDGET, 1)
    result = evaluate(spec, ["gguf"])
    (entry,) = result["engines"]
    healthy = next(e for e in report["engines"] if e["engine"] == "gguf")["quality"]
    assert entry["quality"]["kl_mean"] > 10 * healthy["kl_mean"]
    assert entry["quality"]["perplexity"] > healthy["perplexity"]
    assert entry["quality"]["same_top_share"] < healthy["same_top_share"]


def test_a_second_eval_uses_the_cached_reference(evaluation: tuple[dict, Path], tiny_model: Path) -> None:
    report, _ = evaluation
    started = time.monotonic()
    again = evaluate(EvalSpec(str(tiny_model), "english", CONTEXT, BUDGET, 1), [])
    assert again["reference"]["cached"] and not report["reference"]["cached"]
    assert again["reference"]["perplexity"] == report["reference"]["perplexity"]
    assert time.monotonic() - started < 30


def test_set_reaches_the_engines_that_have_the_setting_and_the_report_says_so(evaluation: tuple[dict, Path],
                                                                              tiny_model: Path) -> None:  # fmt: skip
    from qwenrt.eval.report import render_terminal

    spec = EvalSpec(str(tiny_model), "english", CONTEXT, BUDGET, 1, settings={"KV_CACHE_PRECISION": "f16"})
    report = evaluate(spec, ["openvino", "gguf"])
    engines = {entry["engine"]: entry for entry in report["engines"]}
    assert engines["openvino"]["settings"]["KV_CACHE_PRECISION"] == {"value": "f16", "effective": "f16",
                                                                     "origin": "command line"}  # fmt: skip
    assert "KV_CACHE_PRECISION" not in engines["gguf"]["settings"]
    assert "settings of openvino: threads=1 [command line], INFERENCE_PRECISION_HINT=" in render_terminal(report)
    assert 'KV_CACHE_PRECISION="f16" [command line]' in render_terminal(report)


def test_the_named_corpora_exist_offline_and_a_file_works_too(tmp_path: Path) -> None:
    for name in NAMED:
        text = corpus(name)
        assert len(text.text) > 50_000 and len(text.sha256) == 64
        assert corpus(name).sha256 == text.sha256  # the same text every time
    mine = tmp_path / "mine.txt"
    mine.write_text("天地玄黄，宇宙洪荒。" * 50, encoding="utf-8")
    assert corpus(str(mine)).name == "mine.txt"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--corpus", "nowhere.txt"], "no such corpus"), (["--context", "8"], "--context"),
     (["--runtimes", "nothing"], "unknown runtime"),
     (["--runtimes", "gguf", "--set", "KV_CACHE_PRECISION=f16"], "no engine evaluated has such a setting")],
)  # fmt: skip
def test_bad_eval_options_are_one_line_errors(tiny_model: Path, args: list[str], message: str) -> None:
    result = subprocess.run([*QWENRT, "eval", "--model", str(tiny_model), *args], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenrt: error:") and message in lines[0], result.stderr


def test_compare_quality_adds_each_artifact_s_distance_from_the_float_model(tiny_model: Path, tmp_path: Path) -> None:
    import jsonschema

    out = tmp_path / "r.json"
    result = subprocess.run([*QWENRT, "compare", "--model", str(tiny_model), "--threads", "1", "--max-tokens", "8",
                             "--repeat", "1", "--warmup", "0", "--quality", "--json", str(out)],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    schema = json.loads((Path(__file__).parent.parent / "qwenrt" / "compare" / "schema.json").read_text())
    jsonschema.validate(data, schema)
    for cell in data["cells"]:
        assert cell["quality"]["kl_mean"] >= 0 and 0 < cell["quality"]["same_top_share"] <= 1
    assert data["quality"]["corpus"]["name"] == "english"
    assert "KL from the float model, mean" in result.stdout and "top token = the float model's (%)" in result.stdout
    plain = subprocess.run([*QWENRT, "compare", "--model", str(tiny_model), "--threads", "1", "--max-tokens", "8",
                            "--repeat", "1", "--warmup", "0"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert "KL from the float model" not in plain.stdout  # no such rows without --quality
