"""Tools: schemas, the calculator, the sandboxed python tool, the runner's limits, call parsing."""

from __future__ import annotations

import re
import time

import pytest

from grpo.errors import UserError
from grpo.tools.builtin import CalculatorError, PythonTool, calculator
from grpo.tools.environment import ToolEnvironment
from grpo.tools.runner import Tool, ToolCall, ToolRunner, load_tool
from grpo.tools.schema import check_arguments, string_parameter, tool_schema


# ------------------------------------------------------------------------ schema
def test_calculator_schema_is_the_openai_tool_shape():
    schema = tool_schema(calculator)
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "calculator"
    assert fn["description"].startswith("Evaluate an arithmetic expression exactly")
    assert fn["parameters"] == {"type": "object", "required": ["expression"], "properties": {
        "expression": {"type": "string", "description": 'the arithmetic expression, e.g. "23*47 + 12*34"'}}}
    assert string_parameter(schema) == "expression"


def test_tool_without_argument_docs_is_a_user_error():
    def bad(x: int) -> int:
        """No Args section."""
        return x

    with pytest.raises(UserError, match="tool bad: cannot derive its JSON schema"):
        tool_schema(bad, "bad")


def test_arguments_are_checked_against_the_schema():
    def add(a: int, b: int = 0) -> int:
        """Add.

        Args:
            a: first
            b: second
        """
        return a + b

    schema = tool_schema(add)
    assert check_arguments(schema, {"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="missing argument"):
        check_arguments(schema, {"b": 1})
    with pytest.raises(ValueError, match="unknown argument"):
        check_arguments(schema, {"a": 1, "c": 2})
    with pytest.raises(ValueError, match="must be of type integer"):
        check_arguments(schema, {"a": "1"})
    with pytest.raises(ValueError, match="must be of type integer"):
        check_arguments(schema, {"a": True})


# -------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr, want", [
    ("23*47 + 12*34", "1489"),  # 1081 + 408
    ("23 * 47", "1081"),
    ("(3+4)/7", "1"),
    ("2^10", "1024"),
    ("2**10", "1024"),
    ("-5*3", "-15"),
    ("7/2", "7/2 (= 3.5)"),
    ("1.5*2", "3"),
    ("0.1+0.2", "3/10 (= 0.3)"),  # exact, not 0.30000000000000004
])
def test_calculator_is_exact(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr, message", [
    ("10/0", "division by zero"),
    ("__import__('os').system('true')", "cannot parse"),
    ("x + 1", "unsupported"),
    ("9^9^9^9", "too large"),
    ("99999999999999^99999", "too large"),
    ("", "empty"),
    ("1+" * 300 + "1", "longer than"),
])
def test_calculator_refuses_quickly(expr, message):
    t0 = time.perf_counter()
    with pytest.raises(CalculatorError, match=message):
        calculator(expr)
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------------ runner
def _slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke"


def _spin(n: int) -> str:
    """Loop forever.

    Args:
        n: unused
    """
    while True:
        n += 1


def _crash(code: int) -> str:
    """Exit the process.

    Args:
        code: exit status
    """
    import os

    os._exit(code)


def _flood(n: int) -> str:
    """Return n characters.

    Args:
        n: how many
    """
    return "y" * n


def _raise(message: str) -> str:
    """Raise.

    Args:
        message: the error
    """
    raise KeyError(message)


def _tool(fn, isolation="process") -> Tool:
    return Tool(fn.__name__, fn, tool_schema(fn), fn.__name__, isolation)


@pytest.fixture
def runner():
    r = ToolRunner([_tool(f) for f in (_slow, _spin, _crash, _flood, _raise)] + [_tool(calculator, "inline")],
                   timeout_s=1.0, max_observation_chars=50, workers=2)
    yield r
    r.close()


def test_hostile_plugin_tools_cost_one_error_observation_each(runner):
    calls = [ToolCall("_spin", {"n": 0}), ToolCall("_slow", {"seconds": 30}), ToolCall("_crash", {"code": 3}),
             ToolCall("_flood", {"n": 10**7}), ToolCall("_raise", {"message": "boom"}),
             ToolCall("calculator", "6*7"), ToolCall("nope", {}), ToolCall("_slow", {"seconds": "x"}),
             ToolCall("_slow", {"seconds": 0.01})]
    t0 = time.perf_counter()
    out = runner.run(calls)
    elapsed = time.perf_counter() - t0
    assert elapsed < 8, elapsed  # two hangs of 1 s each with 2 workers, plus worker restarts
    spin, slow, crash, flood, err, calc, unknown, bad, ok = out
    assert spin.error and "timed out after 1 s" in spin.text
    assert slow.error and "timed out" in slow.text
    assert crash.error and crash.text.startswith("error: ")
    assert not flood.error and flood.text.startswith("y" * 50) and flood.text.endswith("[9999950 more characters]")
    assert err.error and err.text == "error: KeyError: 'boom'"
    assert (calc.text, calc.error) == ("42", False)
    assert unknown.error and "unknown tool 'nope'" in unknown.text
    assert bad.error and "argument seconds must be" in bad.text
    assert (ok.text, ok.error) == ("woke", False)


class _TwoArgError(Exception):
    def __init__(self, code, detail):  # cannot be rebuilt from its args when unpickled
        super().__init__(f"{code}: {detail}")


def _exit(code: int) -> str:
    """sys.exit.

    Args:
        code: exit status
    """
    import sys

    sys.exit(code)


def _unpicklable(n: int) -> str:
    """Raise an exception that does not unpickle.

    Args:
        n: unused
    """
    raise _TwoArgError(n, "detail")


def _allocate(mb: int) -> str:
    """Allocate and touch memory.

    Args:
        mb: how much
    """
    return str(len(bytearray(mb * 2**20)))


def test_exits_and_unpicklable_exceptions_cost_one_observation_and_keep_the_pool():
    runner = ToolRunner([_tool(_exit), _tool(_unpicklable), _tool(_flood), _tool(_exit, "inline")],
                        timeout_s=5.0, max_observation_chars=80, workers=1)
    try:
        out = runner.run([ToolCall("_exit", {"code": 3}), ToolCall("_unpicklable", {"n": 7}),
                          ToolCall("_flood", {"n": 3})])
        assert [r.text for r in out] == ["error: SystemExit: 3", "error: _TwoArgError: 7: detail", "yyy"]
        runner.tools["_exit"] = _tool(_exit, "inline")  # sys.exit on a thread of the trainer
        assert runner.run([ToolCall("_exit", {"code": 4})])[0].text == "error: SystemExit: 4"
    finally:
        runner.close()


def test_a_process_tools_memory_cap_is_beyond_what_the_trainer_maps():
    """The workers are forks of the trainer: a cap of memory_mb in all would leave a tool nothing
    once the trainer maps more than that (this test process maps torch's libraries already)."""
    from grpo.isolation import address_space_bytes

    assert address_space_bytes() > 256 * 2**20
    runner = ToolRunner([_tool(_allocate)], timeout_s=10.0, memory_mb=256, workers=1)
    try:
        small, big = runner.run([ToolCall("_allocate", {"mb": 64}), ToolCall("_allocate", {"mb": 1024})])
        assert (small.text, small.error) == (str(64 * 2**20), False)
        assert big.error and "ran out of memory (256 MB)" in big.text
    finally:
        runner.close()


def test_json_nested_too_deep_is_a_bad_call():
    env = ToolEnvironment([_tool(calculator, "inline")], call_format="json")
    runner = ToolRunner([_tool(_flood)], workers=1)
    try:
        (turn,) = env.respond(["<tool_call>" + "[" * 100_000 + "</tool_call>"], [{}])
        assert "nested too deep" in turn.observation and turn.errors == 1
        (res,) = runner.run([ToolCall("_flood", "[" * 100_000)])
        assert res.error and "nested too deep" in res.text
    finally:
        env.close()
        runner.close()


# ------------------------------------------------------------------- python tool
@pytest.fixture(scope="module")
def python_tool():
    tool = PythonTool(timeout_s=2.0, max_output_bytes=10_000)
    yield tool
    tool.close()


def test_python_tool_returns_stdout_and_errors(python_tool):
    assert python_tool("print(2**100)") == str(2**100) + "\n"
    with pytest.raises(RuntimeError, match="ZeroDivisionError: division by zero"):
        python_tool("print('before')\n1/0")


@pytest.mark.parametrize("code, message", [
    # infinite loop: the runner's 2 s wall timeout or the sandbox's 2 s CPU limit, whichever fires first
    ("while True:\n    pass", "timed out after 2 s|stopped at its CPU time limit"),
    ("import os\nwhile True:\n    os.fork()", "BlockingIOError"),  # fork bomb: stopped by RLIMIT_NPROC
    ("print('x' * 10**8)", "output limit exceeded"),  # output flood past max_output_bytes
    ("import os\nos._exit(0)", "exited early"),  # leaves without the end marker
    ("import socket\nsocket.create_connection(('8.8.8.8', 53))", "PermissionError"),  # no network
])
def test_hostile_python_is_an_error_observation_within_the_time_limit(python_tool, code, message):
    runner = ToolRunner([Tool("python", python_tool, tool_schema(python_tool.__call__, "python"), "python",
                              "inline")], timeout_s=2.0, max_observation_chars=200)
    t0 = time.perf_counter()
    (res,) = runner.run([ToolCall("python", code)])
    assert time.perf_counter() - t0 < 2.0 + 10.0  # the sandbox's wall limit plus its own margin
    assert res.error, res.text
    assert res.text.startswith("error: ") and re.search(message, res.text), res.text


def test_load_tool_builds_class_tools_with_options():
    tool = load_tool("python", {"timeout_s": 1.5, "unrelated": 1})
    try:
        assert tool.tag == "python" and tool.isolation == "inline"
        assert tool.fn.__self__.timeout_s == 1.5
        assert tool.schema["function"]["parameters"]["required"] == ["code"]
    finally:
        tool.close()
    with pytest.raises(UserError, match="unknown tool 'calculater'.*'calculator'"):
        load_tool("calculater", {})


# ------------------------------------------------------------------ call formats
def test_tagged_calls_are_parsed_from_the_end_of_a_turn():
    env = ToolEnvironment([load_tool("calculator", {})])
    try:
        assert env.stop == ("</calc>",)
        call = env.parse_call("Let me see. <calc> 23 * 47 </calc>")
        assert (call.name, call.arguments, call.error) == ("calculator", "23 * 47", "")
        assert env.parse_call("The answer is 1081.") is None
        assert "without an opening" in env.parse_call("oops </calc>").error
        (turn,) = env.respond(["<calc>23*47</calc>"], [{}])
        assert turn.observation == "<output>1081</output>" and turn.errors == 0
        (turn,) = env.respond(["<calc>1/0</calc>"], [{}])
        assert turn.observation == "<output>error: CalculatorError: division by zero</output>" and turn.errors == 1
        (turn,) = env.respond(["done"], [{}])
        assert turn.observation is None
    finally:
        env.close()


def test_json_calls():
    env = ToolEnvironment([load_tool("calculator", {})], call_format="json",
                          observation_template="<tool_response>{result}</tool_response>")
    try:
        assert env.stop == ("</tool_call>",)
        (turn,) = env.respond(['<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'],
                              [{}])
        assert turn.observation == "<tool_response>42</tool_response>"
        (bad,) = env.respond(["<tool_call>{not json</tool_call>"], [{}])
        assert bad.errors == 1 and "not valid JSON" in bad.observation
    finally:
        env.close()


TOOL_TEMPLATE = (
    "{%- if tools %}<|system|>Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<|end|>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'tool' %}<|user|><tool_response>{{ m['content'] }}</tool_response><|end|>"
    "{%- else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_format_uses_the_templates_own_tool_framing(tiny_model_dir):
    from grpo.config import ToolsConfig
    from grpo.models import load_tokenizer
    from grpo.prompts import encode_prompt
    from grpo.tools.episodes import build_episode_engine

    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(UserError, match="no tool support"):  # conftest's template has none
        build_episode_engine(ToolsConfig(enabled=["calculator"], call_format="chat"), None, tok)
    tok.chat_template = TOOL_TEMPLATE
    episodes = build_episode_engine(ToolsConfig(enabled=["calculator"], call_format="chat"), None, tok)
    env = episodes.environment
    assert env.template == "<|end|><|user|><tool_response>{result}</tool_response><|end|><|assistant|>"
    assert env.stop == ("</tool_call>",)
    (turn,) = env.respond(['<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'],
                          [{}])
    assert turn.observation == "<|end|><|user|><tool_response>42</tool_response><|end|><|assistant|>"
    prompt = encode_prompt(tok, [{"role": "user", "content": "hi"}], tools=episodes.prompt_tools)
    assert tok.decode(prompt).startswith("<|system|>Tools: calculator<|end|><|user|>hi")
    env.close()


def test_calc_arith_rows_are_distinct_disjoint_and_say_when_there_are_fewer(capsys):
    from tasks.tooluse import CalcArith

    task = CalcArith(train_size=50, heldout_size=20)
    train, heldout = task.rows("train"), task.rows("heldout")
    assert (len(train), len(heldout)) == (50, 20) and capsys.readouterr().err == ""
    questions = [r["prompt"][-1]["content"] for r in train + heldout]
    assert len(set(questions)) == 70  # distinct, and no problem in both splits
    small = CalcArith(mix={"small_sum": 1.0}, train_size=1000).rows("train")
    assert len(small) < 1000
    assert f"warning: calc_arith: {len(small)} distinct train problems" in capsys.readouterr().err
