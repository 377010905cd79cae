"""Multi-turn episodes as plain data, and the engine wrapper that rolls them out.

An episode is the prompt followed by alternating segments::

    prompt | model turn 1 | observation 1 | model turn 2 | ... | model turn k

Model turns are the engine's token ids exactly as sampled (never decoded and
re-encoded, so the trainer's log-probs match the engine's); observations are the
environment's text, encoded once and appended. The trainer sees an episode as one
``Completion`` over everything after the prompt, with ``loss_mask`` 1 on model tokens
and 0 on observation tokens (in the context, no gradient), ``logprobs`` 0 at
observation tokens, ``text`` = the last model turn (what the verifiers score) and the
whole transcript in ``extra``. Group-relative advantages are then per episode, as
for single-turn completions.

``EpisodeEngine`` implements the engine protocol around any engine (HF, vLLM) that
takes prompt token ids and ``SamplingParams.stop``; the trainer and ``grpo eval`` use
it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from grpo.engines.base import Completion, SamplingParams, stream_seed

TURN_SEED_STRIDE = 1_000_003  # seeded (evaluation) rollouts: turn t samples with seed + t * stride


@dataclass
class Episode:
    prompt: list[int]
    budget: int  # tokens after the prompt (model + observations)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)  # {"role": model|observation, ...}
    state: dict[str, Any] = field(default_factory=dict)  # the environment's per-episode state
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    observation_tokens: int = 0
    finish_reason: str = "stop"
    last_text: str = ""
    open: bool = True  # waiting for the environment's reply

    @property
    def remaining(self) -> int:
        return self.budget - len(self.token_ids)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.token_ids

    def add_model_turn(self, c: Completion, tokenizer) -> None:
        ids, lps, finish, text = c.token_ids, c.logprobs, c.finish_reason, c.text
        if len(ids) > self.remaining:  # the turn ran past the episode's token budget
            ids, lps, finish = ids[:self.remaining], lps[:self.remaining], "length"
            text = tokenizer.decode(ids, skip_special_tokens=True)
        self.token_ids += ids
        self.logprobs += lps
        self.loss_mask += [1] * len(ids)
        self.turns += 1
        self.last_text, self.finish_reason = text, finish
        self.open = finish == "stop"
        self.segments.append({"role": "model", "text": text, "num_tokens": len(ids)})

    def add_observation(self, ids: list[int], text: str, calls: list[dict[str, Any]], errors: int) -> None:
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)
        self.count_calls(calls, errors)
        self.observation_tokens += len(ids)
        self.segments.append({"role": "observation", "text": text, "num_tokens": len(ids), "calls": calls})

    def count_calls(self, calls: list[dict[str, Any]], errors: int) -> None:
        """Tool calls that ran for this episode (their errors count toward the penalty)."""
        self.tool_calls += len(calls)
        self.tool_errors += errors

    def completion(self, tokenizer, error_penalty: float) -> Completion:
        metrics = {"episode/turns": float(self.turns), "episode/tool_calls": float(self.tool_calls),
                   "episode/tool_errors": float(self.tool_errors),
                   "episode/observation_tokens": float(self.observation_tokens)}
        extra: dict[str, Any] = {
            "transcript": tokenizer.decode(self.token_ids, skip_special_tokens=True),
            "segments": self.segments, "metrics": metrics,
            "reward_terms": {"tool_error_penalty": -error_penalty * self.tool_errors} if error_penalty else {},
        }
        return Completion(list(self.token_ids), self.last_text, list(self.logprobs),
                          self.finish_reason, extra, list(self.loss_mask))  # type: ignore[arg-type]


class EpisodeEngine:
    """The engine protocol over multi-turn episodes: model turn -> environment -> model turn ..."""

    def __init__(self, engine, tokenizer, environment, *, max_turns: int, max_episode_tokens: int,
                 error_penalty: float = 0.0):
        self.engine, self.tokenizer, self.environment = engine, tokenizer, environment
        self.max_turns, self.max_episode_tokens, self.error_penalty = max_turns, max_episode_tokens, error_penalty
        # tool definitions the chat template renders into prompts (call_format chat), else None
        self.prompt_tools = getattr(environment, "prompt_tools", None)

    @property
    def context_limit(self) -> int | None:  # the wrapped engine's (vLLM's max_model_len), if it has one
        return getattr(self.engine, "context_limit", None)

    @property
    def samples_from_trainer_module(self) -> bool:  # FSDP2: the trainer gathers the weights around generate()
        return getattr(self.engine, "samples_from_trainer_module", False)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seed: int | None = None, prompt_seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """``prompt_seeds``: one random stream per prompt (data-parallel training); episode j of
        prompt i draws its later turns from ``stream_seed(prompt_seeds[i], turn, j)``."""
        if not prompts:
            return []
        if params.plus_greedy:
            raise ValueError("episodes take greedy rows as their own call (plus_greedy is HF-engine only)")
        G = params.n
        turn = replace(params, stop=tuple(params.stop) + tuple(self.environment.stop),
                       max_new_tokens=min(params.max_new_tokens, self.max_episode_tokens))
        episodes = [Episode(list(p), self.max_episode_tokens) for p in prompts for _ in range(G)]
        streams = {} if prompt_seeds is None else {"prompt_seeds": prompt_seeds}
        first = self.engine.generate(prompts, turn, seed=seed, **streams)
        index = {id(ep): i for i, ep in enumerate(episodes)}
        for ep, c in zip(episodes, [c for g in first for c in g]):
            ep.add_model_turn(c, self.tokenizer)
        is_call = getattr(self.environment, "is_call", None)
        for t in range(1, self.max_turns + 1):
            waiting = [ep for ep in episodes if ep.open]
            if not waiting:
                break
            if t == self.max_turns and is_call is not None:  # no model turn left to read a result:
                for ep in waiting:  # a call is cut without being run
                    ep.open = False
                    ep.finish_reason = "length" if is_call(ep.last_text) else ep.finish_reason
                break
            replies = self.environment.respond([ep.last_text for ep in waiting], [ep.state for ep in waiting])
            going = []
            for ep, reply in zip(waiting, replies):
                ep.open = False
                if reply.observation is None:  # a final answer: the episode is over
                    continue
                ids = [] if t == self.max_turns else self.tokenizer(reply.observation, add_special_tokens=False).input_ids
                if t == self.max_turns or len(ids) >= ep.remaining:  # no turn left, or no room for the
                    ep.finish_reason = "length"                       # observation and an answer: cut
                    ep.count_calls(reply.calls, reply.errors)  # they ran (an environment without is_call)
                    continue
                ep.add_observation(ids, reply.observation, reply.calls, reply.errors)
                going.append(ep)
            if not going:
                break
            step = replace(turn, n=1, max_new_tokens=min(turn.max_new_tokens, max(ep.remaining for ep in going)))
            if prompt_seeds is not None:
                streams = {"prompt_seeds": [stream_seed(prompt_seeds[index[id(ep)] // G], t, index[id(ep)] % G)
                                            for ep in going]}
            outs = self.engine.generate([ep.context for ep in going], step,
                                        seed=None if seed is None else seed + t * TURN_SEED_STRIDE, **streams)
            for ep, group in zip(going, outs):
                ep.add_model_turn(group[0], self.tokenizer)
        done = [ep.completion(self.tokenizer, self.error_penalty) for ep in episodes]
        return [done[i * G:(i + 1) * G] for i in range(len(prompts))]

    # The rest of the protocol is the wrapped engine's.
    def sync_weights(self) -> None:
        self.engine.sync_weights()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def close(self) -> None:
        try:
            self.environment.close()
        finally:
            self.engine.close()


def episode_metrics(completions: Sequence[Completion], prefix: str = "") -> dict[str, float]:
    """Means of the episodes' numbers (turns, tool calls, errors, observation tokens), the
    share of episodes that called a tool, and the tool error rate (errors / calls); {} for
    single-turn completions."""
    per = [c.extra["metrics"] for c in completions if "metrics" in c.extra]
    if not per:
        return {}
    out = {f"{prefix}{k}": sum(m[k] for m in per) / len(per) for k in per[0]}
    calls = sum(m["episode/tool_calls"] for m in per)
    out[f"{prefix}episode/tool_call_rate"] = sum(m["episode/tool_calls"] > 0 for m in per) / len(per)
    out[f"{prefix}episode/tool_error_rate"] = sum(m["episode/tool_errors"] for m in per) / calls if calls else 0.0
    return out


def with_episode_terms(totals: Sequence[float], completions: Sequence[Completion]) -> list[float]:
    """Rewards plus each episode's own terms (e.g. the tool-error penalty)."""
    return [t + sum(c.extra.get("reward_terms", {}).values()) for t, c in zip(totals, completions)]


def build_episode_engine(tools_cfg, engine, tokenizer) -> EpisodeEngine:
    """``tools_cfg`` (grpo.config.ToolsConfig): load the tools, build the environment, wrap ``engine``."""
    import inspect

    from grpo.errors import UserError
    from grpo.registry import ENVIRONMENTS
    from grpo.tools.environment import check_tags
    from grpo.tools.runner import load_tool

    tools = [load_tool(name, {"timeout_s": tools_cfg.timeout_s}) for name in tools_cfg.enabled]
    check_tags(tools)
    env_cls = ENVIRONMENTS.get(tools_cfg.environment)
    options = {"call_format": tools_cfg.call_format, "observation_template": tools_cfg.observation_template,
               "timeout_s": tools_cfg.timeout_s, "max_observation_chars": tools_cfg.max_observation_chars,
               "workers": tools_cfg.workers, "tokenizer": tokenizer}
    try:
        accepted = inspect.signature(env_cls).parameters
        has_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        environment = env_cls(tools, **{k: v for k, v in options.items() if has_kwargs or k in accepted})
    except TypeError as exc:
        raise UserError(f"environment {tools_cfg.environment!r}: cannot construct it: {exc}") from exc
    if not getattr(environment, "stop", None):
        raise UserError(f"environment {tools_cfg.environment!r} has no stop strings (its `stop` attribute)")
    return EpisodeEngine(engine, tokenizer, environment, max_turns=tools_cfg.max_turns,
                         max_episode_tokens=tools_cfg.max_episode_tokens, error_penalty=tools_cfg.error_penalty)
