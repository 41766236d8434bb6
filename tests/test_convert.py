"""``qwenrt convert`` on real checkpoints, with the real converters and the real engines.

The tiny model is converted once per run (the ``tiny_model`` fixture); tests that
need another conversion (an untied model, a forced or killed run) write into
``tmp_path`` and convert only what they check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
from helpers import sha256, snapshot, staging_folders

from qwenrt import __version__
from qwenrt.convert.openvino_int8 import weight_types
from qwenrt.convert.pipeline import convert, manifest_tools
from qwenrt.convert.staging import OWNER_FILE, UNOWNED_GRACE_SECONDS, make_staging, remove_stale_staging
from qwenrt.manifest import GGUF_KEY, MANIFEST_FILE, OPENVINO_DIR, OPENVINO_KEY, read_manifest
from qwenrt.runtimes import GenerationConfig, StreamEnd, TokenEvent, open_engine

QWENRT = [sys.executable, "-m", "qwenrt.cli"]
# Chinese, emoji (four-byte UTF-8, absent from the tiny vocabulary) and a mathematical
# letter: text the byte-level BPE must fall back to single bytes for.
MIXED_PROMPT = "请写一段 Python 快速排序函数 😀🚀 ✨, then say 你好 to 𝔘nicode 🧑‍💻"
CHAT = [{"role": "user", "content": MIXED_PROMPT}]
CONTROL = int(gguf.TokenType.CONTROL)
NORMAL = int(gguf.TokenType.NORMAL)
# Per block: q, k, v, o, gate, up, down; plus the token embedding.
LINEAR_PER_BLOCK = 7


def quiet(line: str) -> None:
    pass


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def gguf_path(model_dir: Path) -> Path:
    return model_dir / read_manifest(model_dir)["artifacts"][GGUF_KEY]["path"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QWENRT, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def generate(engine_name: str, model_dir: Path, max_tokens: int) -> tuple[list[TokenEvent], StreamEnd]:
    with open_engine(engine_name, model_dir) as engine:
        events = list(engine.stream_chat(CHAT, GenerationConfig(max_tokens=max_tokens, ignore_eos=True)))
    tokens = [e for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]
    assert isinstance(events[-1], StreamEnd)
    return tokens, events[-1]


@pytest.fixture(scope="session")
def checkpoint_config(tiny_checkpoint: Path) -> dict:
    return json.loads((tiny_checkpoint / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def gguf_reader(tiny_model: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gguf_path(tiny_model))


def hf_chat_ids(hf_tokenizer) -> list[int]:
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the model folder ---------------------------------------------------------------


def test_model_folder_holds_both_artifacts_and_nothing_else(tiny_model: Path) -> None:
    manifest = read_manifest(tiny_model)
    assert set(manifest["artifacts"]) == {GGUF_KEY, OPENVINO_KEY}
    assert manifest["artifacts"][OPENVINO_KEY]["path"] == OPENVINO_DIR
    assert manifest["artifacts"][GGUF_KEY]["path"].endswith("-q8_0.gguf")
    top_level = {p.name for p in tiny_model.iterdir()}
    assert top_level == {MANIFEST_FILE, OPENVINO_DIR, manifest["artifacts"][GGUF_KEY]["path"]}
    assert not staging_folders(tiny_model), "the staging folder must be gone after a conversion"


# --- GGUF, field by field -----------------------------------------------------------


def test_gguf_hyperparameters_equal_the_checkpoint_config(gguf_reader, checkpoint_config: dict) -> None:
    config = checkpoint_config
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    assert field(gguf_reader, "general.architecture") == "qwen2"
    assert field(gguf_reader, "qwen2.context_length") == config["max_position_embeddings"]
    assert field(gguf_reader, "qwen2.embedding_length") == config["hidden_size"]
    assert field(gguf_reader, "qwen2.block_count") == config["num_hidden_layers"]
    assert field(gguf_reader, "qwen2.feed_forward_length") == config["intermediate_size"]
    assert field(gguf_reader, "qwen2.attention.head_count") == config["num_attention_heads"]
    assert field(gguf_reader, "qwen2.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(gguf_reader, "qwen2.rope.freq_base") == pytest.approx(rope_theta)
    assert field(gguf_reader, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(gguf_reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_gguf_tokenizer_equals_the_hf_tokenizer(gguf_reader, hf_tokenizer, tiny_checkpoint: Path) -> None:
    assert field(gguf_reader, "tokenizer.ggml.model") == "gpt2"
    assert field(gguf_reader, "tokenizer.ggml.pre") == "qwen2"

    by_id = {idx: text for text, idx in hf_tokenizer.get_vocab().items()}
    tokens = field(gguf_reader, "tokenizer.ggml.tokens")
    assert tokens == [by_id[idx] for idx in range(len(by_id))]

    special_ids = {idx for idx, added in hf_tokenizer.added_tokens_decoder.items() if added.special}
    assert special_ids == set(hf_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    types = field(gguf_reader, "tokenizer.ggml.token_type")
    assert types == [CONTROL if idx in special_ids else NORMAL for idx in range(len(tokens))]

    spec = json.loads((tiny_checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    hf_merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert len(hf_merges) > 0
    assert field(gguf_reader, "tokenizer.ggml.merges") == hf_merges

    assert field(gguf_reader, "tokenizer.ggml.eos_token_id") == hf_tokenizer.eos_token_id
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert field(gguf_reader, "tokenizer.ggml.padding_token_id") == hf_tokenizer.pad_token_id
    assert field(gguf_reader, "tokenizer.ggml.add_bos_token") is False
    assert field(gguf_reader, "tokenizer.chat_template") == hf_tokenizer.chat_template


def test_gguf_tied_model_tensors_are_q8_0_matrices_and_f32_vectors(
    gguf_reader, tiny_checkpoint: Path, checkpoint_config: dict
) -> None:
    assert checkpoint_config["tie_word_embeddings"] is True
    names = {t.name for t in gguf_reader.tensors}
    assert "output.weight" not in names, "tied embeddings: llama.cpp reuses token_embd.weight"
    n_layers = checkpoint_config["num_hidden_layers"]
    assert len(names) == 2 + 12 * n_layers
    for tensor in gguf_reader.tensors:
        expected = gguf.GGMLQuantizationType.Q8_0 if len(tensor.shape) == 2 else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == expected, tensor.name
    embedding = next(t for t in gguf_reader.tensors if t.name == "token_embd.weight")
    assert [int(d) for d in embedding.shape] == [checkpoint_config["hidden_size"], checkpoint_config["vocab_size"]]
    assert_gguf_holds_checkpoint_weights(gguf_reader, tiny_checkpoint, n_layers)


def assert_gguf_holds_checkpoint_weights(reader: gguf.GGUFReader, checkpoint: Path, n_layers: int) -> None:
    """Each GGUF tensor dequantises to its checkpoint tensor within Q8_0's rounding."""
    from safetensors.numpy import load_file

    weights = {}
    for file in checkpoint.glob("*.safetensors"):
        weights.update(load_file(file))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    by_gguf_name = {name_map.get_name(name, try_suffixes=(".weight", ".bias")): w for name, w in weights.items()}
    for tensor in reader.tensors:
        source = by_gguf_name[tensor.name].astype(np.float32)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        # Q8_0: one scale per 32 values, at most half a step (max|x| / 127 / 2) off, plus the f16 scale's rounding.
        assert np.abs(values - source).max() <= np.abs(source).max() / 127, tensor.name


def test_untied_model_gets_its_own_output_matrix_and_format_gguf_writes_only_gguf(tmp_path: Path, hf_tokenizer) -> None:
    from tiny_model import build_tiny_qwen2

    checkpoint = build_tiny_qwen2(tmp_path / "untied-checkpoint", tied=False)
    out = tmp_path / "untied-model"
    result = run_cli("convert", str(checkpoint), "--out", str(out), "--format", "gguf")
    assert result.returncode == 0, result.stderr
    assert "gguf: verified in its engine" in result.stderr

    manifest = read_manifest(out)
    assert set(manifest["artifacts"]) == {GGUF_KEY}
    assert {p.name for p in out.iterdir()} == {MANIFEST_FILE, manifest["artifacts"][GGUF_KEY]["path"]}

    reader = gguf.GGUFReader(gguf_path(out))
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is False
    output = tensors["output.weight"]
    assert output.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert [int(d) for d in output.shape] == [config["hidden_size"], config["vocab_size"]]
    assert not np.array_equal(output.data, tensors["token_embd.weight"].data)
    assert manifest["artifacts"][GGUF_KEY]["weight_types"] == {"Q8_0": 2 + 7 * config["num_hidden_layers"],
                                                               "F32": 1 + 5 * config["num_hidden_layers"]}  # fmt: skip
    assert_gguf_holds_checkpoint_weights(reader, checkpoint, config["num_hidden_layers"])

    tokens, end = generate("gguf", out, max_tokens=6)
    assert len(tokens) == end.generated_tokens == 6
    assert end.prompt_tokens == len(hf_chat_ids(hf_tokenizer))


# --- both engines on the tiny model ---------------------------------------------------


@pytest.mark.parametrize("engine_name", ["gguf", "openvino"])
def test_engine_tokenizes_like_hf_and_generates(engine_name: str, tiny_model: Path, hf_tokenizer) -> None:
    expected_text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected_ids = hf_chat_ids(hf_tokenizer)
    assert hf_tokenizer.decode(expected_ids) == expected_text
    with open_engine(engine_name, tiny_model) as engine:
        assert engine.render_chat(CHAT) == expected_text
        assert engine.tokenize(expected_text) == expected_ids
        assert engine.chat_prompt_ids(CHAT) == expected_ids
        assert hf_tokenizer.eos_token_id in engine.eos_token_ids
        events = list(engine.stream_chat(CHAT, GenerationConfig(max_tokens=8, ignore_eos=True)))
    tokens = [e for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert end.reason == "length"
    assert end.prompt_tokens == len(expected_ids)
    assert len(tokens) == end.generated_tokens == 8
    assert all(0 <= t.token_id < len(hf_tokenizer) for t in tokens)


def test_llamacpp_tokenizer_equals_hf_on_its_own(tiny_model: Path, hf_tokenizer) -> None:
    """llama-cpp-python's tokenizer, not qwenrt's engine layer, against transformers."""
    from llama_cpp import Llama

    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    llm = Llama(model_path=str(gguf_path(tiny_model)), n_ctx=256, n_threads=1, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_chat_ids(hf_tokenizer)
        # Without special-token parsing the markers are text, as for any user input.
        plain = llm.tokenize(MIXED_PROMPT.encode(), add_bos=False, special=False)
        assert plain == hf_tokenizer(MIXED_PROMPT, add_special_tokens=False)["input_ids"]
        assert llm.detokenize(plain).decode() == MIXED_PROMPT
    finally:
        llm.close()


# --- OpenVINO IR ----------------------------------------------------------------------


def test_openvino_ir_has_int8_weights_tokenizer_irs_and_opens_in_genai(
    tiny_model: Path, checkpoint_config: dict, hf_tokenizer
) -> None:
    import openvino_genai

    ir = tiny_model / OPENVINO_DIR
    for name in ["openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_tokenizer.bin",
                 "openvino_detokenizer.xml", "openvino_detokenizer.bin"]:  # fmt: skip
        assert (ir / name).is_file(), name
    types = weight_types(ir / "openvino_model.xml")
    assert set(types) <= {"u8", "i8"}, f"weights that are not 8-bit: {types}"
    # Tied embeddings: the output layer reads the embedding matrix, no matrix of its own;
    # q, k and v are one fused matrix (tests/test_fused_projections.py).
    assert sum(types.values()) == (LINEAR_PER_BLOCK - 2) * checkpoint_config["num_hidden_layers"] + 1
    assert read_manifest(tiny_model)["artifacts"][OPENVINO_KEY]["weight_types"] == types

    pipe = openvino_genai.LLMPipeline(str(ir), "CPU")
    assert pipe.get_tokenizer().chat_template == hf_tokenizer.chat_template
    config = openvino_genai.GenerationConfig(max_new_tokens=4, ignore_eos=True)
    assert isinstance(pipe.generate("Hello", config), str)


# --- manifest -------------------------------------------------------------------------


def test_manifest_records_source_artifacts_and_tools(
    tiny_model: Path, tiny_checkpoint: Path, checkpoint_config: dict, gguf_reader
) -> None:
    manifest = read_manifest(tiny_model)
    assert manifest["schema_version"] == 1
    assert manifest["context_length"] == checkpoint_config["max_position_embeddings"]

    source = manifest["source"]
    assert source["kind"] == "checkpoint"
    assert source["reference"] == str(tiny_checkpoint.resolve())
    weight_files = sorted(tiny_checkpoint.glob("*.safetensors"))
    assert source["files"] == [{"name": f.name, "size": f.stat().st_size, "sha256": sha256(f)} for f in weight_files]

    listed = set()
    for key, record in manifest["artifacts"].items():
        assert record["files"], key
        for entry in record["files"]:
            path = tiny_model / entry["path"]
            assert path.is_file(), entry["path"]
            assert entry["size"] == path.stat().st_size, entry["path"]
            assert entry["sha256"] == sha256(path), entry["path"]
            listed.add(entry["path"])
    on_disk = {str(p.relative_to(tiny_model)) for p in tiny_model.rglob("*") if p.is_file()}
    assert on_disk - listed == {MANIFEST_FILE}, "every artifact file is in the manifest"

    gguf_types = Counter(t.tensor_type.name for t in gguf_reader.tensors)
    assert manifest["artifacts"][GGUF_KEY]["weight_types"] == dict(gguf_types)
    assert manifest["artifacts"][GGUF_KEY]["quantization"] == "Q8_0"
    assert "int8" in manifest["artifacts"][OPENVINO_KEY]["quantization"]

    tools = manifest["tools"]
    assert set(tools) == set(manifest_tools()) == {"qwenrt", "gguf", "llama-cpp-python", "openvino", "openvino-genai",
                                                   "openvino-tokenizers", "optimum-intel", "nncf", "transformers",
                                                   "torch"}  # fmt: skip
    assert tools["qwenrt"] == __version__
    for tool in set(tools) - {"qwenrt"}:
        assert tools[tool] == metadata.version(tool), tool

    created = datetime.fromisoformat(manifest["created"])
    assert created.tzinfo is not None
    now = datetime.now(timezone.utc)
    assert now - timedelta(hours=6) < created <= now


# --- second runs ------------------------------------------------------------------------


def test_second_run_skips_complete_artifacts(tiny_model: Path, tiny_checkpoint: Path) -> None:
    before = snapshot(tiny_model)
    lines: list[str] = []
    started = time.perf_counter()
    result = convert(str(tiny_checkpoint), tiny_model, log=lines.append)
    seconds = time.perf_counter() - started
    assert all(artifact.skipped for artifact in result.artifacts)
    assert {artifact.key for artifact in result.artifacts} == {GGUF_KEY, OPENVINO_KEY}
    assert sum("skipping" in line for line in lines) == 2
    # A skip reads the manifest and stats the files; a conversion takes several seconds.
    assert seconds < 3, f"second run took {seconds:.1f} s"
    assert snapshot(tiny_model) == before


def test_force_converts_again_and_keeps_the_other_artifact(
    tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = snapshot(model)
    old_gguf = read_manifest(model)["artifacts"][GGUF_KEY]

    result = run_cli("convert", str(tiny_checkpoint), "--out", str(model), "--format", "gguf", "--force")
    assert result.returncode == 0, result.stderr
    assert "skipping" not in result.stderr

    after = snapshot(model)
    gguf_name = old_gguf["path"]
    assert after[gguf_name][1] != before[gguf_name][1], "--force must write the GGUF again"
    assert after[gguf_name][2] == before[gguf_name][2], "the same checkpoint gives the same GGUF"
    untouched = {name: state for name, state in before.items() if name.startswith(OPENVINO_DIR + "/")}
    assert untouched and all(after[name] == state for name, state in untouched.items())
    manifest = read_manifest(model)
    assert set(manifest["artifacts"]) == {GGUF_KEY, OPENVINO_KEY}
    assert manifest["artifacts"][GGUF_KEY]["files"] == old_gguf["files"]
    assert not staging_folders(model)


def test_another_source_replaces_the_artifacts(tiny_model: Path, tmp_path: Path) -> None:
    """A model folder belongs to one source: converting another one into it never reuses the old files."""
    from tiny_model import build_tiny_qwen2

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    other = build_tiny_qwen2(tmp_path / "other", seed=1)
    convert(str(other), model, (GGUF_KEY,), verify=False, log=quiet)
    manifest = read_manifest(model)
    assert manifest["source"]["reference"] == str(other.resolve())
    assert set(manifest["artifacts"]) == {GGUF_KEY}
    assert {p.name for p in model.iterdir()} == {MANIFEST_FILE, "other-q8_0.gguf"}


# --- atomicity ------------------------------------------------------------------------


def kill_half_way(args: list[str], out: Path, log: Path, timeout: float = 180) -> Path:
    """Run ``qwenrt convert`` and SIGKILL it once the GGUF is staged and the OpenVINO export has begun."""
    # A file, not a pipe: nobody reads while polling, and a full pipe would stall the conversion.
    with open(log, "w") as stderr:
        process = subprocess.Popen([*QWENRT, *args], stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            staged = [s for s in staging_folders(out) if (s / OPENVINO_DIR).is_dir()]
            if staged:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return staged[0]
            if process.poll() is not None:
                pytest.fail(f"conversion ended (exit {process.returncode}) before it could be killed: "
                            f"{log.read_text()[-2000:]}")  # fmt: skip
            time.sleep(0.05)
        pytest.fail("no staging folder with an OpenVINO export appeared")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_killed_conversion_creates_nothing_and_next_run_cleans_up(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh" / "model"
    staging = kill_half_way(["convert", str(tiny_checkpoint), "--out", str(out)], out, tmp_path / "stderr.txt")
    assert not out.exists()
    assert any(staging.glob("*-q8_0.gguf")), "killed half way: the GGUF was staged"
    assert staging_folders(out) == [staging], "SIGKILL leaves the staging folder behind"

    lines: list[str] = []
    convert(str(tiny_checkpoint), out, (GGUF_KEY,), verify=False, log=lines.append)
    assert not staging.exists()
    assert any("removed" in line and staging.name in line for line in lines)
    assert staging_folders(out) == []
    assert set(read_manifest(out)["artifacts"]) == {GGUF_KEY}


def test_killed_forced_conversion_leaves_the_model_folder_unchanged(
    tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = snapshot(model)
    args = ["convert", str(tiny_checkpoint), "--out", str(model), "--force"]
    staging = kill_half_way(args, model, tmp_path / "stderr.txt")
    assert snapshot(model) == before

    # The next run finds complete artifacts: it skips them and still removes the leftover.
    result = convert(str(tiny_checkpoint), model, log=quiet)
    assert all(artifact.skipped for artifact in result.artifacts)
    assert not staging.exists()
    assert snapshot(model) == before


def test_only_staging_folders_of_dead_runs_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def staged(name: str, owner: dict | None) -> Path:
        folder = tmp_path / f".model.partial-{name}"
        folder.mkdir()
        if owner is not None:
            (folder / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
        return folder

    import psutil

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}
    live = make_staging(target)
    dead = staged("dead", {**me, "pid": dead_pid, "started": 1.0})
    recycled = staged("recycled", {**me, "started": me["started"] - 3600})
    elsewhere = staged("elsewhere", {**me, "host": "another-machine", "pid": dead_pid})
    unowned_new = staged("unowned-new", None)
    unowned_old = staged("unowned-old", None)
    old = time.time() - UNOWNED_GRACE_SECONDS - 60
    os.utime(unowned_old, (old, old))
    other_target = tmp_path / ".model2.partial-dead"
    other_target.mkdir()
    (other_target / OWNER_FILE).write_text(json.dumps({**me, "pid": dead_pid}), encoding="utf-8")

    removed = remove_stale_staging(target)
    assert set(removed) == {dead, recycled, unowned_old}
    assert all(not folder.exists() for folder in removed)
    assert all(folder.is_dir() for folder in (live, elsewhere, unowned_new, other_target))


# --- source errors ----------------------------------------------------------------------


def _not_a_checkpoint(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not a model\n", encoding="utf-8")
    return str(folder)


def _llama_checkpoint(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    folder = tmp_path / "llama-checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "llama"
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def _truncated_gguf(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    data = gguf_path(tiny_model).read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _llama_gguf(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _text_as_gguf(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    path = tmp_path / "model.gguf"
    path.write_text("this is not a GGUF file\n", encoding="utf-8")
    return str(path)


def _missing_path(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    return str(tmp_path / "no-such-folder")


def _offline_hub_id(tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path) -> str:
    return "Qwen/Qwen2.5-0.5B-Instruct"


SOURCE_ERRORS = {
    "not-a-checkpoint": (_not_a_checkpoint, "not a Hugging Face checkpoint"),
    "llama-checkpoint": (_llama_checkpoint, "'llama' is not Qwen2"),
    "truncated-gguf": (_truncated_gguf, "truncated"),
    "llama-gguf": (_llama_gguf, "'llama' is not qwen2"),
    "text-as-gguf": (_text_as_gguf, "not a GGUF file"),
    "missing-path": (_missing_path, "no such file or folder"),
    "offline-hub-id": (_offline_hub_id, "'demo'"),
}


@pytest.mark.parametrize("case", SOURCE_ERRORS)
def test_source_error_is_one_line_and_writes_nothing(
    case: str, tmp_path: Path, tiny_model: Path, tiny_checkpoint: Path
) -> None:
    make_source, message = SOURCE_ERRORS[case]
    source = make_source(tmp_path, tiny_model, tiny_checkpoint)
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    # From tmp_path, a relative hub id such as Qwen/Qwen2.5-0.5B-Instruct names no local folder.
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    result = run_cli("convert", source, "--out", str(out), cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qwenrt: error:")
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before, "nothing written beside the output folder either"


# --- real weights -----------------------------------------------------------------------


@pytest.mark.real_weights
def test_demo_conversion_end_to_end(demo_model: Path) -> None:
    from qwenrt.convert.demo import DEMO_SHA256, DEMO_SIZE

    manifest = read_manifest(demo_model)
    assert manifest["source"]["kind"] == "demo"
    assert manifest["source"]["reference"] == "demo"
    assert [(f["size"], f["sha256"]) for f in manifest["source"]["files"]] == [(DEMO_SIZE, DEMO_SHA256)]
    assert set(manifest["artifacts"]) == {GGUF_KEY, OPENVINO_KEY}

    reader = gguf.GGUFReader(gguf_path(demo_model))
    assert field(reader, "general.architecture") == "qwen2"
    n_layers = field(reader, "qwen2.block_count")
    tensors = {t.name: t for t in reader.tensors}
    # The demo weights keep an output matrix apart from the embedding.
    assert "output.weight" in tensors
    for tensor in reader.tensors:
        expected = gguf.GGMLQuantizationType.Q8_0 if len(tensor.shape) == 2 else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == expected, tensor.name
    assert field(reader, "tokenizer.ggml.eos_token_id") == 151645

    types = weight_types(demo_model / OPENVINO_DIR / "openvino_model.xml")
    assert set(types) <= {"u8", "i8"}, f"weights that are not 8-bit: {types}"
    assert sum(types.values()) == (LINEAR_PER_BLOCK - 2) * n_layers + 2  # q, k and v fused into one


@pytest.mark.real_weights
@pytest.mark.parametrize("engine_name", ["gguf", "openvino"])
def test_demo_model_writes_quicksort(engine_name: str, demo_model: Path) -> None:
    prompt = [{"role": "user", "content": "Write a Python quicksort function"}]
    with open_engine(engine_name, demo_model) as engine:
        events = list(engine.stream_chat(prompt, GenerationConfig(max_tokens=200)))
    end = events[-1]
    assert isinstance(end, StreamEnd)
    print(f"{engine_name}: {end.generated_tokens} tokens, {end.reason}:\n{end.text}")
    assert end.generated_tokens > 10
    assert "def " in end.text
    assert "sort" in end.text.lower()
