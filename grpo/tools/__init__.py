"""Tools and multi-turn episodes: the model calls a tool mid-answer, the environment replies.

Modules:

* ``schema``      a tool is a typed, docstringed function; its JSON schema (OpenAI /
                  transformers tool-definition shape) and argument checking;
* ``builtin``     the ``calculator`` and ``python`` tools;
* ``runner``      executes calls: time limits, process isolation, truncated output,
                  every failure an error observation, never an exception in the run;
* ``environment`` the ``Environment`` protocol and the built-in ``tools`` environment
                  (tagged calls ``<calc>EXPR</calc>`` or JSON ``<tool_call>`` calls);
* ``episodes``    ``EpisodeEngine``: wraps a rollout engine, loops model turn ->
                  observation -> model turn, and returns each episode as one
                  ``Completion`` whose ``loss_mask`` marks the model's tokens.

Why here, under ``grpo/``: tools run inside the rollout (between engine calls), so they
belong to the trainer's room, not to ``verifiers/`` (which turns finished completions
into numbers and may import from ``grpo`` only ``errors`` and ``registry``). The
dependency is one way: ``grpo.tools.builtin`` reuses ``verifiers.sandbox`` (the python
tool) and ``verifiers.mathcheck``'s bounded parser (the calculator) through their public
names; nothing in ``verifiers/`` or ``tasks/`` imports this package.
"""
