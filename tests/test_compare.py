"""qwenrt compare, end to end, on real engines: cells in fresh processes, every output format."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import psutil
import pytest
from conftest import QWENRT
from helpers import make_cell
from tiny_model import build_tiny_qwen2

from qwenrt.compare import report
from qwenrt.compare.ceiling import decode_bytes_per_token
from qwenrt.compare.runner import agreement
from qwenrt.compare.stats import percentile, summarise
from qwenrt.runtimes.threads import physical_cores

SCHEMA = json.loads((Path(__file__).parent.parent / "qwenrt" / "compare" / "schema.json").read_text())


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bigger than the tiny model, so that a repetition lasts long enough to measure CPU
    time, and with a context that holds the ~512-token long scenario."""
    from qwenrt.convert.pipeline import convert

    checkpoint = build_tiny_qwen2(tmp_path_factory.mktemp("small-checkpoint"), layers=4, hidden=512, context=2048)
    out = tmp_path_factory.mktemp("small-model") / "model"
    convert(str(checkpoint), out, log=lambda line: None)
    return out


def run_compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QWENRT, "compare", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def comparison(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compare-out")
    result = run_compare(
        "--model", str(small_model), "--threads", "1,2", "--scenario", "short,long", "--max-tokens", "96",
        "--repeat", "3", "--warmup", "1", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
        "--markdown", str(out / "r.md"), "--plot", str(out / "r.png"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads((out / "r.json").read_text()), out


def ok_cells(data: dict, **where: object) -> list[dict]:
    return [c for c in data["cells"] if c["status"] == "ok" and all(c[k] == v for k, v in where.items())]


def test_every_cell_measured_and_json_matches_schema(comparison: tuple[dict, Path]) -> None:
    data, _ = comparison
    jsonschema.validate(data, SCHEMA)
    cells = {(c["runtime"], c["threads"], c["scenario"]) for c in ok_cells(data)}
    assert cells == {(r, t, s) for r in ("gguf", "openvino") for t in (1, 2) for s in ("short", "long")}
    for cell in ok_cells(data):
        assert cell["generated_tokens"] == 96  # end of sequence ignored: exactly max tokens
        assert cell["first_token_s"]["n"] == 3
        assert cell["decode_tps"]["median"] > 0
        assert cell["peak_rss_bytes"] >= cell["rss_after_load_bytes"] > 0
        # Linux splits what is resident now into private and file-backed memory (the mapped artifact).
        assert cell["rss_private_bytes"] > 0 and cell["rss_file_backed_bytes"] > 0
        assert cell["rss_private_bytes"] + cell["rss_file_backed_bytes"] <= cell["peak_rss_bytes"]
        assert cell["artifact_bytes"] > 0


def test_each_cell_is_set_against_its_bandwidth_ceiling(comparison: tuple[dict, Path], small_model: Path) -> None:
    data, _ = comparison
    read = decode_bytes_per_token(small_model)
    assert set(data["memory_bandwidth_bytes_per_s"]) == {"1", "2"}
    for cell in ok_cells(data):
        ceiling = cell["decode_ceiling"]
        bandwidth = data["memory_bandwidth_bytes_per_s"][str(cell["threads"])]
        assert ceiling["bytes_per_token"] == read[cell["runtime"]]
        assert ceiling["memory_bandwidth_bytes_per_s"] == bandwidth
        assert ceiling["ceiling_tps"] == pytest.approx(bandwidth / read[cell["runtime"]])
        assert ceiling["share"] == pytest.approx(cell["decode_tps"]["median"] / ceiling["ceiling_tps"])
    text = report.render_terminal(report.from_json(data))
    assert "decode, % of its ceiling" in text and "memory read bandwidth" in text
    assert "decode, % of its ceiling" in (comparison[1] / "r.md").read_text()


# Run in a fresh process, whose peak starts afresh: the cell's own, then a second engine's
# stand-in (300 MB written, so resident) where the cached first token is measured.
PEAK_PROBE = """
import json, sys
from qwenrt import procfs
from qwenrt.compare import measure

def second_engine(*args):
    held = b"\\x01" * (300 * 2**20)
    return float(len(held) > 0)

measure._cached_first_token = second_engine
cell = measure.run_cell(measure.CellSpec(runtime=sys.argv[1], model_dir=sys.argv[2], threads=1, max_tokens=8,
                                         repeat=1, warmup=0))
print(json.dumps({"cell_peak": cell.peak_rss_bytes, "process_peak": procfs.peak_rss_bytes()}))
"""


@pytest.mark.parametrize("runtime", ["gguf", "openvino"])
def test_a_cells_peak_memory_leaves_out_what_the_cached_first_token_opens(tiny_model: Path, runtime: str) -> None:
    """The cached first token is measured on a second engine, opened in the same process
    after the cell's own is closed; what that one holds is not the cell's engine's peak."""
    run = subprocess.run([sys.executable, "-c", PEAK_PROBE, runtime, str(tiny_model)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    assert peaks["process_peak"] - peaks["cell_peak"] > 250 * 2**20


def test_cells_run_in_separate_processes(comparison: tuple[dict, Path]) -> None:
    data, _ = comparison
    pids = [c["pid"] for c in ok_cells(data)]
    assert len(set(pids)) == len(pids)


def test_engines_get_the_same_prompt_ids(comparison: tuple[dict, Path]) -> None:
    data, _ = comparison
    for row in data["agreement"]:
        assert row["same_prompt_ids"], row
        assert 0.0 <= row["identical_token_share"] <= 1.0
    assert len(data["agreement"]) == 4  # one per (scenario, threads)


def test_threads_show_as_cores_of_cpu_time(comparison: tuple[dict, Path]) -> None:
    data, _ = comparison
    for runtime in ("gguf", "openvino"):
        one = ok_cells(data, runtime=runtime, threads=1, scenario="long")[0]["cpu"]["cores_used"]["median"]
        two = ok_cells(data, runtime=runtime, threads=2, scenario="long")[0]["cpu"]["cores_used"]["median"]
        assert 0.6 < one < 1.35, (runtime, one)
        assert two > 1.3, (runtime, two)
        assert ok_cells(data, runtime=runtime, threads=1, scenario="long")[0]["settings"]


def test_cold_first_token_is_cold(comparison: tuple[dict, Path]) -> None:
    """On the long prompt, the reported first token pays for the whole prompt; the same
    prompt with the cache on (reported beside it) is several times faster."""
    data, _ = comparison
    for cell in ok_cells(data, scenario="long"):
        assert cell["prompt_tokens"] > 400
        assert cell["first_token_cached_s"] * 2 < cell["first_token_s"]["min"], cell["runtime"]


def test_every_output_format_is_readable(comparison: tuple[dict, Path]) -> None:
    data, out = comparison
    rows = list(csv.DictReader((out / "r.csv").open()))
    assert {row["runtime"] for row in rows} == {"gguf", "openvino"}
    assert any(row["metric"] == "decode (tok/s)" and float(row["value"]) > 0 for row in rows)
    markdown = (out / "r.md").read_text()
    assert "| metric" in markdown and "decode (tok/s)" in markdown and "scenario long" in markdown
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_terminal_report_marks_best_and_speaks_in_words(comparison: tuple[dict, Path]) -> None:
    data, _ = comparison
    text = report.render_terminal(report.from_json(data))
    assert "◀" in text
    assert "decode" in text and "×" in text
    assert "agreement gguf vs openvino" in text


def test_failed_cell_is_reported_and_others_still_run(small_model: Path, tmp_path: Path) -> None:
    """The OpenVINO model is damaged; the GGUF cell still runs and the failure is a row."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(small_model, broken)
    xml = broken / "openvino-int8" / "openvino_model.xml"
    xml.write_text(xml.read_text()[:2000])
    result = run_compare(
        "--model", str(broken), "--max-tokens", "8", "--repeat", "1", "--json", str(tmp_path / "r.json")
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    statuses = {c["runtime"]: c["status"] for c in data["cells"]}
    assert statuses == {"gguf": "ok", "openvino": "failed"}
    assert "FAILED openvino" in result.stdout

    # In rounds, a cell that failed is not run again; the others' rounds still pool.
    result = run_compare("--model", str(broken), "--max-tokens", "8", "--repeat", "1", "--warmup", "0",
                         "--rounds", "3", "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Progress lines start with the turn: the failed cell (which prints none) took turn 2 only,
    # and the count of turns drops by the two it will not take.
    turns = [line.split("]")[0] for line in result.stderr.splitlines() if line.startswith("[")]
    assert turns == ["[1/6", "[3/4", "[4/4"], result.stderr
    cells = {c["runtime"]: c for c in json.loads((tmp_path / "r.json").read_text())["cells"]}
    assert cells["openvino"]["status"] == "failed" and cells["gguf"]["rounds"] == 3


def test_rounds_take_turns_in_fresh_processes_and_pool_their_repetitions(tiny_model: Path, tmp_path: Path) -> None:
    """compare --rounds: every cell measured once per round, each time in a fresh process, the
    engines taking turns in an order that rotates; a cell's figures pool its rounds' repetitions."""
    out = tmp_path / "r.json"
    result = run_compare("--model", str(tiny_model), "--threads", "1", "--max-tokens", "8", "--repeat", "2",
                         "--warmup", "0", "--rounds", "3", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    turns = [line.split("] ")[1].split(" ×")[0] for line in result.stderr.splitlines() if line.startswith("[")]
    assert turns == ["gguf", "openvino", "openvino", "gguf", "gguf", "openvino"]
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["settings"]["rounds"] == 3
    for cell in ok_cells(data):
        assert cell["rounds"] == 3 and cell["repeat"] == 6 and cell["first_token_s"]["n"] == 6
        firsts = [sample["first_token_s"] for sample in cell["samples"]]
        assert len(firsts) == 6 and cell["first_token_s"]["median"] == pytest.approx(summarise(firsts)["median"])
        assert cell["peak_rss_bytes"] >= cell["rss_after_load_bytes"] > 0
    assert len(ok_cells(data)) == 2
    assert "6 repetitions in 3 interleaved rounds" in result.stdout
    # Each engine's figures round by round, so a reader sees whether the machine's speed moved.
    by_round = next(line for line in result.stdout.splitlines() if line.startswith("by round: "))
    for engine in ("gguf ×1", "openvino ×1"):
        assert by_round.count(engine) == 2  # decode and first token
    assert by_round.count(" / ") == 2 * 2 * 2 and ("steady" in by_round or "moved" in by_round)


def test_round_medians_split_the_pooled_samples_by_round() -> None:
    samples = [{"decode_tps": tps, "first_token_s": 0.05} for tps in (10.0, 12.0, 30.0, 32.0, 20.0, 22.0)]
    cell = make_cell(rounds=3, repeat=6, samples=samples)
    assert cell.round_medians("decode_tps") == [11.0, 31.0, 21.0]
    assert "moved between rounds (decode by up to 95%)" in report.rounds_line([cell])
    steady = make_cell(rounds=2, repeat=2, samples=[{"decode_tps": 10.0}, {"decode_tps": 10.5}])
    assert steady.round_medians("prefill_tps") is None  # no repetition has it
    assert report.rounds_line([steady]).endswith("steady between rounds")
    assert make_cell().round_medians("decode_tps") is None and report.rounds_line([make_cell()]) is None
    assert make_cell(rounds=3, samples=[]).round_medians("decode_tps") is None  # a report without samples


def test_next_conversation_scenario_holds_the_conversation_before(tiny_model: Path, tmp_path: Path) -> None:
    """The next-conversation scenario runs on both engines with their prefix caches on, and
    the report says what was cached before each measured prompt."""
    out = tmp_path / "r.json"
    result = run_compare("--model", str(tiny_model), "--threads", "1", "--scenario", "next-conversation",
                         "--max-tokens", "8", "--repeat", "2", "--warmup", "0", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    cells = ok_cells(data, scenario="next-conversation")
    assert {cell["runtime"] for cell in cells} == {"gguf", "openvino"}
    for cell in cells:
        assert cell["settings"]["prefix_cache"] is True and cell["first_token_cached_s"] is None
        # How much of the prompt an engine took from its cache is its own: no prefill speed, no verdict on it.
        assert cell["prefill_tps"] is None and all(sample["prefill_tps"] is None for sample in cell["samples"])
    assert "the conversation before cached (it shares the system prompt)" in result.stdout
    verdict = next(line for line in result.stdout.splitlines() if line.lstrip("- ").startswith("next-conversation"))
    assert "first token" in verdict and "prefill" not in verdict


def test_a_scenario_that_caches_a_conversation_must_say_so() -> None:
    """A scenario with a previous conversation and the default "cold prompt" label would
    pass a cache hit off as a cold prefill: it cannot be built."""
    from qwenrt.compare.scenarios import SCENARIOS, Scenario

    turn = ({"role": "user", "content": "hello"},)
    with pytest.raises(ValueError, match="say what it caches"):
        Scenario("mislabelled", "a second turn", turn, previous=turn)
    assert all(s.cached != "cold prompt" for s in SCENARIOS.values() if s.previous)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "threads must be 1 or more"),
        (["--threads", "x"], "comma-separated whole numbers"),
        (["--prompt", "  "], "prompt is empty"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found"),
        (["--scenario", "nope"], "unknown scenario"),
        (["--runtimes", "onnx"], "unknown runtime"),
        (["--ladder", "--huge-pages", "--threads", "1"], "drop --threads, --huge-pages or leave out --ladder"),
        (["--rounds", "0"], "--repeat and --rounds of 1 or more"),
    ],
)
def test_bad_options_give_one_line_errors(small_model: Path, args: list[str], message: str) -> None:
    result = run_compare("--model", str(small_model), *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenrt: error:") and message in lines[0], result.stderr


def test_prompt_file_that_is_not_utf8(small_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    result = run_compare("--model", str(small_model), "--prompt-file", str(bad))
    assert result.returncode != 0 and "not UTF-8" in result.stderr


def test_statistics() -> None:
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([10, 20], 0.9) == pytest.approx(19)
    summary = summarise([3.0, 1.0, 2.0])
    assert summary is not None
    assert (summary["median"], summary["min"], summary["max"], summary["n"]) == (2.0, 1.0, 3.0, 3)
    assert summarise([]) is None


def test_agreement_counts_identical_tokens() -> None:
    cells = [make_cell(runtime="gguf", token_ids=[1, 2, 3, 4]), make_cell(runtime="openvino", token_ids=[1, 2, 9, 4]),
             make_cell(runtime="openvino", token_ids=[5, 6, 7, 8], engine_defaults=True)]  # fmt: skip
    (row,) = agreement(cells)  # an engine at its own defaults is no engine to agree with
    assert row["identical_token_share"] == 0.75
    assert row["first_difference"] == 2


@pytest.mark.real_weights
def test_short_scenario_on_the_demo_model(demo_model: Path, tmp_path: Path) -> None:
    result = run_compare("--model", str(demo_model), "--max-tokens", "64", "--repeat", "2",
                         "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert {c["runtime"] for c in ok_cells(data)} == {"gguf", "openvino"}
    for cell in ok_cells(data):
        assert cell["decode_tps"]["median"] > 1
        assert cell["prompt_tokens"] > 20
    (row,) = data["agreement"]
    assert row["same_prompt_ids"]
    print(result.stdout)


def test_ladder_reproduces_the_write_ups_steps(small_model: Path, tmp_path: Path) -> None:
    result = run_compare("--model", str(small_model), "--ladder", "--max-tokens", "24", "--repeat", "1",
                         "--json", str(tmp_path / "l.json"), "--markdown", str(tmp_path / "l.md"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "l.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["kind"] == "ladder"
    cells = data["cells"]
    assert [c["status"] for c in cells] == ["ok"] * 6
    assert [c["runtime"] for c in cells] == ["transformers", "gguf", "gguf", "gguf", "openvino", "openvino"]
    # The float step really is float, the 8-bit step 8-bit, and the batch step generates two answers.
    assert cells[1]["settings"]["artifact"].endswith("-f16.gguf")
    assert cells[3]["settings"]["artifact"].endswith("-q8_0.gguf")
    assert cells[5]["batch"] == 2 and cells[5]["generated_tokens"] == 48
    # A ceiling where the bytes a token reads are known: not for transformers, nor for a
    # batch, which reads the weights once for two sequences.
    assert ["decode_ceiling" in cell for cell in cells] == [False, True, True, True, True, False]
    # "Its default threads" are llama-cpp-python's, half the logical CPUs; the next step sets the cores.
    logical = psutil.cpu_count(logical=True)
    assert cells[1]["settings"]["threads"] == max(1, logical // 2)
    assert cells[2]["settings"]["threads"] == physical_cores()
    text = result.stdout
    assert "gain" in text and "1.00×" in text and "batch 2" in text
    assert "| step" in (tmp_path / "l.md").read_text()


def test_the_cell_records_and_the_schema_name_the_same_fields() -> None:
    """compare's cells are typed records; the JSON schema documents exactly their fields."""
    from dataclasses import fields

    from qwenrt.compare.cells import Cell, FailedCell

    definitions = SCHEMA["$defs"]
    assert {f.name for f in fields(Cell)} == set(definitions["ok_cell"]["properties"])
    assert set(definitions["ok_cell"]["required"]) <= {f.name for f in fields(Cell)}
    assert {f.name for f in fields(FailedCell)} == set(definitions["failed_cell"]["properties"])
    jsonschema.validate(make_cell().to_json(), {**SCHEMA, **definitions["ok_cell"]})
