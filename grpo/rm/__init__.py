"""Learned reward models: Bradley-Terry training on preference pairs (``grpo rm train``),
preference pairs from a verifiable task (``grpo rm build-pairs``), the shared text
formatting, and the ``reward_model`` verifier that scores with the trained model
(``grpo.rm.verifier``). See docs/reward_model.md."""
