"""llm=openai against a real HTTP server on 127.0.0.1: the wire format, retries on 429 and
500, an unreachable port, a missing key (named), and the key kept out of configs."""

from __future__ import annotations

import socket
import time

import pytest
from omegaconf import OmegaConf

from gym_cl_grpo import OpenAIChatConfig
from gym_cl_grpo.llm import LLMError
from gym_cl_grpo.openai_client import OpenAIChat
from tests.plugins.fake_chat_server import FakeChatServer

KEY = "sk-test-secret-123"


def config(base_url, **kw):
    return OpenAIChatConfig(base_url=base_url, model="fake-model", api_key_env="GYM_TEST_KEY",
                            backoff_s=0.01, max_backoff_s=0.05, timeout_s=5, **kw)


def echo(messages):
    return "echo: " + messages[-1]["content"]


def test_chat_completions_wire_format(monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    with FakeChatServer(echo) as server:
        llm = OpenAIChat(config(server.base_url, max_new_tokens=7, temperature=0.3))
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
        assert llm.chat(convs) == [f"echo: q{i}" for i in range(5)]  # order kept
    body = server.requests[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 7
    assert body["temperature"] == 0.3 and body["messages"][0]["role"] == "user"
    assert all(h["Authorization"] == f"Bearer {KEY}" for h in server.headers)
    assert llm.calls == 5


def test_429_and_500_are_retried(monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    with FakeChatServer(echo, script=[429, 500, 429]) as server:
        llm = OpenAIChat(config(server.base_url, concurrency=1))
        assert llm.chat([[{"role": "user", "content": "hi"}]]) == ["echo: hi"]
    assert len(server.requests) == 4 and llm.retries == 3


def test_retries_give_up_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    with FakeChatServer(echo, script=[500] * 10) as server:
        llm = OpenAIChat(config(server.base_url, max_retries=2))
        with pytest.raises(LLMError, match=r"after 3 attempts \(last: HTTP 500"):
            llm.chat([[{"role": "user", "content": "hi"}]])
    assert len(server.requests) == 3


def test_a_client_error_is_not_retried_and_names_the_fix(monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    with FakeChatServer(echo, script=[401]) as server:
        llm = OpenAIChat(config(server.base_url))
        with pytest.raises(LLMError, match="HTTP 401.*GYM_TEST_KEY") as err:
            llm.chat([[{"role": "user", "content": "hi"}]])
    assert KEY not in str(err.value) and len(server.requests) == 1


def test_unreachable_port(monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChat(config(f"http://127.0.0.1:{port}/v1", max_retries=2))
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match=f"llm.base_url=http://127.0.0.1:{port}/v1 after 3 "
                                       "attempts.*server is running"):
        llm.chat([[{"role": "user", "content": "hi"}]])
    assert time.perf_counter() - t0 < 5


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("GYM_TEST_KEY", raising=False)
    with pytest.raises(LLMError, match="environment variable GYM_TEST_KEY"):
        OpenAIChat(config("http://127.0.0.1:9/v1"))


def test_the_key_never_lands_in_the_config_or_repr(monkeypatch, tiny_overrides):
    from tests.conftest import compose

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cfg = compose(["llm=openai", "llm.model=m", "algorithm=cl_grpo"])
    assert KEY not in OmegaConf.to_yaml(cfg)
    assert cfg.llm.api_key_env == "OPENAI_API_KEY"
    assert KEY not in repr(OpenAIChat(cfg.llm))
