"""The endpoint alone, in this process, with the official openai client: chat, completions
with several prompts and `n`, streaming, embeddings as floats and base64, the key."""

from __future__ import annotations

import openai
import pytest

from snakemake_executor_plugin_sticky.worker.endpoint import Endpoint, pieces
from snakemake_executor_plugin_sticky.worker.served import read_served

KEY = "the-runs-key"


def upper(requests):
    return [(r["messages"][-1]["content"] if "messages" in r else r["prompt"]).upper() for r in requests]


@pytest.fixture
def client():
    served = read_served("t", {"model": "m", "chat": upper, "completions": upper, "embeddings": embed})
    poisoned = []
    endpoint = Endpoint(KEY, lambda: served, poisoned.append)
    base_url = endpoint.start()
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    yield openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    for fn in served.functions.values():
        fn.close()
    endpoint.stop()


def embed(inputs):
    return [[float(len(s)), -1.5] for s in inputs]


def test_chat_completions_embeddings_and_streams_as_the_official_client_reads_them(client):
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}], n=2)
    assert [c.message.content for c in chat.choices] == ["HI THERE", "HI THERE"]
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].finish_reason == "stop"
    texts = client.completions.create(model="m", prompt=["a b", "c"])
    assert [c.text for c in texts.choices] == ["A B", "C"]
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two  three"}],
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ONE TWO  THREE"
    assert chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt="x y", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "X Y"
    as_floats = client.embeddings.create(model="m", input=["abc", "de"], encoding_format="float")
    assert [d.embedding for d in as_floats.data] == [[3.0, -1.5], [2.0, -1.5]]
    default = client.embeddings.create(model="m", input="abcd")  # the client asks for base64
    assert default.data[0].embedding == [4.0, -1.5]
    assert [m.id for m in client.models.list()] == ["m"]


def test_a_request_without_the_key_or_for_another_model_is_refused(client):
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "this endpoint serves 'm'" in str(error.value)


def test_a_stream_splits_a_text_into_words_with_their_spaces():
    assert pieces("a  b c ") == ["a  ", "b ", "c "] and "".join(pieces(" x")) == " x" and pieces("") == []
