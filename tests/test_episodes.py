"""Multi-turn episodes: the loop, the loss mask, engine/trainer log-prob agreement, a plugin tool in training."""

from __future__ import annotations

import json
import string

import pytest
import torch

from grpo.engines.base import Completion, SamplingParams
from grpo.tools.environment import Turn
from grpo.tools.episodes import EpisodeEngine, episode_metrics, with_episode_terms


class CharTokenizer:
    """One token per character: id = ord(c)."""

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [ord(c) for c in text]
        return Out()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Returns scripted turns in order, checking that each context is the prompt + the episode so far."""

    def __init__(self, turns: list[str], finish: list[str]):
        self.turns, self.finish, self.contexts, self.params = list(turns), list(finish), [], []

    def generate(self, prompts, params, seed=None):
        self.contexts.append([list(p) for p in prompts])
        self.params.append(params)
        out = []
        for _ in prompts:
            group = []
            for _ in range(params.n):
                text, finish = self.turns.pop(0), self.finish.pop(0)
                ids = [ord(c) for c in text]
                group.append(Completion(ids, text, [-0.5] * len(ids), finish))
            out.append(group)
        return out


class CalcLikeEnvironment:
    stop = ("</c>",)

    def __init__(self):
        self.closed = False

    def respond(self, turns, states):
        out = []
        for t in turns:
            if not t.endswith("</c>"):
                out.append(Turn(None))
            elif "bad" in t:
                out.append(Turn("<o>error</o>", [{"tool": "c", "error": True}], 1))
            else:
                out.append(Turn("<o>42</o>", [{"tool": "c", "error": False}], 0))
        return out

    def close(self):
        self.closed = True


def test_three_turn_episode_masks_exactly_the_model_tokens():
    turns = ["a<c>6*7</c>", "b<c>bad</c>", "The answer is 42."]
    engine = ScriptedEngine(turns, ["stop", "stop", "stop"])
    episodes = EpisodeEngine(engine, CharTokenizer(), CalcLikeEnvironment(), max_turns=3, max_episode_tokens=200,
                             error_penalty=0.5)
    (group,) = episodes.generate([[1, 2, 3]], SamplingParams(n=1, max_new_tokens=50, stop=("\n\n",)))
    (c,) = group
    transcript = "a<c>6*7</c>" + "<o>42</o>" + "b<c>bad</c>" + "<o>error</o>" + "The answer is 42."
    assert c.token_ids == [ord(ch) for ch in transcript]  # model ids kept as generated, observations appended
    expected_mask = [1] * 11 + [0] * 9 + [1] * 11 + [0] * 12 + [1] * 17
    assert c.loss_mask == expected_mask
    assert c.logprobs == [-0.5 if m else 0.0 for m in expected_mask]
    assert c.text == "The answer is 42." and c.finish_reason == "stop"
    assert c.extra["transcript"] == transcript
    assert [s["role"] for s in c.extra["segments"]] == ["model", "observation"] * 2 + ["model"]
    assert c.extra["metrics"] == {"episode/turns": 3.0, "episode/tool_calls": 2.0, "episode/tool_errors": 1.0,
                                  "episode/observation_tokens": 21.0}
    # each turn continues from the prompt + everything so far, and stops at the environment's marker too
    assert engine.contexts[1] == [[1, 2, 3] + [ord(ch) for ch in "a<c>6*7</c><o>42</o>"]]
    assert engine.params[0].stop == ("\n\n", "</c>") and engine.params[1].n == 1
    assert with_episode_terms([1.0], [c]) == [0.5]  # one failed call at penalty 0.5


class CountingEnvironment(CalcLikeEnvironment):
    """Says which turns are calls (``is_call``) and counts the turns it was asked to answer."""

    def __init__(self):
        super().__init__()
        self.answered = 0

    def is_call(self, turn):
        return turn.endswith("</c>")

    def respond(self, turns, states):
        self.answered += len(turns)
        return super().respond(turns, states)


def test_episode_is_cut_at_max_turns_and_at_the_token_budget():
    # max_turns=2: the second turn's call is cut without being run (nothing could read its result)
    engine, env = ScriptedEngine(["<c>1</c>", "<c>2</c>"], ["stop", "stop"]), CountingEnvironment()
    (group,) = EpisodeEngine(engine, CharTokenizer(), env, max_turns=2,
                             max_episode_tokens=100).generate([[1]], SamplingParams(n=1))
    assert group[0].finish_reason == "length" and group[0].extra["metrics"]["episode/tool_calls"] == 1
    assert env.answered == 1
    # an environment that cannot say what a call is answers it; the call that ran is counted
    engine = ScriptedEngine(["<c>1</c>", "<c>2</c>"], ["stop", "stop"])
    (group,) = EpisodeEngine(engine, CharTokenizer(), CalcLikeEnvironment(), max_turns=2,
                             max_episode_tokens=100).generate([[1]], SamplingParams(n=1))
    assert group[0].finish_reason == "length" and group[0].extra["metrics"]["episode/tool_calls"] == 2
    # the last turn a final answer: over, not cut
    engine, env = ScriptedEngine(["<c>1</c>", "42"], ["stop", "stop"]), CountingEnvironment()
    (group,) = EpisodeEngine(engine, CharTokenizer(), env, max_turns=2,
                             max_episode_tokens=100).generate([[1]], SamplingParams(n=1))
    assert group[0].finish_reason == "stop" and group[0].text == "42"
    # budget 12: turn 1 (8 tokens) + observation (9) does not fit: cut before the observation
    engine = ScriptedEngine(["<c>1</c>"], ["stop"])
    (group,) = EpisodeEngine(engine, CharTokenizer(), CalcLikeEnvironment(), max_turns=4,
                             max_episode_tokens=12).generate([[1]], SamplingParams(n=1, max_new_tokens=64))
    assert engine.params[0].max_new_tokens == 12
    assert group[0].finish_reason == "length" and group[0].loss_mask == [1] * 8


def test_groups_diverge_per_episode_and_metrics_aggregate():
    # G=2: one episode answers at once, the other calls the tool first
    engine = ScriptedEngine(["42", "<c>x</c>", "so 42"], ["stop", "stop", "stop"])
    (group,) = EpisodeEngine(engine, CharTokenizer(), CalcLikeEnvironment(), max_turns=3,
                             max_episode_tokens=100).generate([[1]], SamplingParams(n=2))
    assert [c.text for c in group] == ["42", "so 42"]
    assert engine.contexts[1] == [[1] + [ord(ch) for ch in "<c>x</c><o>42</o>"]]  # only the open episode
    m = episode_metrics(group)
    assert m["episode/turns"] == 1.5 and m["episode/tool_call_rate"] == 0.5 and m["episode/tool_error_rate"] == 0.0
    assert episode_metrics([Completion([1], "x", [0.0], "stop")]) == {}


# --------------------------------------------------------------- real HF engine
class FirstLetterEnvironment:
    """Ends every model turn at its first letter and always answers: a random model gets 3 full turns."""

    stop = tuple(string.ascii_letters)

    def respond(self, turns, states):
        return [Turn(" =obs= ", [{"tool": "t", "error": False}]) for _ in turns]

    def close(self):
        pass


def test_hf_engine_stops_at_stop_strings(tiny_model_dir):
    from grpo.engines.hf import HFEngine
    from grpo.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, "float32", "cpu")
    engine = HFEngine(model, tok, seed=0)
    prompt = tok("<|user|>hi<|end|><|assistant|>", add_special_tokens=False).input_ids
    groups = engine.generate([prompt], SamplingParams(n=8, max_new_tokens=40, stop=tuple(string.ascii_letters)))
    stopped = [c for c in groups[0] if "stop" in c.extra]
    assert stopped, "a random char model should hit a letter within 40 tokens"
    for c in stopped:
        # the last token completed the stop string, no earlier token did
        assert tok.decode(c.token_ids[-1:]) == c.extra["stop"]
        assert not any(ch in string.ascii_letters for ch in tok.decode(c.token_ids[:-1]))


def test_trainer_logprobs_equal_engine_logprobs_over_a_three_turn_episode(tiny_model_dir):
    from grpo.engines.hf import HFEngine
    from grpo.logprobs import grouped_logprobs, pack_grouped
    from grpo.models import add_lora, load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = add_lora(load_causal_lm(tiny_model_dir, "float32", "cpu"), 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():  # non-zero LoRA so the adapter is part of the computation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    engine = EpisodeEngine(HFEngine(model, tok, seed=3), tok, FirstLetterEnvironment(), max_turns=3,
                           max_episode_tokens=120)
    prompts = [tok("<|user|>q1<|end|><|assistant|>", add_special_tokens=False).input_ids,
               tok("<|user|>longer q2<|end|><|assistant|>", add_special_tokens=False).input_ids]
    groups = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=30, temperature=0.9))
    flat = [c for g in groups for c in g]
    assert all(c.extra["metrics"]["episode/turns"] == 3 for c in flat)  # three model turns each
    obs_len = len(tok(" =obs= ", add_special_tokens=False).input_ids)
    for c in flat:
        assert sum(1 - m for m in c.loss_mask) == 2 * obs_len
    batch = pack_grouped(prompts, [0, 0, 1, 1], [c.token_ids for c in flat], tok.pad_token_id, "cpu",
                         [c.loss_mask for c in flat])
    assert torch.equal(batch.loss_mask.sum(-1), torch.tensor([sum(c.loss_mask) for c in flat]))
    model.eval()
    with torch.no_grad():
        trainer_lp = grouped_logprobs(model, batch, temperature=0.9, pad_id=tok.pad_token_id)
        # the model's own forward (used when the LM head is not a plain linear map) agrees too
        forward_lp = grouped_logprobs(model, batch, temperature=0.9, pad_id=tok.pad_token_id, fast_head=False)
    for row, c in enumerate(flat):
        engine_lp = torch.tensor(c.logprobs)
        for lp in (trainer_lp, forward_lp):
            got = lp[row, :len(c.token_ids)]
            assert torch.allclose(got, engine_lp, atol=1e-4), (got - engine_lp).abs().max()
            assert torch.all(got[torch.tensor(c.loss_mask) == 0] == 0)  # observations get no log-prob


# ------------------------------------------------------------- plugin tool, trained
TOOL_PLUGIN = '''
"""A plugin tool (and an environment that calls it on every turn, so a random model uses it)."""
import os
import string

from grpo.registry import ENVIRONMENTS, TOOLS
from grpo.tools.environment import ToolEnvironment


@TOOLS.register("tally")
def tally(text: str) -> str:
    """Count characters and record the call.

    Args:
        text: any text
    """
    with open(os.environ["TALLY_LOG"], "a") as f:
        f.write(text.replace("\\n", " ") + "\\n")
    return str(len(text))


@ENVIRONMENTS.register("every_letter")
class EveryLetter(ToolEnvironment):
    """Each model turn ends at its first letter and is passed to the first tool."""

    def __init__(self, tools, **options):
        super().__init__(tools, **options)
        self.stop = tuple(string.ascii_letters)

    def parse_call(self, turn):
        from grpo.tools.runner import ToolCall
        return ToolCall(next(iter(self.tools)), turn)
'''


@pytest.fixture(scope="session")
def tally_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("tally") / "tally_plugin.py"  # one file: a plugin registers once per process
    path.write_text(TOOL_PLUGIN)
    return path


def test_plugin_tool_from_a_file_is_used_in_a_two_step_run(tiny_model_dir, toy_plugin, tally_plugin, tmp_path,
                                                           monkeypatch):
    from conftest import tiny_run_config
    from grpo.cli import main

    plugin = tally_plugin
    log = tmp_path / "tally.log"
    monkeypatch.setenv("TALLY_LOG", str(log))
    run_dir = tmp_path / "run"
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# overrides only\n")
    overrides = tiny_run_config(tiny_model_dir, run_dir, toy_plugin, plugins=f"[{toy_plugin}, {plugin}]",
                                **{"tools.enabled": "[tally]", "tools.environment": "every_letter",
                                   "tools.max_turns": 3, "tools.max_episode_tokens": 40,
                                   "tools.error_penalty": 0.25, "loss.overlong_buffer": 4, "eval.greedy": "false"})
    assert main(["train", "--no-progress", str(cfg), *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["episode/tool_calls"] > 0 and r["episode/turns"] > 1 for r in train)
    # each shaping term logged on its own: the overlong penalty is not charged the tool errors' penalty
    assert all(r["reward/tool_error_penalty"] == pytest.approx(-0.25 * r["episode/tool_errors"]) for r in train)
    assert all(-1.0 <= r["reward/overlong_penalty"] <= 0.0 for r in train)
    assert any("heldout/episode/tool_call_rate" in r for r in records)
    assert log.read_text().strip()  # the plugin tool itself ran (in a worker process)
    samples = [json.loads(line) for line in next((run_dir / "eval").glob("samples-*.jsonl")).read_text().splitlines()]
    assert any(s["transcript"] != s["completion"] for s in samples)  # the whole transcript is logged
    # the loss saw fewer tokens than were generated: the observations are masked
    assert all(r["tokens_in_loss"] < r["tokens/generated"] for r in train)


def test_packing_with_tool_episodes_is_refused():
    from grpo.config import load_config
    from grpo.errors import UserError

    with pytest.raises(UserError, match="optim.packing does not support tool episodes"):
        load_config(None, ["tools.enabled=[calculator]", "optim.packing=true"])


def test_grpo_eval_runs_episodes_from_a_training_config(tiny_model_dir, toy_plugin, tally_plugin, tmp_path,
                                                        monkeypatch):
    from grpo.cli import main

    plugin = tally_plugin
    monkeypatch.setenv("TALLY_LOG", str(tmp_path / "tally.log"))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps({
        "model": {"name": str(tiny_model_dir), "device": "cpu"}, "task": {"name": "toy_digits"},
        "plugins": [str(toy_plugin), str(plugin)], "rollout": {"max_new_tokens": 8},
        "tools": {"enabled": ["tally"], "environment": "every_letter", "max_turns": 2, "max_episode_tokens": 30},
        "eval": {"num_problems": 2, "num_samples": 2, "k": [1, 2]}}))
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(cfg), "--out", str(out)]) == 0
    text = "\n".join(p.read_text() for p in out.rglob("*.json*"))
    assert "episode/tool_call_rate" in text and "transcript" in text
    assert main(["eval", "--config", str(cfg), "--tools", '{"max_turns": 0}']) == 2  # one error: line


def test_constant_aggregation_normalises_episodes_by_the_episode_budget():
    from grpo.config import load_config
    from grpo.trainer import Trainer

    single = Trainer(load_config(None, ["rollout.max_new_tokens=40"]))
    assert single._max_completion_tokens() == 40
    episodes = Trainer(load_config(None, ["rollout.max_new_tokens=40", "tools.enabled=[calculator]",
                                          "tools.max_episode_tokens=128"]))
    assert episodes._max_completion_tokens() == 128  # turns + observations, not one turn's cap
