"""Models: the Llama-family causal LM, the MiniLM sentence encoder and the policy network."""
