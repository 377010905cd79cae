"""Learned reward models: Bradley-Terry training on preference pairs (``grpo rm train``),
preference pairs from a verifiable task (``grpo rm build-pairs``), and the shared text
formatting the ``reward_model`` verifier scores with. See docs/reward_model.md."""
