"""Reliability: every bad input gets one clear line, nothing is half-written, no engine crash takes qwenrt down.

Each case runs the real command line (``python -m qwenrt.cli``) on the tiny model or
on small files crafted from its GGUF, with the real engines. Cases already covered
elsewhere are not repeated here: the conversion's source errors and the killed
conversion (test_convert.py), the chat's bad requests and its Ctrl-C
(test_chat.py), a damaged IR in a comparison and the compare prompt-file basics
(test_compare.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest
from helpers import snapshot, staging_folders
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenrt.errors import ArtifactError
from qwenrt.gguf_check import check_gguf, read_layout
from qwenrt.manifest import GGUF_KEY, OPENVINO_DIR, read_manifest
from qwenrt.runtimes import threads as thread_rules
from qwenrt.runtimes.threads import ThreadPlan, available_cpus

QWENRT = [sys.executable, "-m", "qwenrt.cli"]
LOGICAL_CPUS = len(available_cpus())
V = gguf.GGUFValueType


# --- helpers ----------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | bytes | None = None, timeout: float = 300, **popen: object):
    """Run qwenrt; ``stdin`` None means no input at all (not a terminal, nothing piped)."""
    return subprocess.run(
        [*QWENRT, *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        timeout=timeout,
        **popen,
    )


def error_line(result: subprocess.CompletedProcess, *, alone: bool = True) -> str:
    """The one ``qwenrt: error:`` line of a failed run; ``alone``: nothing else on stderr."""
    stdout, stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode not in (0, None), stderr
    assert result.returncode > 0, f"killed by signal {-result.returncode}: {stderr[-2000:]}"
    assert "Traceback" not in stderr + stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("qwenrt: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    if alone:
        assert len(lines) == 1, stderr
    return errors[0]


def gguf_of(model_dir: Path) -> Path:
    return model_dir / read_manifest(model_dir)["artifacts"][GGUF_KEY]["path"]


def copy_model(tiny_model: Path, to: Path, *, without: str | None = None) -> Path:
    shutil.copytree(tiny_model, to)
    if without == "openvino":
        shutil.rmtree(to / OPENVINO_DIR)
    elif without == "gguf":
        gguf_of(to).unlink()
    return to


def rewrite_gguf(
    source: Path,
    target: Path,
    *,
    arch: str = "qwen2",
    set_kv: dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]] | None = None,
    drop_keys: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
) -> Path:
    """Write ``source`` again with the gguf package's writer, changed as asked."""
    set_kv = set_kv or {}
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch)
    for name, item in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys or name in set_kv:
            continue
        sub_type = item.types[-1] if item.types[0] == V.ARRAY else None
        writer.add_key_value(name, item.contents(), item.types[0], sub_type=sub_type)
    for name, (value, value_type, sub_type) in set_kv.items():
        writer.add_key_value(name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name not in drop_tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def duplicate_token(source: Path, target: Path) -> Path:
    """The GGUF with one token's text made equal to another's, at the same file size."""
    layout = read_layout(source)
    try:
        tokens = layout.strings("tokenizer.ggml.tokens")
        item = layout.fields["tokenizer.ggml.tokens"]
    finally:
        layout.close()
    # Two distinct tokens of the same length: the second's bytes become the first's.
    by_length: dict[int, int] = {}
    for index, text in enumerate(tokens):
        if len(text) > 1 and len(text) in by_length:
            first, second = by_length[len(text)], index
            break
        by_length.setdefault(len(text), index)
    offset = item.offset + sum(8 + len(t) for t in tokens[:second]) + 8
    data = bytearray(source.read_bytes())
    data[offset : offset + len(tokens[second])] = tokens[first]
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model: Path) -> Path:
    return gguf_of(tiny_model)


@pytest.fixture(scope="module")
def crafted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small damaged GGUFs, each made from the tiny model's (118 KB) in one way."""
    folder = tmp_path_factory.mktemp("crafted-gguf")
    data = tiny_gguf.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "bad-magic": b"GGML" + data[4:],
        "bad-version": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "empty": b"",
    }
    out = {name: folder / f"{name}.gguf" for name in files}
    for name, content in files.items():
        out[name].write_bytes(content)
    out["wrong-architecture"] = rewrite_gguf(tiny_gguf, folder / "wrong-architecture.gguf", arch="llama")
    out["missing-tensor"] = rewrite_gguf(
        tiny_gguf, folder / "missing-tensor.gguf", drop_tensors=("blk.1.ffn_down.weight",)
    )
    tokenizer_keys = tuple(key for key in gguf.GGUFReader(tiny_gguf).fields if key.startswith("tokenizer."))
    out["missing-tokenizer"] = rewrite_gguf(tiny_gguf, folder / "missing-tokenizer.gguf", drop_keys=tokenizer_keys)
    # The metadata's FFN width disagrees with the FFN tensors' shapes.
    out["shape-mismatch"] = rewrite_gguf(
        tiny_gguf, folder / "shape-mismatch.gguf", set_kv={"qwen2.feed_forward_length": (256, V.UINT32, None)}
    )
    out["duplicate-token"] = duplicate_token(tiny_gguf, folder / "duplicate-token.gguf")
    out["huge-block-count"] = rewrite_gguf(
        tiny_gguf, folder / "huge-block-count.gguf", set_kv={"qwen2.block_count": (10_289_154, V.UINT32, None)}
    )
    return out


# Case: (what the error line must say, whether test_convert.py already runs it as a convert source).
GGUF_CASES = {
    "truncated": ("truncated GGUF", True),
    "bad-magic": ("not a GGUF file (bad magic", True),
    "bad-version": ("unsupported GGUF version 7", False),
    "empty": ("not a GGUF file", False),
    "wrong-architecture": ("architecture 'llama' is not qwen2", True),
    "missing-tensor": ("missing tensors blk.1.ffn_down.weight", False),
    "missing-tokenizer": ("metadata lacks tokenizer.ggml.model, tokenizer.ggml.tokens", False),
    "shape-mismatch": ("tensor blk.0.ffn_gate.weight has shape [64, 128], the metadata says [64, 256]", False),
    "duplicate-token": ("are the same text", False),
    "huge-block-count": ("the metadata says 10289154 blocks", False),
}


# --- the model folder -------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_compare_without_a_model_says_how_to_make_one(folder: str, tmp_path: Path) -> None:
    # The chat's own cases are in test_chat.py; a comparison must give the same way out.
    model = tmp_path / "model"
    if folder == "empty":
        model.mkdir()
    line = error_line(run_cli("compare", "--model", str(model)))
    assert str(model) in line and "qwenrt convert demo" in line


def test_folder_with_only_the_gguf_still_chats_on_llama_cpp(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "model", without="openvino")
    done = run_cli("chat", "--runtime", "gguf", "--model", str(model), "--max-tokens", "6", "-p", "Hello fox")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()

    line = error_line(run_cli("chat", "--runtime", "openvino", "--model", str(model), "-p", "Hello fox"))
    assert "no OpenVINO model" in line and "qwenrt convert" in line
    # A comparison of both names the missing engine and the way to compare the other alone.
    line = error_line(run_cli("compare", "--model", str(model)))
    assert "no OpenVINO model" in line and "--runtimes gguf" in line
    done = run_cli("compare", "--model", str(model), "--runtimes", "gguf", "--threads", "1", "--max-tokens", "4",
                   "--repeat", "1", "--warmup", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_folder_with_only_the_openvino_model_still_chats_on_openvino(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "model", without="gguf")
    done = run_cli("chat", "--runtime", "openvino", "--model", str(model), "--max-tokens", "6", "-p", "Hello fox")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    line = error_line(run_cli("chat", "--runtime", "gguf", "--model", str(model), "-p", "Hello fox"))
    assert "no GGUF model" in line and "qwenrt convert" in line


# --- damaged GGUF files -----------------------------------------------------------------


@pytest.mark.parametrize("case", GGUF_CASES)
def test_damaged_gguf_is_refused_before_llama_cpp_sees_it(case: str, crafted: dict[str, Path], tmp_path: Path) -> None:
    message, convert_tested_elsewhere = GGUF_CASES[case]
    path = crafted[case]
    line = error_line(run_cli("chat", "--runtime", "gguf", "--model", str(path), "--threads", "1", "-p", "Hello"))
    assert str(path) in line and message in line, line

    if convert_tested_elsewhere:
        return
    out = tmp_path / "out"
    cache = Path(os.environ["QWENRT_HOME"]) / "downloads" / "dequantised"
    cached = set(cache.iterdir()) if cache.is_dir() else set()
    line = error_line(run_cli("convert", str(path), "--out", str(out)))
    assert message in line, line
    assert not out.exists() and not staging_folders(out)
    assert (set(cache.iterdir()) if cache.is_dir() else set()) == cached, "nothing dequantised into the cache"


@pytest.mark.parametrize("case", ["duplicate-token", "huge-block-count"])
def test_files_that_abort_llama_cpp_are_refused_by_the_check(case: str, crafted: dict[str, Path]) -> None:
    """llama-cpp-python 0.3.36 kills the whole process (GGML_ASSERT, SIGABRT) on these two:
    a vocabulary with a repeated token, a block count far beyond the tensors. Nothing
    Python can catch; only checking the file first keeps qwenrt alive."""
    path = crafted[case]
    direct = subprocess.run(
        [sys.executable, "-c", "import sys; from llama_cpp import Llama; Llama(sys.argv[1], n_ctx=64, verbose=False)",
         str(path)],
        capture_output=True, text=True, timeout=120, preexec_fn=no_core_dumps,
    )  # fmt: skip
    assert direct.returncode != 0, "llama.cpp accepted a damaged file"
    with pytest.raises(ArtifactError, match=GGUF_CASES[case][0]):
        check_gguf(path)


def test_gguf_damaged_in_place_is_checked_despite_its_recorded_size(tiny_model: Path, tmp_path: Path) -> None:
    """The check before every load does not trust the manifest: a file of the recorded size
    but damaged bytes (here, a token that would make llama.cpp abort) is still refused."""
    model = copy_model(tiny_model, tmp_path / "model")
    target = gguf_of(model)
    recorded = read_manifest(model)["artifacts"][GGUF_KEY]["files"][0]["size"]
    duplicate_token(gguf_of(tiny_model), target)
    assert target.stat().st_size == recorded
    line = error_line(run_cli("chat", "--runtime", "gguf", "--model", str(model), "--threads", "1", "-p", "Hello"))
    assert "are the same text" in line


# --- damaged OpenVINO folders -------------------------------------------------------------


def _remove(name: str):
    return lambda ir: (ir / name).unlink()


def _truncate(name: str, keep: int | None = None):
    def cut(ir: Path) -> None:
        data = (ir / name).read_bytes()
        (ir / name).write_bytes(data[: keep if keep is not None else len(data) // 2])

    return cut


OPENVINO_CASES = {
    "no-weights": (_remove("openvino_model.bin"), "missing openvino_model.bin (the model weights)"),
    "no-tokenizer": (_remove("openvino_tokenizer.xml"), "missing openvino_tokenizer.xml (the tokenizer IR)"),
    "no-detokenizer": (_remove("openvino_detokenizer.xml"), "missing openvino_detokenizer.xml (the detokenizer IR)"),
    "damaged-xml": (_truncate("openvino_model.xml", 2000), "OpenVINO could not load the model"),
    "truncated-weights": (_truncate("openvino_model.bin"), "OpenVINO could not load the model"),
    "truncated-tokenizer-weights": (_truncate("openvino_tokenizer.bin"), "OpenVINO could not load the model"),
}


@pytest.mark.parametrize("case", OPENVINO_CASES)
def test_damaged_openvino_folder_is_one_line(case: str, tiny_model: Path, tmp_path: Path) -> None:
    damage, message = OPENVINO_CASES[case]
    model = copy_model(tiny_model, tmp_path / "model")
    damage(model / OPENVINO_DIR)
    line = error_line(run_cli("chat", "--runtime", "openvino", "--model", str(model), "--threads", "1", "-p", "Hi"))
    assert str(model / OPENVINO_DIR) in line and message in line, line
    # The other engine is not affected.
    done = run_cli("chat", "--runtime", "gguf", "--model", str(model), "--max-tokens", "4", "-p", "Hi")
    assert done.returncode == 0, done.stderr


# --- threads, tokens, prompts ------------------------------------------------------------


def test_thread_rule() -> None:
    """The rule (ThreadPlan.resolve): 0 or less is an error; more than the logical CPUs this
    process may use is an error; more than the physical cores is allowed, with a warning."""
    with pytest.raises(Exception, match="threads must be 1 or more, not 0"):
        ThreadPlan.resolve(0)
    with pytest.raises(Exception, match=f"more than the {LOGICAL_CPUS} CPUs"):
        ThreadPlan.resolve(LOGICAL_CPUS + 1)
    assert ThreadPlan.resolve(LOGICAL_CPUS).threads == LOGICAL_CPUS


def test_threads_beyond_the_physical_cores_only_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no hyper-threads, so the warning's branch needs fewer "physical" cores.
    monkeypatch.setattr(thread_rules, "physical_cores", lambda: 1)
    monkeypatch.setattr(thread_rules, "available_cpus", lambda: [0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ThreadPlan.resolve(2).threads == 2
    assert any("exceeds the 1 physical cores" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["chat", "--threads", "-1", "-p", "Hi"], "threads must be 1 or more, not -1"),
        (["chat", "--threads", str(LOGICAL_CPUS + 1), "-p", "Hi"], f"more than the {LOGICAL_CPUS} CPUs"),
        (["compare", "--threads", f"1,{LOGICAL_CPUS + 1}"], f"more than the {LOGICAL_CPUS} CPUs"),
        (["compare", "--threads", "-2"], "threads must be 1 or more, not -2"),
        (["chat", "--max-tokens", "-5", "-p", "Hi"], "max tokens must be at least 1, not -5"),
        (["compare", "--max-tokens", "0"], "need --max-tokens of 2 or more"),
        (["compare", "--max-tokens", "-3"], "need --max-tokens of 2 or more"),
        (["compare", "--timeout", "0"], "--timeout must be more than 0 seconds"),
        (["chat", "--threads", "many", "-p", "Hi"], "Invalid value for '--threads'"),
        (["compare", "--json", "/nonexistent/folder/r.json"], "the folder /nonexistent/folder does not exist"),
    ],
)
def test_bad_numbers_are_one_line_errors(tiny_model: Path, args: list[str], message: str) -> None:
    line = error_line(run_cli(args[0], "--model", str(tiny_model), *args[1:]))
    assert message in line, line


def test_prompt_and_max_tokens_beyond_the_context_window_in_a_comparison(tiny_model: Path, tmp_path: Path) -> None:
    """Every cell fails with the reason; the run ends in one line that says it (the chat's case is in test_chat)."""
    result = run_cli("compare", "--model", str(tiny_model), "--threads", "1", "--max-tokens", "600",
                     "--repeat", "1", "--json", str(tmp_path / "r.json"))  # fmt: skip
    line = error_line(result, alone=False)
    assert "no cell could be measured: prompt of" in line and "exceeds the context window of 512" in line
    assert "lower --max-tokens" in line
    cells = json.loads((tmp_path / "r.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["failed", "failed"]


@pytest.mark.parametrize("case", ["folder", "empty", "blank"])
def test_prompt_file_that_cannot_serve(case: str, tiny_model: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    if case == "folder":
        prompt.mkdir()
    else:
        prompt.write_text("" if case == "empty" else " \n\t\n", encoding="utf-8")
    line = error_line(run_cli("compare", "--model", str(tiny_model), "--prompt-file", str(prompt)))
    assert ("cannot read prompt file" if case == "folder" else "the prompt is empty") in line


@pytest.mark.parametrize("how", ["piped", "argument"])
def test_prompt_that_is_not_utf8(how: str, tiny_model: Path) -> None:
    args = ["chat", "--model", str(tiny_model), "--threads", "1"]
    if how == "piped":
        result = run_cli(*args, stdin=b"caf\xe9 \xff\xfe\n")
    else:
        result = run_cli(*args, "-p", os.fsdecode(b"caf\xe9 \xff"))
    assert "the input is not UTF-8 text" in error_line(result)


def test_debug_shows_the_traceback_wherever_it_is_given(tmp_path: Path) -> None:
    result = run_cli("chat", "--model", str(tmp_path / "none"), "-p", "Hi", "--debug")
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" in stderr and stderr.strip().splitlines()[-1].startswith("qwenrt: error: no model at")


# --- conversion: no space, no permission, Ctrl-C ------------------------------------------


def limited_file_size(limit: int):
    """A full disk, simulated: files may not grow past ``limit`` bytes (writes fail with EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action would kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_no_space_while_writing_the_gguf_leaves_the_model_as_it_was(
    tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "model")
    before = snapshot(model)
    result = run_cli("convert", str(tiny_checkpoint), "--out", str(model), "--format", "gguf", "--force",
                     preexec_fn=limited_file_size(64 * 1024))  # fmt: skip
    line = error_line(result, alone=False)
    assert "no space left" in line and "free some space or choose another --out" in line
    assert snapshot(model) == before
    assert not staging_folders(model)


def test_no_space_while_exporting_openvino_creates_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh" / "model"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = run_cli("convert", str(tiny_checkpoint), "--out", str(out), "--format", "openvino", "--no-verify",
                     env={**os.environ, "TMPDIR": str(scratch)}, preexec_fn=limited_file_size(64 * 1024))  # fmt: skip
    line = error_line(result, alone=False)
    assert "OpenVINO could not write the model" in line and "free some space" in line
    assert not out.exists() and not staging_folders(out)
    assert list(scratch.iterdir()) == [], "the export's scratch files are removed"


def test_out_folder_that_cannot_be_made(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """We run as root, so a read-only folder would not stop us; a file where a folder must be does."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file\n", encoding="utf-8")
    for out in (blocker / "model", blocker / "deeper" / "model"):
        line = error_line(run_cli("convert", str(tiny_checkpoint), "--out", str(out)))
        assert f"{blocker} is a file" in line and "choose another --out" in line
    assert {p.name for p in tmp_path.iterdir()} == {"not-a-folder"}
    assert blocker.read_text(encoding="utf-8") == "a file\n"


def test_ctrl_c_during_a_conversion_removes_its_work(tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "model")
    before = snapshot(model)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([*QWENRT, "convert", str(tiny_checkpoint), "--out", str(model), "--force"],
                                   stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        # Half way: the GGUF is staged and verified, the OpenVINO export has begun.
        while not any((s / OPENVINO_DIR).is_dir() for s in staging_folders(model)):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the OpenVINO export never began"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        # 130, or death by SIGINT, which a shell shows as 130 too: Python ends that way on its own
        # when a library ran the interrupted code through PyRun_* (its "unhandled Ctrl-C" flag).
        assert process.wait(timeout=120) in (130, -signal.SIGINT), log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "qwenrt: interrupted"
    assert not staging_folders(model)
    assert list(scratch.iterdir()) == []
    assert snapshot(model) == before


# --- comparison: crash, hang, Ctrl-C --------------------------------------------------------


@pytest.fixture
def stuck_openvino_model(tiny_model: Path, tmp_path: Path) -> Path:
    """A model whose OpenVINO load never returns: its detokenizer weights are a named pipe
    nobody writes to, as a file on a hung network share would behave."""
    model = copy_model(tiny_model, tmp_path / "model")
    weights = model / OPENVINO_DIR / "openvino_detokenizer.bin"
    weights.unlink()
    os.mkfifo(weights)
    return model


def workers_of(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(process.pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "qwenrt.compare.worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def no_core_dumps() -> None:
    # A crash on purpose must not leave a core file of hundreds of MB in the working folder.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def start_compare(model: Path, out: Path, *args: str) -> subprocess.Popen:
    """qwenrt compare in a session of its own (so that a Ctrl-C can go to its whole group), output to files."""
    with open(out / "stdout.txt", "wb") as stdout, open(out / "stderr.txt", "wb") as stderr:
        return subprocess.Popen(
            [*QWENRT, "compare", "--model", str(model), "--threads", "1", "--max-tokens", "4", "--repeat", "1",
             "--warmup", "0", "--json", str(out / "r.json"), *args],
            stdout=stdout, stderr=stderr, start_new_session=True, preexec_fn=no_core_dumps,
        )  # fmt: skip


def wait_for_worker(process: subprocess.Popen, not_pid: int | None = None, timeout: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [w for w in workers_of(process) if w.pid != not_pid]
        if found:
            return found[0]
        assert process.poll() is None, "the comparison ended before its worker started"
        time.sleep(0.05)
    raise AssertionError("no worker process appeared")


def wait_until_stuck_on_the_pipe(worker: psutil.Process, timeout: float = 60) -> None:
    """Until the worker is blocked opening the named pipe, inside OpenVINO's loader (the kernel's
    wait channel says so; where the kernel hides it, a few seconds after start do)."""
    deadline, fallback = time.monotonic() + timeout, time.monotonic() + 5
    while time.monotonic() < deadline:
        channels = set()
        for task in Path(f"/proc/{worker.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                channels.add((task / "wchan").read_text().strip())
        if "wait_for_partner" in channels or (channels <= {"", "0"} and time.monotonic() > fallback):
            return
        time.sleep(0.1)
    raise AssertionError("the worker never blocked on the named pipe")


def test_a_cell_whose_engine_hangs_times_out_and_the_others_run(stuck_openvino_model: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    process = start_compare(stuck_openvino_model, tmp_path, "--runtimes", "openvino,gguf", "--timeout", "10")
    try:
        assert process.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()
    finally:
        process.kill()
    assert time.monotonic() - started < 60
    cells = {c["runtime"]: c for c in json.loads((tmp_path / "r.json").read_text())["cells"]}
    assert cells["openvino"]["status"] == "failed"
    assert cells["openvino"]["error"] == "timed out after 10 s (the limit per cell, --timeout); stopped"
    assert cells["gguf"]["status"] == "ok"
    assert "FAILED openvino" in (tmp_path / "stdout.txt").read_text()


def test_a_cell_whose_engine_crashes_is_reported_and_the_others_run(stuck_openvino_model: Path, tmp_path: Path) -> None:
    """A native crash inside the engine, made certain: the worker is stuck in OpenVINO's
    loader and receives SIGSEGV there."""
    process = start_compare(stuck_openvino_model, tmp_path, "--runtimes", "openvino,gguf", "--timeout", "300")
    try:
        worker = wait_for_worker(process)
        wait_until_stuck_on_the_pipe(worker)
        worker.send_signal(signal.SIGSEGV)
        assert process.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()
    finally:
        process.kill()
    cells = {c["runtime"]: c for c in json.loads((tmp_path / "r.json").read_text())["cells"]}
    assert cells["openvino"]["status"] == "failed"
    assert cells["openvino"]["error"].startswith("worker crashed inside the engine: SIGSEGV")
    assert cells["gguf"]["status"] == "ok"
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def test_ctrl_c_during_a_comparison_reports_the_cells_finished(stuck_openvino_model: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group, as from a terminal, while the second cell is stuck."""
    process = start_compare(stuck_openvino_model, tmp_path, "--runtimes", "gguf,openvino", "--timeout", "300")
    try:
        first = wait_for_worker(process)
        second = wait_for_worker(process, not_pid=first.pid)  # the first cell is done
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert "interrupted: the cells above are those finished before Ctrl-C" in stdout
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "qwenrt: interrupted after 1 of 2 cells"
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["interrupted"] is True
    assert [(c["runtime"], c["status"]) for c in data["cells"]] == [("gguf", "ok")]


# --- the GGUF checker under random damage -------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_target(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, Path]:
    layout = read_layout(tiny_gguf)
    metadata_end = layout.data_offset  # header, metadata and tensor table end here
    layout.close()
    return tiny_gguf.read_bytes(), metadata_end, tmp_path_factory.mktemp("fuzz") / "sample.gguf"


def checks_cleanly(path: Path, data: bytes) -> None:
    """The property: a result or an ArtifactError, nothing else, and quickly."""
    path.write_bytes(data)
    started = time.perf_counter()
    try:
        info = check_gguf(path)
    except ArtifactError as exc:
        assert str(exc).startswith(str(path)), exc
    else:
        assert info["architecture"] == "qwen2"
    assert time.perf_counter() - started < 2.0


FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = b"GGUF" + (3).to_bytes(4, "little")


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), st.binary(max_size=2048).map(lambda tail: HEADER + tail)))
def test_checker_on_random_bytes(fuzz_target: tuple[bytes, int, Path], data: bytes) -> None:
    checks_cleanly(fuzz_target[2], data)


@FUZZ
@given(cut=st.data())
def test_checker_on_truncations(fuzz_target: tuple[bytes, int, Path], cut: st.DataObject) -> None:
    original, metadata_end, path = fuzz_target
    # Most cuts land in the metadata, where the parser has the most ways to go wrong.
    end = cut.draw(st.one_of(st.integers(0, metadata_end + 64), st.integers(0, len(original) - 1)))
    checks_cleanly(path, original[:end])


@FUZZ
@given(changes=st.data())
def test_checker_on_byte_flips_in_header_metadata_and_tensor_table(
    fuzz_target: tuple[bytes, int, Path], changes: st.DataObject
) -> None:
    original, metadata_end, path = fuzz_target
    data = bytearray(original)
    positions = changes.draw(st.lists(st.integers(8, metadata_end - 1), min_size=1, max_size=4))
    for position in positions:
        data[position] = changes.draw(st.integers(0, 255))
    checks_cleanly(path, bytes(data))


def test_checker_accepts_the_real_tiny_model(tiny_gguf: Path) -> None:
    info = check_gguf(tiny_gguf)
    reader = gguf.GGUFReader(tiny_gguf)
    assert info["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].contents())
    assert info["eos_token_id"] == reader.fields["tokenizer.ggml.eos_token_id"].contents()
    assert info["chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    types = np.array(reader.fields["tokenizer.ggml.token_type"].contents())
    assert info["control_tokens"] == [int(i) for i in np.flatnonzero(types == 3)]
    assert sum(info["tensor_types"].values()) == len(reader.tensors)


# --- real weights -------------------------------------------------------------------------


@pytest.mark.real_weights
def test_check_of_the_demo_gguf_is_fast(demo_model: Path, record_property) -> None:
    """gguf.GGUFReader took 8 s on this file (a numpy view per vocabulary item); the
    check runs before every load, so it must take a fraction of a second."""
    path = gguf_of(demo_model)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        info = check_gguf(path)
        timings.append(time.perf_counter() - started)
    record_property("check_gguf_seconds", [round(t, 3) for t in timings])
    assert info["vocab_size"] == 151_936 and info["eos_token_id"] == 151_645
    assert min(timings) < 1.0, timings
