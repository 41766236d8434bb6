"""transformers ``generate`` in FP32 on the source checkpoint: the baseline every engine is
measured against (the write-up's starting point). Needs the ``convert`` extra (torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrt.errors import ModelNotFoundError, QwenrtError
from qwenrt.manifest import read_manifest
from qwenrt.runtimes.base import Engine, EngineOptions, GenerationConfig, TokenRelay
from qwenrt.runtimes.byte_vocab import read_vocabulary
from qwenrt.runtimes.settings import ResolvedSettings

if TYPE_CHECKING:
    import numpy as np


class TransformersEngine(Engine):
    name = "transformers"
    description = "transformers FP32 generate on the source checkpoint (baseline)"
    artifact_format = "Hugging Face checkpoint, float32"
    packages = ("transformers", "torch")

    @classmethod
    def artifact_path(cls, model_dir: Path) -> Path:
        model_dir = Path(model_dir)
        source = read_manifest(model_dir).get("source", {})
        candidates = [model_dir, Path(source.get("checkpoint", model_dir))]
        if source.get("kind") == "checkpoint":
            candidates.append(Path(source["reference"]))
        if source.get("kind") in ("gguf", "demo") and source.get("files"):
            from qwenrt.convert.sources import dequantised_path

            candidates.append(dequantised_path(source["files"][0]["sha256"]))
        for folder in candidates:
            if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
                return folder
        raise ModelNotFoundError(
            f"{model_dir}: no Hugging Face checkpoint for the transformers baseline; "
            "convert again with this version of qwenrt, or pass the checkpoint folder as --model"
        )

    def __init__(
        self, model_dir: Path, options: EngineOptions = EngineOptions(), settings: ResolvedSettings | None = None
    ) -> None:
        super().__init__(model_dir, options, settings)
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            self.close()
            raise QwenrtError(
                "the transformers baseline needs the convert extra: pip install 'qwenrt[convert]'"
            ) from None
        self.path = self.artifact_path(self.model_dir)
        if not options.engine_defaults:
            torch.set_num_threads(self.threads.threads)
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        vocabulary = read_vocabulary(self.path / "tokenizer.json")
        self._bytes, self._spellings = vocabulary.token_bytes, vocabulary.control_spellings
        self._vocabulary_size = max(int(self._model.config.vocab_size), len(self._bytes))
        eos = self._model.generation_config.eos_token_id
        self._eos = frozenset(eos if isinstance(eos, list) else [eos]) | {self._tokenizer.eos_token_id}

    @property
    def chat_template(self) -> str:
        return self._tokenizer.chat_template or ""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def tokenize_text(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_spelling(self, token_id: int) -> bytes:
        return self._spellings.get(token_id) or self.token_bytes(token_id)

    @property
    def vocabulary_size(self) -> int:
        return self._vocabulary_size

    def window_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        self._check_window(token_ids)
        torch = self._torch
        with torch.inference_mode():
            logits = self._model(torch.tensor([list(token_ids)])).logits[0]
        return logits.float().numpy().copy()

    def _generate(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[tuple[int, float]]:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        torch = self._torch
        relay = TokenRelay()

        class TokenStreamer(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                relay.put(value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return relay.cancelled.is_set()

        sampling: dict[str, Any] = {"do_sample": config.temperature > 0}
        if sampling["do_sample"]:
            sampling.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
            if config.seed is not None:
                torch.manual_seed(config.seed)

        def run() -> None:
            with torch.inference_mode():
                self._model.generate(
                    torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                    max_new_tokens=config.max_tokens, streamer=TokenStreamer(),
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    eos_token_id=None if config.ignore_eos else sorted(self._eos),
                    pad_token_id=self._tokenizer.pad_token_id, **sampling,
                )  # fmt: skip

        return relay.run(run, "transformers-generate")

    def settings(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "artifact": str(self.path),
            "dtype": "float32",
            "threads": self._torch.get_num_threads(),
            "prefix_cache": False,
        }

    _model = None

    def close(self) -> None:
        # torch's intra-op thread count (set_num_threads) stays for the process: torch offers no
        # way back to "as it was before" but a number, and the baseline runs in a process of its own.
        self._model = None
        super().close()


ENGINE = TransformersEngine
