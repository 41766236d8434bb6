"""Repetition, presence and frequency penalties, with the one meaning every engine gives them.

OpenVINO GenAI applies them in its C++ sampler, and qwenrt cannot change how; llama.cpp's
own penalty sampler means something else (it sees only the answer's last 64 tokens, not the
prompt). So the meaning is OpenVINO GenAI's, and engines without it natively apply this
function to each step's logits. GenAI's logit processor, for reference:
https://github.com/openvinotoolkit/openvino.genai/blob/master/src/cpp/src/sampling/logit_processor.hpp

- repetition ``r`` (as in transformers and vLLM): every token of the prompt or the answer
  so far has its logit divided by ``r`` if it is 0 or more, multiplied by ``r`` if below;
- then presence ``p``, then frequency ``f``, over the answer's tokens only, each in turn: a
  token the answer holds ``n`` times moves by ``p`` (then by ``f * n``) towards lower logits
  if its logit is 0 or more at that point, and by as much the other way if it is below 0.
  That sign rule differs from OpenAI's definition (which always subtracts); it only moves
  tokens with negative logits, which hold little probability beside a trained model's top
  tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def apply_penalties(
    logits: np.ndarray,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> np.ndarray:
    """``logits`` (one position's, over the vocabulary) with the penalties applied, in place."""
    if repetition != 1.0:
        # Whole arrays, not element by element: this runs at every token, over the whole prompt.
        ids = [np.asarray(prompt_ids, dtype=np.int64), np.asarray(answer_ids, dtype=np.int64)]
        seen = np.unique(np.concatenate(ids))
        values = logits[seen]
        logits[seen] = np.where(values >= 0, values / repetition, values * repetition)
    if len(answer_ids) and (presence != 0.0 or frequency != 0.0):
        ids, counts = np.unique(np.asarray(answer_ids, dtype=np.int64), return_counts=True)
        for amount in (presence, frequency * counts):  # GenAI's order, each with its own sign test
            values = logits[ids]
            logits[ids] = np.where(values >= 0, values - amount, values + amount)
    return logits
