"""A template's serve(state), checked: clear errors that name the template, Batchers around
plain functions, an engine's own address handed on."""

from __future__ import annotations

import pytest

from snakemake_executor_plugin_sticky.api.batcher import Batcher
from snakemake_executor_plugin_sticky.worker.served import ServeError, read_served


def echo(requests):
    return [str(r) for r in requests]


def test_plain_functions_get_a_batcher_of_the_declared_size_and_a_batcher_stays_itself():
    own = Batcher(echo, max_batch=3)
    served = read_served("llm", {"model": "m", "chat": echo, "embeddings": own, "max_batch": 5, "max_wait": 0.5})
    try:
        chat = served.functions["chat"]
        assert isinstance(chat, Batcher) and chat.max_batch == 5 and chat.max_wait == 0.5
        assert served.functions["embeddings"] is own
        assert chat([1, 2]) == ["1", "2"]
        assert served.model == "m" and served.base_url is None
    finally:
        for fn in served.functions.values():
            fn.close()


def test_an_engines_own_server_is_handed_on():
    served = read_served("vllm", {"base_url": "http://127.0.0.1:8000/v1/", "api_key": "k"})
    assert (served.base_url, served.api_key, served.functions) == ("http://127.0.0.1:8000/v1", "k", {})


@pytest.mark.parametrize(
    "declared, message",
    [
        (["chat"], "must return a dict, got list"),
        ({"model": "m", "chat": echo, "speech": echo}, "unknown key(s) speech"),
        ({"chat": echo}, "must name its 'model'"),
        ({"model": "m"}, "serves none of chat, completions, embeddings"),
        ({"model": "m", "chat": "not callable"}, "'chat' must be a function"),
        ({"model": "m", "chat": echo, "max_batch": 0}, "'max_batch' must be an integer >= 1"),
        ({"model": "m", "chat": echo, "max_wait": -1}, "'max_wait' must be a number of seconds >= 0"),
        ({"base_url": "localhost:8000"}, "'base_url' must be an http(s) URL"),
        ({"base_url": "http://h/v1", "chat": echo}, "hands on a 'base_url': its server serves; drop chat"),
    ],
)
def test_what_cannot_be_served_is_refused_naming_the_template(declared, message):
    with pytest.raises(ServeError) as error:
        read_served("llm", declared)
    assert "Sticky template 'llm': serve(state)" in str(error.value)
    assert message in str(error.value)
