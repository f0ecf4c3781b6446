"""PyTorch / Hugging Face version of the dualjax transformer (copied next to exported weights).

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    model(input_ids).logits                                  # causal LM (the default)
    model(input_ids, attention_mode="bidirectional").logits  # every token sees every token
    model(input_ids, bidirectional_mask=flags_BxL).logits    # prefix / per-token: i sees j iff
                                                             # j <= i or (flags[i] and flags[j])

It computes exactly what `dualjax.model.apply` computes: pre-norm RMSNorm (learned scale,
eps from the config), separate q/k/v, rotate-half RoPE on the positions in the row, SwiGLU
down(up(x) * silu(gate(x))), no biases in blocks, untied embedding, and the head RMSNorm ->
Linear(D, D) -> GELU(tanh) -> Linear(D, V) + bias ('mlp') or RMSNorm -> Linear(D, V) ('linear').
Like dualjax, the residual stream, norms, RoPE, softmax and logits are float32 and matmuls run in
the weights' dtype. Logits at position i predict token i + 1 in every mode (masked-diffusion use:
put the mask token at position i + 1 and read the logits at i). `attention_mask` (1 = token,
0 = padding) hides padding keys; a row holds one document (no packed segments). The KV cache
(generate) is used in causal mode only; bidirectional calls recompute the whole row.
"""

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_dualjax import DualjaxConfig

try:
  from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover
  DynamicCache = None

_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                else "past_key_values")


class DualjaxRMSNorm(nn.Module):
  """float32 RMSNorm with a learned scale."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return x * self.weight.float()


def rope(x_BxNxLxH: torch.Tensor, positions_BxL: torch.Tensor, theta: float) -> torch.Tensor:
  """Rotate-half rotary embedding (pairs i and i + H/2) in float32."""
  H = x_BxNxLxH.shape[-1]
  inv_freq = theta ** (-torch.arange(0, H // 2, dtype=torch.float32,
                                     device=x_BxNxLxH.device) * 2.0 / H)
  angle = positions_BxL.float()[:, None, :, None] * inv_freq
  cos, sin = angle.cos(), angle.sin()
  x = x_BxNxLxH.float()
  x1, x2 = x[..., :H // 2], x[..., H // 2:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
  """x @ W.T (+ b) with the input in the weight's dtype, float32 result."""
  return layer(x.to(layer.weight.dtype)).float()


class DualjaxAttention(nn.Module):

  def __init__(self, config: DualjaxConfig, layer_idx: int):
    super().__init__()
    D, HD = config.hidden_size, config.num_attention_heads * config.head_dim
    self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
    self.theta = config.rope_theta
    self.layer_idx = layer_idx
    self.q_proj = nn.Linear(D, HD, bias=False)
    self.k_proj = nn.Linear(D, HD, bias=False)
    self.v_proj = nn.Linear(D, HD, bias=False)
    self.o_proj = nn.Linear(HD, D, bias=False)

  def forward(self, h_BxLxD, positions_BxL, bias_Bx1xLxK, cache):
    B, L, _ = h_BxLxD.shape
    heads = lambda proj: _linear(h_BxLxD, proj).view(B, L, self.num_heads, self.head_dim
                                                     ).transpose(1, 2)
    dt = self.q_proj.weight.dtype
    q = rope(heads(self.q_proj), positions_BxL, self.theta).to(dt)
    k = rope(heads(self.k_proj), positions_BxL, self.theta).to(dt)
    v = heads(self.v_proj).to(dt)
    if cache is not None:
      k, v = cache.update(k, v, self.layer_idx)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.head_dim ** -0.5
    probs = torch.softmax(scores + bias_Bx1xLxK, dim=-1).to(dt)
    out = torch.matmul(probs.float(), v.float()).to(dt)
    return _linear(out.transpose(1, 2).reshape(B, L, -1), self.o_proj)


class DualjaxMLP(nn.Module):

  def __init__(self, config: DualjaxConfig):
    super().__init__()
    D, Fd = config.hidden_size, config.intermediate_size
    self.gate_proj = nn.Linear(D, Fd, bias=False)
    self.up_proj = nn.Linear(D, Fd, bias=False)
    self.down_proj = nn.Linear(Fd, D, bias=False)

  def forward(self, h):
    return _linear(_linear(h, self.up_proj) * F.silu(_linear(h, self.gate_proj)), self.down_proj)


class DualjaxDecoderLayer(nn.Module):

  def __init__(self, config: DualjaxConfig, layer_idx: int):
    super().__init__()
    self.input_layernorm = DualjaxRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = DualjaxAttention(config, layer_idx)
    self.post_attention_layernorm = DualjaxRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = DualjaxMLP(config)

  def forward(self, x, positions, bias, cache):
    x = x + self.self_attn(self.input_layernorm(x), positions, bias, cache)
    return x + self.mlp(self.post_attention_layernorm(x))


class DualjaxPreTrainedModel(PreTrainedModel):
  config_class = DualjaxConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["DualjaxDecoderLayer"]

  def _init_weights(self, module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
      if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, DualjaxRMSNorm):
      nn.init.ones_(module.weight)


def _attention_bias(attention_mask, bidirectional_mask, mode, B, L, past, device):
  """Additive float32 bias [B, 1, L, past + L]: 0 where query i may attend key j, else min."""
  K = past + L
  q_pos = torch.arange(past, K, device=device)[:, None]
  k_pos = torch.arange(K, device=device)[None, :]
  allowed = (k_pos <= q_pos)[None].expand(B, L, K)
  if bidirectional_mask is not None:
    flags = bidirectional_mask.to(device=device, dtype=torch.bool)
    if flags.shape != (B, K):
      raise ValueError(f"bidirectional_mask must have shape {(B, K)}, got {tuple(flags.shape)}")
    allowed = allowed | (flags[:, past:, None] & flags[:, None, :])
  elif mode == "bidirectional":
    allowed = torch.ones_like(allowed)
  elif mode != "causal":
    raise ValueError(f"attention_mode must be 'causal' or 'bidirectional', got {mode!r}")
  if attention_mask is not None:
    if attention_mask.dim() != 2 or attention_mask.shape != (B, K):
      raise ValueError(f"attention_mask must be 2-D {(B, K)} (1 = token, 0 = padding), "
                       f"got {tuple(attention_mask.shape)}")
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
  bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
  return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


class DualjaxModel(DualjaxPreTrainedModel):
  """Embedding, blocks and the head's RMSNorm (`last_hidden_state` is normalised, as in Llama)."""

  def __init__(self, config: DualjaxConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(
        DualjaxDecoderLayer(config, i) for i in range(config.num_hidden_layers))
    self.norm = DualjaxRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              inputs_embeds=None, use_cache=None, attention_mode=None, bidirectional_mask=None,
              past_key_values=None, **kwargs):
    del kwargs
    cache = cache if cache is not None else past_key_values
    mode = attention_mode or self.config.attention_mode
    if use_cache is None:
      use_cache = self.config.use_cache and mode == "causal" and bidirectional_mask is None
    if inputs_embeds is None:
      inputs_embeds = self.embed_tokens(input_ids)
    x = inputs_embeds.float()
    B, L, _ = x.shape
    if use_cache and cache is None and DynamicCache is not None:
      cache = DynamicCache()
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None:
      position_ids = torch.arange(past, past + L, device=x.device)[None].expand(B, L)
    bias = _attention_bias(attention_mask, bidirectional_mask, mode, B, L, past, x.device)
    for layer in self.layers:
      x = layer(x, position_ids, bias, cache if use_cache else None)
    return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                   **{_CACHE_FIELD: cache if use_cache else None})


class DualjaxForCausalLM(DualjaxPreTrainedModel, GenerationMixin):
  """The dual model with its output head; float32 logits [B, L, V]."""

  def __init__(self, config: DualjaxConfig):
    super().__init__(config)
    self.model = DualjaxModel(config)
    D, V = config.hidden_size, config.vocab_size
    self.head_proj = nn.Linear(D, D, bias=False) if config.head == "mlp" else None
    self.lm_head = nn.Linear(D, V, bias=config.head == "mlp")
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def set_output_embeddings(self, value):
    self.lm_head = value

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              inputs_embeds=None, labels=None, use_cache=None, attention_mode=None,
              bidirectional_mask=None, logits_to_keep=0, past_key_values=None, **kwargs):
    """`labels` (HF convention, -100 ignored): mean next-token cross-entropy."""
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                     use_cache=use_cache, attention_mode=attention_mode,
                     bidirectional_mask=bidirectional_mask, past_key_values=past_key_values)
    h = out.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
      h = h[:, -logits_to_keep:]
    if self.head_proj is not None:
      h = F.gelu(_linear(h, self.head_proj), approximate="tanh")
    logits = _linear(h, self.lm_head)
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
