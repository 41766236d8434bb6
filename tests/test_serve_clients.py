"""`qwenrt serve` driven by a client suite that qwenrt did not write: LangChain's ChatOpenAI.

LangChain's OpenAI integration (langchain-openai, from the package index) is what many
agents and apps talk to an OpenAI-compatible server through: plain answers, streaming
with usage, structured output by JSON schema, and tools with a round trip through a tool
message. Every call here is LangChain's own request and its own parsing of the answer.
The tiny model's text is noise; what is checked is that LangChain gets well-formed
answers it can use, on both engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import langchain_openai
import pydantic
import pytest
from conftest import ENGINES
from test_serve import MODEL_ID, WEATHER, Server, assert_stopped_cleanly, running
from tiny_model import TOOLS_TEMPLATE, build_tiny_qwen2


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwenrt.convert.pipeline import convert

    checkpoint = build_tiny_qwen2(tmp_path_factory.mktemp("clients-checkpoint"), seed=2, context=4096,
                                  chat_template=TOOLS_TEMPLATE)  # fmt: skip
    out = tmp_path_factory.mktemp("clients-model") / MODEL_ID
    convert(str(checkpoint), out, log=lambda line: None)
    return out


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest, tools_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp(f"clients-{request.param}") / "server.log"
    with running(request.param, tools_model, log) as started:
        yield started
        assert_stopped_cleanly(started)


def chat_model(server: Server, **options: object):
    return langchain_openai.ChatOpenAI(model=MODEL_ID, base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                       timeout=60, **options)  # fmt: skip


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no", "maybe"]
    sure: bool


def test_langchain_invokes_and_streams(server: Server) -> None:
    model = chat_model(server, max_tokens=8, temperature=0, stream_usage=True)
    answer = model.invoke("Hello fox")
    assert isinstance(answer.content, str) and answer.usage_metadata["output_tokens"] == 8
    assert answer.response_metadata["finish_reason"] == "length"
    chunks = list(model.stream("Hello fox"))
    assert "".join(chunk.content for chunk in chunks) == answer.content  # greedy: the same answer
    assert sum(chunk.usage_metadata["output_tokens"] for chunk in chunks if chunk.usage_metadata) == 8


def test_langchain_structured_output(server: Server) -> None:
    model = chat_model(server, max_tokens=64).with_structured_output(Verdict, method="json_schema")
    assert isinstance(model.invoke("Is the fox quick?"), Verdict)
    assert isinstance(chat_model(server, max_tokens=64).with_structured_output(Verdict, method="json_schema",
                                                                               include_raw=True).invoke("Again?")
                      ["parsed"], Verdict)  # fmt: skip


def test_langchain_tool_round_trip(server: Server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    model = chat_model(server, max_tokens=160).bind_tools([WEATHER], tool_choice="get_weather")
    messages = [HumanMessage("Weather in Busan?")]
    call_message = model.invoke(messages)
    (call,) = call_message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    messages += [call_message, ToolMessage(content="21 C", tool_call_id=call["id"])]
    final = chat_model(server, max_tokens=12, temperature=0).bind_tools([WEATHER], tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and not final.tool_calls
