"""Prompts: what a row's prompt may be, and every prompt checked before training (grpo/prompts.py)."""

from __future__ import annotations

import pytest

from grpo.errors import UserError
from grpo.prompts import check_prompts, encode_prompt


class Tokenizer:
    """A chat template that shows what it was given; ``refuse_system`` as Gemma's refuses a system turn."""

    chat_template = "{{ messages }}"

    def __init__(self, refuse_system: bool = False):
        self.refuse_system, self.seen = refuse_system, None

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **extra):
        from jinja2.exceptions import TemplateError

        if self.refuse_system and messages[0]["role"] == "system":
            raise TemplateError("System role not supported")
        self.seen = messages
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        class Out:
            input_ids = [ord(c) for c in text]
        return Out()


def test_text_parts_are_joined_and_other_contents_refused():
    tok = Tokenizer()
    encode_prompt(tok, [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]}])
    assert tok.seen == [{"role": "user", "content": "2+2?"}]
    for content in (None, 3, [{"type": "image_url", "image_url": "x"}]):
        with pytest.raises(UserError, match="a user message's content must be text"):
            encode_prompt(tok, [{"role": "user", "content": content}])
    with pytest.raises(UserError, match="non-empty list"):
        encode_prompt(tok, [])


def test_a_prompt_that_ends_with_the_answer_is_refused():
    with pytest.raises(UserError, match="ends with an assistant message"):
        encode_prompt(Tokenizer(), [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])


def test_a_template_that_refuses_the_prompt_is_one_line():
    with pytest.raises(UserError, match="the tokenizer's chat template refused the prompt: System role not supported"):
        encode_prompt(Tokenizer(refuse_system=True), [{"role": "user", "content": "hi"}], system_prompt="Be brief.")


def test_check_prompts_names_the_bad_row_and_the_longest():
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": "x" * (i + 1)}]} for i in range(5)]
    encode = lambda p: encode_prompt(Tokenizer(), p)  # noqa: E731
    assert check_prompts({"train": rows}, encode, "t", 100, 10) == 5
    bad = rows[:3] + [{"id": "r3", "prompt": [{"role": "user", "content": None}]}]
    with pytest.raises(UserError, match=r"task t: heldout row 3 \(id 'r3'\): a user message's content must be text"):
        check_prompts({"train": rows, "heldout": bad}, encode, "t", 100, 10)
    with pytest.raises(UserError, match=r"task t: train row 4 \(id 'r4'\) has a 5-token prompt; with 8 completion "
                                        r"tokens that is past the model's context of 12 positions"):
        check_prompts({"train": rows}, encode, "t", 12, 8)


def test_a_bad_row_stops_a_run_before_training(tiny_model_dir, toy_plugin, tmp_path, capsys):
    import json

    from grpo.cli import main
    from conftest import tiny_run_config

    data = tmp_path / "rows.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(20)]
    rows[7]["question"] = "x " * 5000  # past the tiny model's context
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [a for a in tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin, steps=1)
            if not a.startswith("task.")]
    empty = tmp_path / "empty.yaml"
    empty.write_text("# overrides only\n")
    assert main(["train", "--no-progress", str(empty), *args, "task.name=gsm8k", f"task.args.path={data}",
                 "task.args.heldout_fraction=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: task gsm8k: ") and "past the model's context" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_chat_template_joins_the_messages_and_says_so_once(capsys):
    class Plain(Tokenizer):
        chat_template = None

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert encode_prompt(Plain(), messages) == [ord(c) for c in "Be brief.\n2+2?\n"]
    encode_prompt(Plain(), messages)
    assert capsys.readouterr().err.count("warning: the tokenizer has no chat template") == 1
