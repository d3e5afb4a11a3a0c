"""Models: the Llama-family causal LM, the MiniLM sentence encoder and the policy network.

``load_pretrained`` / ``save_pretrained`` / ``init`` return or take an :class:`LM` handle whose
``apply(params, input_ids, attention_mask=None, positions=None)`` is a pure, jittable function.
"""

from teams_rl_jax.models.config import ModelConfig, read_hf_config
from teams_rl_jax.models.encoder import Encoder, EncoderConfig, load_encoder
from teams_rl_jax.models.lm import LM, init, load_pretrained, save_pretrained
from teams_rl_jax.models.policy import ActorCritic

__all__ = ["ActorCritic", "Encoder", "EncoderConfig", "LM", "ModelConfig", "init", "load_encoder", "load_pretrained", "read_hf_config",
           "save_pretrained"]
