"""One place defines an engine: a throw-away one, registered from here, shows up everywhere an engine does.

``throwaway_engine`` (beside this file) is llama.cpp again under another name. Named in
``QWENRT_ENGINES``, it must appear in the command line's choices, in a comparison with a
cell and verdicts of its own, in tune's plan and in the engine conformance tests, with no
other file changed: everything asks the registry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import QWENRT, REPO

from qwenrt.runtimes import EXTRA_ENGINES, converted_engine_names, engine_class, engine_names

TESTS = Path(__file__).resolve().parent
COPY = "gguf-copy"


def with_copy() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, EXTRA_ENGINES: "throwaway_engine", "PYTHONPATH": path}


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QWENRT, *args], capture_output=True, text=True, timeout=timeout, env=with_copy())


def test_the_command_line_offers_a_registered_engine_and_chats_with_it(tiny_model: Path) -> None:
    help_text = run("chat", "--help").stdout
    assert COPY in help_text and "registry test" in help_text
    answers = {}
    for runtime in ("gguf", COPY, "copy"):  # "copy" is its alias
        result = run("chat", "--runtime", runtime, "--model", str(tiny_model), "--threads", "1", "-p", "Hello",
                     "--max-tokens", "8")  # fmt: skip
        assert result.returncode == 0, result.stderr
        answers[runtime] = result.stdout
    assert answers["gguf"] == answers[COPY] == answers["copy"]  # the same engine, greedy


def test_compare_gives_a_registered_engine_its_cell_ceiling_and_verdicts(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = run("compare", "--model", str(tiny_model), "--runtimes", f"gguf,{COPY},openvino", "--max-tokens", "8",
                 "--repeat", "1", "--warmup", "0", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    cells = {cell["runtime"]: cell for cell in data["cells"]}
    assert set(cells) == {"gguf", COPY, "openvino"} and all(c["status"] == "ok" for c in cells.values())
    assert cells[COPY]["decode_ceiling"]["bytes_per_token"] == cells["gguf"]["decode_ceiling"]["bytes_per_token"]
    assert "llama-cpp-python" in data["environment"]["versions"]
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("short, ")]
    assert len(verdicts) == 1
    for engine in ("gguf", COPY, "openvino"):  # every engine in the verdicts, not the first two
        assert engine in verdicts[0]
    assert f"agreement gguf vs {COPY}" in result.stdout


def test_tune_plans_a_registered_engine(tiny_model: Path) -> None:
    result = run("tune", "--model", str(tiny_model), "--runtimes", COPY, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"{COPY} (llama-cpp-python" in result.stdout and "extra_buffer_types" in result.stdout


def test_the_conformance_tests_run_a_registered_engine() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not real_weights",
         str(TESTS / "test_runtimes.py"), "-k", COPY],
        capture_output=True, text=True, timeout=1200, env=with_copy(), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed >= 10, result.stdout[-2000:]


def test_without_the_variable_only_qwenrt_s_engines_are_registered() -> None:
    assert COPY not in engine_names()
    assert converted_engine_names() == ["gguf", "openvino"]
    assert engine_class("llama.cpp") is engine_class("gguf") and engine_class("ov") is engine_class("openvino")


def test_an_engine_module_that_cannot_be_imported_is_a_one_line_error() -> None:
    result = subprocess.run([*QWENRT, "chat", "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, EXTRA_ENGINES: "no_such_engine_module"})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qwenrt: error: QWENRT_ENGINES names 'no_such_engine_module', which cannot be imported "
        "(No module named 'no_such_engine_module')"
    ]


def test_the_readme_lists_every_engine() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- engines -->")[1]  # the table between the two markers
    for name in engine_names():
        engine = engine_class(name)
        assert f"| `{name}` | {engine.description} |" in table, name
