"""Hugging Face engine: batched sampling with the trainer's own model and a KV cache.

It shares the policy module with the trainer (no weight copy, nothing to sync) and
runs its own decode loop over the model's forward, rather than ``model.generate``,
for three reasons: the sampled tokens' log-probabilities are recorded exactly as the
trainer defines them (temperature-scaled, before top-k/top-p) without keeping a
``[steps, batch, vocab]`` tensor of scores; sampling draws from dedicated, seeded
``torch.Generator`` streams (``generate`` only uses the global RNG): one per prompt when
the caller passes ``prompt_seeds`` (training: a prompt samples the same tokens whatever
batch or rank it lands in), else the engine's own, checkpointed one; and rows that
finish are dropped from the batch and its cache, so a group of mostly short answers
does not pay for its longest one. ``SamplingParams.plus_greedy`` adds one greedy row per
prompt to the same batch (evaluation's greedy accuracy alongside its samples: one prefill
and one decode instead of two).

Prompts are left-padded and prefilled once per prompt; the KV cache is then repeated
``n`` times (``batch_repeat_interleave``), so a group of G completions costs one
prefill, not G.

Under a 16-bit model the engine samples from the logits the trainer scores: the backbone's
hidden state through the LM head in float32 (``grpo.logprobs``'s head), not the model's own
16-bit logits, whose rounding made every rollout slightly more off-policy (the main job's
engine-vs-trainer log-prob difference fell from 0.034 to 0.025 nats per token; the rest is
the bf16 backbone rounding differently along the incremental decode and the full forward).
A head that is more than a linear map (scaled or capped logits, a LoRA on the head:
``grpo.logprobs.fast_head_agrees`` says no) keeps the model's own logits, as the trainer
then does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from grpo.engines.base import Completion, SamplingParams
from grpo.fused_lora import cached_lora_casts, prepare_decode_weights
from grpo.kv_cache import RESERVE_TOKENS, reserved_cache
from grpo.logprobs import fast_head_agrees, split_head
from grpo.prepared_linear import float32_linear


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) truncation: removed entries become -inf.

    logits: (B, V), already divided by the temperature. The most likely token always
    survives, so every row keeps at least one finite entry.
    """
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class PromptStreams:
    """One ``torch.Generator`` per prompt; a row draws from its prompt's stream.

    ``owner[r]`` is the prompt of row r. Draws for a prompt's live rows are taken in row
    order, so a prompt's tokens depend only on its own stream and its own rows, not on
    which other prompts share the batch.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def rand(self, owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One uniform per row (B, 1); ``owner``: (B,) prompt index of each row."""
        u = torch.empty((owner.shape[0], 1), dtype=dtype, device=owner.device)
        for p in owner.unique().tolist():  # sorted prompt order
            rows = (owner == p).nonzero().squeeze(-1)
            u[rows] = torch.rand((rows.shape[0], 1), generator=self.generators[p], device=owner.device, dtype=dtype)
        return u


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                  streams: PromptStreams | None = None,
                  owner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token per row; return (tokens (B,), logprobs (B,)).

    The uniforms come from ``streams`` (row r from prompt ``owner[r]``'s stream) when given,
    else from ``generator``.

    The log-probability is under softmax(logits / T) (T = 1 when greedy), before
    truncation, matching ``grpo.logprobs.sampled_logprobs`` at the same temperature.

    Without top-k / top-p the sampling distribution is that softmax itself, so one softmax
    pass serves both: the tokens are drawn from it (the same probabilities, hence the same
    tokens, as a separate log-softmax + softmax would give) and the chosen token's log-prob
    is the log of its probability, for B entries only (equal to the log-softmax up to float
    rounding, < 1e-6 measured; a sampled token's probability is never denormal in practice). At T = 1
    the division is skipped (x / 1 is x exactly).
    """
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
        logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    if params.top_k or params.top_p < 1.0:
        probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
        tokens = _inverse_cdf_sample(probs, generator, streams, owner)
        return tokens, scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    probs = scaled.softmax(-1)  # (B, V)
    tokens = _inverse_cdf_sample(probs, generator, streams, owner)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None,
                        streams: PromptStreams | None = None, owner: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row, drawn with probability ``probs`` (B, V) by inverting the CDF.

    Same distribution as ``torch.multinomial(probs, 1)`` but one uniform per row instead of
    one exponential per vocabulary entry (about 5x cheaper on CPU for a 49k vocabulary).
    ``side="right"`` returns the first index whose cumulative mass exceeds u, which is never
    a zero-probability token (its cumulative mass equals its predecessor's).
    """
    cdf = probs.cumsum(-1)
    if streams is not None and owner is not None:
        u = streams.rand(owner, cdf.dtype) * cdf[:, -1:]
    else:
        u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, side="right").squeeze(-1).clamp_(max=probs.shape[-1] - 1)


GREEDY = SamplingParams(temperature=0.0)
SHARED_PREFIX_MIN = 16  # tokens; a shorter common prefix is not worth a separate forward


def _common_prefix_len(prompts: Sequence[list[int]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


class HFEngine:
    """Rollout engine over a (peft) causal LM shared with the trainer."""

    samples_from_trainer_module = True  # FSDP2: the trainer gathers the sharded weights around generate()
    samples_greedy_alongside = True  # SamplingParams.plus_greedy: a greedy row per prompt in the same batch

    def __init__(self, model, tokenizer, *, seed: int = 0, max_batch_size: int = 256, float32_head: bool = True,
                 packed_weights: bool = False, merged_weights: bool = False, reserved_kv: bool = True):
        self.model = model
        self.reserved_kv = reserved_kv  # the KV cache reserved per generation, in attention's dtype (grpo.kv_cache)
        # decode through float32 copies of the LoRA layers' weights (adapter merged in and/or in
        # oneDNN's packed layout: grpo.fused_lora), made here first, so a memory plan sees them
        self.packed_weights, self.merged_weights = packed_weights, merged_weights
        if packed_weights or merged_weights:
            prepare_decode_weights(model, packed_weights, merged_weights)
        self.float32_head = float32_head  # False: the model's own logits, whatever its dtype
        self._head: tuple | None = None  # (backbone, head) once checked, when the float32 head applies
        self._head_checked = False
        self._logits = None  # inside generate(): forward(**inputs) -> (KV cache, last float32 logits)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = torch.tensor(sorted(eos_ids), device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.eos_ids[0])

    # ------------------------------------------------------------------ engine API
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seed: int | None = None, prompt_seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """``prompt_seeds``: one random stream per prompt (``grpo.engines.base.stream_seed``);
        else ``seed`` draws from a fresh generator (evaluation), leaving the run's stream untouched."""
        if not prompts:
            return []
        if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
            raise ValueError(f"{len(prompt_seeds)} prompt seeds for {len(prompts)} prompts")
        if params.plus_greedy and params.greedy:
            raise ValueError("plus_greedy adds a greedy row to sampled ones: the temperature must be > 0")
        generator = self.generator
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        per_chunk = max(1, self.max_batch_size // max(1, params.n + params.plus_greedy))
        out: list[list[Completion]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            # the weights cannot change while generating
            with cached_lora_casts(self.model, self.packed_weights, self.merged_weights):
                self._logits = self._logit_function(prompts[0])
                for start in range(0, len(prompts), per_chunk):
                    streams = None
                    if prompt_seeds is not None:
                        streams = PromptStreams(prompt_seeds[start:start + per_chunk], self.device)
                    out.extend(self._generate(list(prompts[start:start + per_chunk]), params, generator, streams))
        finally:
            self._logits = None  # on a GPU this drops the call's float32 head copy
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def _logit_function(self, prompt: list[int]):
        """``forward(**model inputs) -> (KV cache, last position's float32 logits)`` for this
        generate call: the backbone and a float32 copy of the LM head where the head is a plain
        16-bit linear map (on CPU prepared once per weight and kept, ``float32_linear``; on a
        GPU cast once per call), the backbone and ``float32_linear`` for a float32 head on CPU
        (oneDNN's packed weight instead of MKL's per-call packing), else the model's own forward."""
        if not self._head_checked:  # once: the model's architecture does not change
            self._head_checked = True
            parts = split_head(self.model) if self.float32_head else None
            # a 16-bit head: float32 logits; a float32 head on CPU: the same logits through oneDNN's
            # packed weight, which the trainer's log-prob head already keeps (``float32_linear``)
            if parts is not None and (parts[1].weight.dtype != torch.float32 or parts[1].weight.device.type == "cpu"):
                self._head = parts if fast_head_agrees(self.model, prompt[:16])[0] else None
        if self._head is None:
            def forward(**inputs):
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
                return out.past_key_values, out.logits[:, -1, :]
            return forward
        backbone, head = self._head
        if head.weight.device.type == "cpu":  # prepared once per weight, kept (grpo.logprobs.float32_linear)
            linear = float32_linear(head)
        else:  # cast once per call: no float32 copy outlives the generation on a GPU
            w32, b32 = head.weight.float(), None if head.bias is None else head.bias.float()

            def linear(x):
                return torch.nn.functional.linear(x.float(), w32, b32)

        def forward(**inputs):
            out = backbone(**inputs, use_cache=True)
            return out.past_key_values, linear(out.last_hidden_state[:, -1, :])  # float32 logits
        return forward

    def sync_weights(self) -> None:
        pass  # the engine samples from the trainer's own module

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        pass

    # ---------------------------------------------------------------- decode loop
    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
                  streams: PromptStreams | None = None) -> list[list[Completion]]:
        # G rows per prompt; with plus_greedy one more, the last of each prompt's rows, decoded greedily
        P, G, dev = len(prompts), params.n + params.plus_greedy, self.device
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        cache, logits, mask = self._prefill(prompts, params.max_new_tokens)  # logits: (P, V); mask: (P, cached length)
        if G > 1:
            cache.batch_repeat_interleave(G)
            logits, mask = logits.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        B = P * G
        next_pos = mask.sum(-1)  # (B,) position of the next token
        rows = torch.arange(B, device=dev)  # original row of each live cache row
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        stops: dict[int, str] = {}  # row -> the stop string that ended it
        for step in range(params.max_new_tokens):
            tok, lp = self._sample(logits, params, generator, streams, rows, G)
            for r, t, l in zip(rows.tolist(), tok.tolist(), lp.tolist()):
                tokens[r].append(t)
                logps[r].append(l)
            done = torch.zeros_like(tok, dtype=torch.bool) if params.ignore_eos else torch.isin(tok, self.eos_ids)
            if params.stop:
                done |= self._stop_hits(rows.tolist(), tokens, params.stop, stops).to(done.device)
            for r in rows[done].tolist():
                finish[r] = "stop"
            if step == params.max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):  # drop finished rows from the batch and the cache
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                tok, mask, next_pos, rows = tok[keep], mask[keep], next_pos[keep], rows[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            cache, logits = self._logits(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                         past_key_values=cache)
            next_pos = next_pos + 1
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        completions = [Completion(tokens[r], texts[r], logps[r], finish[r],  # type: ignore[arg-type]
                                  {"stop": stops[r]} if r in stops else {}) for r in range(B)]
        return [completions[i * G:(i + 1) * G] for i in range(P)]

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                streams: PromptStreams | None, rows: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample_tokens`` for the live ``rows`` (G per prompt). With ``params.plus_greedy`` each
        prompt's last row takes the argmax; only the sampled rows draw random numbers, so they
        draw what they would in a batch without the greedy rows."""
        owner = torch.div(rows, G, rounding_mode="floor")
        greedy = rows % G == G - 1 if params.plus_greedy else None
        if greedy is None or not bool(greedy.any()):
            return sample_tokens(logits, params, generator, streams, owner)
        tok = torch.empty(rows.shape, dtype=torch.long, device=logits.device)
        lp = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
        sampled, argmax = (~greedy).nonzero().squeeze(-1), greedy.nonzero().squeeze(-1)
        if sampled.numel():
            tok[sampled], lp[sampled] = sample_tokens(logits[sampled], params, generator, streams, owner[sampled])
        tok[argmax], lp[argmax] = sample_tokens(logits[argmax], GREEDY, None)
        return tok, lp

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int):
        """Encode the prompts into a KV cache; return (cache, last-position logits (P, V), mask).

        The cache is ``grpo.kv_cache.reserved_cache``'s (room for the longest prompt plus up to
        ``RESERVE_TOKENS`` new tokens, doubling as needed) where the model's layers allow it
        (and ``reserved_kv``).

        The prompts' longest common prefix, when it is at least ``SHARED_PREFIX_MIN`` tokens
        (a system message, few-shot examples, the earlier turns of an episode's group), is
        encoded once and its cache repeated to every row; each prompt's own suffix is then
        encoded on top, left-padded *within the suffix segment* (mask 0, positions continuing
        the prefix's), so the cost is one prefix plus P suffixes instead of P whole prompts.
        Every prompt keeps at least one suffix token, whose logits start the sampling.
        """
        dev, P = self.device, len(prompts)
        shared = _common_prefix_len(prompts) if P > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)
        if shared < SHARED_PREFIX_MIN:
            shared = 0
        longest = max(len(p) for p in prompts)
        cache = None
        if self.reserved_kv:
            cache = reserved_cache(self.model, longest + min(max_new_tokens, RESERVE_TOKENS), longest + max_new_tokens)
        if shared:
            head = torch.tensor([prompts[0][:shared]], device=dev)
            cache = self._logits(input_ids=head, position_ids=torch.arange(shared, device=dev)[None],
                                 past_key_values=cache)[0]
            cache.batch_repeat_interleave(P)
        L = longest - shared
        input_ids = torch.full((P, L), self.pad_id, dtype=torch.long, device=dev)
        own = torch.zeros((P, L), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):  # left padding (of the suffix segment)
            input_ids[i, L - len(p) + shared:] = torch.tensor(p[shared:], device=dev)
            own[i, L - len(p) + shared:] = 1
        mask = torch.cat([own.new_ones((P, shared)), own], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache, logits = self._logits(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                     past_key_values=cache)
        return cache, logits, mask

    def _stop_hits(self, rows: list[int], tokens: list[list[int]], stop: tuple[str, ...],
                   stops: dict[int, str]) -> torch.Tensor:
        """(live rows,) True where the newest token completed a stop string (recorded in ``stops``).

        Only the last few tokens are decoded: enough to hold the longest stop string (every
        token decodes to at least one character), so the check costs no more per step for
        long completions. A row stops the first time a string appears, so a hit in the
        window is always new.
        """
        window = max(len(s) for s in stop) + 1
        texts = self.tokenizer.batch_decode([tokens[r][-window:] for r in rows], skip_special_tokens=True)
        hits = []
        for r, text in zip(rows, texts):
            hit = next((s for s in stop if s in text), None)
            if hit is not None:
                stops[r] = hit
            hits.append(hit is not None)
        return torch.tensor(hits, dtype=torch.bool)
