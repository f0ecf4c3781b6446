"""Hugging Face config of a dualjax dual-objective transformer (written by `dualjax.export`)."""

try:
  from transformers import PreTrainedConfig as _Config
except ImportError:  # transformers < 5
  from transformers import PretrainedConfig as _Config


class DualjaxConfig(_Config):
  """dualjax's ModelConfig in Hugging Face names.

  head: 'mlp' (RMSNorm -> Linear(D, D) -> GELU(tanh) -> Linear(D, V) + bias) or 'linear'
  (RMSNorm -> Linear(D, V)). attention_mode: the default of `forward(attention_mode=...)`,
  'causal' (a causal LM) or 'bidirectional' (masked-diffusion / masked-LM use).
  """

  model_type = "dualjax"
  keys_to_ignore_at_inference = ["cache", "past_key_values"]

  def __init__(self, vocab_size: int = 51_200, hidden_size: int = 1024,
               intermediate_size: int = 3554, num_hidden_layers: int = 24,
               num_attention_heads: int = 16, head_dim: int = 64,
               max_position_embeddings: int = 2048, rope_theta: float = 160_000.0,
               rms_norm_eps: float = 1e-7, head: str = "mlp", attention_mode: str = "causal",
               bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 3,
               mask_token_id: int = 4, use_cache: bool = True, tie_word_embeddings: bool = False,
               **kwargs):
    if head not in ("mlp", "linear"):
      raise ValueError(f"head must be 'mlp' or 'linear', got {head!r}")
    if attention_mode not in ("causal", "bidirectional"):
      raise ValueError(
          f"attention_mode must be 'causal' or 'bidirectional', got {attention_mode!r}")
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = num_attention_heads
    self.head_dim = head_dim
    self.max_position_embeddings = max_position_embeddings
    self.rope_theta = rope_theta
    self.rms_norm_eps = rms_norm_eps
    self.head = head
    self.attention_mode = attention_mode
    self.mask_token_id = mask_token_id
    self.use_cache = use_cache
    super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
