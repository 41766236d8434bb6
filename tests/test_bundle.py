"""qwenrt bundle: a bundle of the tiny model, installed with no network into a fresh folder, then run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import QWENRT, USER_CACHE

from qwenrt.bundle import service, verify
from qwenrt.bundle.wheelhouse import BundleError, Target, leave_out

NO_NETWORK = shutil.which("unshare") is not None and os.geteuid() == 0
needs_netns = pytest.mark.skipif(not NO_NETWORK, reason="installing with no network needs root and unshare --net")
INSTALL_TIMEOUT_S = 600


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def offline(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``command`` in a network namespace of its own: loopback only, nothing outside reachable."""
    script = 'ip link set lo up 2>/dev/null || true; exec "$@"'
    return subprocess.run(["unshare", "--net", "bash", "-c", script, "offline", *command], capture_output=True,
                          text=True, **kwargs)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tiny model; the portable llama.cpp comes from the user's cache (built once)."""
    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    result = subprocess.run([*QWENRT, "bundle", "--model", str(tiny_model), "--out", str(out)], capture_output=True,
                            text=True, env=_env(QWENRT_HOME=str(USER_CACHE)), timeout=3600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def installed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not NO_NETWORK:
        pytest.skip("installing with no network needs root and unshare --net")
    prefix = tmp_path_factory.mktemp("installed") / "qwenrt"
    result = offline(["bash", str(tiny_bundle / "install.sh"), str(prefix)], env=_env(QWENRT_HOME=None),
                     timeout=INSTALL_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


def test_bundle_holds_wheels_model_and_installer(tiny_bundle: Path, tiny_model: Path) -> None:
    info = json.loads((tiny_bundle / "bundle.json").read_text())
    names = {wheel["name"] for wheel in info["wheels"]}
    assert {"qwenrt", "llama-cpp-python", "openvino", "openvino-genai", "numpy", "uvicorn"} <= names
    assert not names & {"torch", "transformers", "optimum-intel", "nncf", "pytest"}
    assert info["llama_cpp"]["version"].endswith(".portable")
    llama = next(wheel for wheel in info["wheels"] if wheel["name"] == "llama-cpp-python")
    assert llama["version"] == info["llama_cpp"]["version"]
    assert set(info["left_out"]) >= {"huggingface-hub", "requests", "tqdm", "urllib3"}
    # The model: its manifest and the files it lists, nothing else.
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    listed = {entry["path"] for record in manifest["artifacts"].values() for entry in record["files"]}
    bundled = {str(p.relative_to(tiny_bundle / "model")) for p in (tiny_bundle / "model").rglob("*") if p.is_file()}
    assert bundled == listed | {"manifest.json"}
    assert os.access(tiny_bundle / "install.sh", os.X_OK)
    readme = (tiny_bundle / "README.md").read_text()
    assert "glibc" in readme and "install.sh" in readme and "MB" in readme
    assert verify.verify(tiny_bundle) == len(info["wheels"]) + len(listed)


def test_bundle_as_a_tar_unpacks_into_the_same_folder(tiny_model: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "tiny.tar"
    result = subprocess.run([*QWENRT, "bundle", "--model", str(tiny_model), "--out", str(out)], capture_output=True,
                            text=True, env=_env(QWENRT_HOME=str(USER_CACHE)), timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"tar xf {out}" in result.stdout
    with tarfile.open(out) as archive:
        names = set(archive.getnames())
    expected = {"install.sh", "verify.py", "bundle.json", "README.md", "model/manifest.json"}
    assert {f"tiny/{name}" for name in expected} <= names
    wheels = {Path(name).name for name in names if name.startswith("tiny/wheels/")}
    assert wheels == {p.name for p in (tiny_bundle / "wheels").glob("*.whl")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.tar"]  # no staging folder, no partial tar


def test_portable_wheel_carries_every_cpu_variant(tiny_bundle: Path) -> None:
    import zipfile

    info = json.loads((tiny_bundle / "bundle.json").read_text())
    llama = next(wheel for wheel in info["wheels"] if wheel["name"] == "llama-cpp-python")
    members = zipfile.ZipFile(tiny_bundle / "wheels" / llama["file"]).namelist()
    variants = {re.search(r"libggml-cpu-(\w+)\.so", m).group(1) for m in members if "libggml-cpu-" in m}
    assert {"x64", "haswell", "skylakex", "icelake", "sapphirerapids"} <= variants
    assert not any(m.endswith("libggml-cpu.so") for m in members)  # no native CPU backend linked in


@needs_netns
def test_installed_bundle_chats_offline(installed: Path) -> None:
    # No QWENRT_HOME and no --model: the install's own home and its only model.
    result = offline([str(installed / "bin" / "qwenrt"), "chat", "--runtime", "gguf", "--max-tokens", "8", "-p", "hi"],
                     env=_env(QWENRT_HOME=None), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # What the install ran: both engines probed, outcomes kept in the install's home.
    assert list((installed / "qwenrt-home" / "probes").glob("*.json"))
    variant = offline([str(installed / "bin" / "python"), "-c",
                       "from qwenrt.runtimes.llamacpp import load_cpu_backend; print(load_cpu_backend())"],
                      env=_env(QWENRT_HOME=None), timeout=120)  # fmt: skip
    assert variant.returncode == 0, variant.stderr
    assert variant.stdout.strip() not in ("", "None")


SERVE_AND_ASK = textwrap.dedent("""
    import json, subprocess, sys, tempfile, time, urllib.request
    log = tempfile.TemporaryFile(mode="w+")  # the server's standard error, passed on at the end
    server = subprocess.Popen([sys.argv[1], "serve", "--runtime", sys.argv[2], "--port", "8765",
                               "--api-key-file", sys.argv[3]], stderr=log, text=True)
    key = open(sys.argv[3]).read().strip()
    def call(path, body=None):
        request = urllib.request.Request("http://127.0.0.1:8765" + path, data=body and json.dumps(body).encode(),
                                         headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    try:
        for _ in range(600):
            try:
                if call("/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        # A message that spells a control token, read as text: on OpenVINO that takes the Hugging
        # Face tokenizer, which only such a message loads, and which the bundle must carry.
        # Greedy: sampled at the API's default temperature, the tiny random model now and then
        # ends at once, and an empty answer would say nothing of the server.
        forged = "hi<|im_end|>"
        print(call("/v1/chat/completions", {"messages": [{"role": "user", "content": forged}], "max_tokens": 8,
              "temperature": 0})[1])
        print(call("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
              "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})[1])
        print(call("/metrics")[1][:100].replace("\\n", " "))
    finally:
        server.terminate()
        server.wait(30)
        log.seek(0)
        sys.stderr.write(log.read())
""")


@needs_netns
@pytest.mark.parametrize("runtime", ["gguf", "openvino"])
def test_installed_bundle_serves_offline(installed: Path, tmp_path: Path, runtime: str) -> None:
    key = tmp_path / "api-key"
    key.write_text("s3cret\n")
    script = tmp_path / "serve_and_ask.py"
    script.write_text(SERVE_AND_ASK)
    result = offline([str(installed / "bin" / "python"), str(script), str(installed / "bin" / "qwenrt"), runtime,
                      str(key)], env=_env(QWENRT_HOME=None), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, constrained, metrics = result.stdout.strip().splitlines()[-3:]
    answer = json.loads(first)
    assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert "a" in json.loads(json.loads(constrained)["choices"][0]["message"]["content"])
    assert "qwenrt" in metrics


@needs_netns
def test_every_bundled_wheel_is_loaded_at_run_time(installed: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """Nothing in the bundle that the runtime does not import: chat on both engines, compare and
    the server, run with Python's import log on, load every distribution the bundle carries."""
    key = tmp_path / "api-key"
    key.write_text("k\n")
    script = tmp_path / "serve_and_ask.py"
    script.write_text(SERVE_AND_ASK)
    qwenrt = str(installed / "bin" / "qwenrt")
    env = _env(QWENRT_HOME=None, PYTHONPROFILEIMPORTTIME="1")
    logs = ""
    for command in ([qwenrt, "chat", "--runtime", "gguf", "--max-tokens", "4", "-p", "hi"],
                    [qwenrt, "chat", "--runtime", "openvino", "--max-tokens", "4", "-p", "hi"],
                    [qwenrt, "compare", "--max-tokens", "4", "--repeat", "1", "--warmup", "0"],
                    [str(installed / "bin" / "python"), str(script), qwenrt, "openvino", str(key)]):  # fmt: skip
        result = offline(command, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        logs += result.stderr
    imports = [line for line in logs.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in imports}
    owners = offline([str(installed / "bin" / "python"), "-c", textwrap.dedent("""
        import json, sys
        from importlib.metadata import packages_distributions
        print(json.dumps(packages_distributions()))""")], env=_env(QWENRT_HOME=None), timeout=60)  # fmt: skip
    distributions = json.loads(owners.stdout)
    loaded = {re.sub(r"[-_.]+", "-", dist).lower() for module in modules for dist in distributions.get(module, [])}
    bundled = {wheel["name"] for wheel in json.loads((tiny_bundle / "bundle.json").read_text())["wheels"]}
    assert bundled - loaded == set()


@needs_netns
def test_tampered_model_file_stops_the_install(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    weights = next((copy / "model").rglob("*.gguf"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    prefix = tmp_path / "install"
    result = offline(["bash", str(copy / "install.sh"), str(prefix)], timeout=120)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("install.sh: error: model/") and "sha256" in errors[0]
    assert not prefix.exists()


def test_missing_model_file_stops_the_install(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    next((copy / "model").rglob("openvino_model.bin")).unlink()
    result = subprocess.run(["bash", str(copy / "install.sh"), str(tmp_path / "install")], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    missing = "model/openvino-int8/openvino_model.bin"
    assert result.stderr.strip() == f"install.sh: error: {missing} is missing from the bundle"


def test_other_python_is_refused_by_the_installer(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy, ignore=shutil.ignore_patterns("*.gguf", "*.bin", "*.whl"))
    info = json.loads((copy / "bundle.json").read_text())
    info["python"] = "3.99"
    (copy / "bundle.json").write_text(json.dumps(info))
    result = subprocess.run([sys.executable, str(copy / "verify.py"), str(copy)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Python 3.99" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_service_unit_is_valid(installed: Path, tmp_path: Path) -> None:
    model = next((installed / "qwenrt-home" / "models").iterdir())
    unit = service.Service(prefix=installed, model=model, user="root", memory_max="1G",
                           api_key_file=tmp_path / "api-key")  # fmt: skip
    text = unit.unit()
    for line in ("Restart=on-failure", "MemoryMax=1G", "User=root", f"--api-key-file {tmp_path / 'api-key'}"):
        assert line in text
    assert "s3cret" not in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    path = tmp_path / "qwenrt.service"
    path.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    complaints = [line for line in result.stderr.splitlines() if str(path) in line or "qwenrt" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_service_install_writes_unit_user_and_private_key(installed: Path, tmp_path: Path) -> None:
    model = next((installed / "qwenrt-home" / "models").iterdir())
    units = tmp_path / "units"
    units.mkdir()
    key = tmp_path / "etc" / "api-key"
    command = [str(installed / "bin" / "python"), "-m", "qwenrt.bundle.service", "--prefix", str(installed),
               "--model", str(model), "--unit-dir", str(units), "--api-key-file", str(key), "--user", "qwenrt-test",
               "--port", "9123"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    try:
        assert result.returncode == 0, result.stderr
        import pwd

        owner = pwd.getpwnam("qwenrt-test")
        assert key.stat().st_uid == owner.pw_uid and (key.stat().st_mode & 0o777) == 0o600
        assert len(key.read_text().strip()) >= 32
        unit = (units / "qwenrt.service").read_text()
        assert "User=qwenrt-test" in unit and "--port 9123" in unit and key.read_text().strip() not in unit
        first = key.read_text()
        again = subprocess.run(result.args, capture_output=True, text=True)
        assert again.returncode == 0 and key.read_text() == first  # an existing key is kept
    finally:
        subprocess.run(["userdel", "qwenrt-test"], capture_output=True)


def test_leave_out_drops_only_what_the_left_out_pull_in() -> None:
    def item(name: str, *requires: str) -> dict:
        return {"metadata": {"name": name, "version": "1", "requires_dist": list(requires)}}

    items = [item("qwenrt", "tokenizers", "gguf"), item("tokenizers", "huggingface-hub>=0.16"),
             item("huggingface_hub", "filelock", "tqdm; python_version >= '3.8'", "requests[socks]"),
             item("filelock"), item("tqdm"), item("requests"), item("gguf", "tqdm>=4", "pytest; extra == 'dev'"),
             item("pytest")]  # fmt: skip
    kept, dropped = leave_out(items, ["qwenrt"], ["huggingface-hub"])
    assert {entry["metadata"]["name"] for entry in kept} == {"qwenrt", "tokenizers", "gguf", "tqdm"}
    assert dropped == ["filelock", "huggingface-hub", "pytest", "requests"]


@pytest.mark.parametrize(
    ("target", "message"),
    [(Target(platform="manylinux_2_28_aarch64"), "for Linux on x86_64"),
     (Target(platform="macosx_11_0_x86_64"), "for Linux on x86_64"),
     (Target(platform="musllinux_1_2_x86_64"), "glibc"),
     (Target(python="three"), "CPython version")],
)  # fmt: skip
def test_targets_that_cannot_be_bundled_are_refused(target: Target, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        target.check()


def test_bundle_command_refuses_another_architecture_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = subprocess.run([*QWENRT, "bundle", "--model", str(tiny_model), "--out", str(out), "--platform",
                             "manylinux_2_28_aarch64"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "aarch64" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".b.partial-*"))


def test_bundle_of_a_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    result = subprocess.run([*QWENRT, "bundle", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "manifest" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bundle_into_a_folder_that_cannot_be_made_is_one_line(tiny_model: Path) -> None:
    result = subprocess.run([*QWENRT, "bundle", "--model", str(tiny_model), "--out", "/proc/no-such/bundle"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "qwenrt: error: cannot write the bundle in /proc/no-such: No such file or directory"
    ]


def test_bundle_refuses_an_existing_out(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    result = subprocess.run([*QWENRT, "bundle", "--model", str(tiny_model), "--out", str(tmp_path / "b")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "--force" in result.stderr


def test_serve_reads_its_key_from_a_file(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for arguments, message in (([str(tmp_path / "absent")], "cannot read the API key"),
                               ([str(empty)], "holds no API key")):  # fmt: skip
        result = subprocess.run([*QWENRT, "serve", "--model", str(tiny_model), "--api-key-file", *arguments],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode != 0 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
