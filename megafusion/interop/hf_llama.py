"""``megafusion export --format hf-llama``: a text model as a Hugging Face ``LlamaForCausalLM``.

megafusion's text model (``megafusion.model.text``: megatron-core's GPT stack with RoPE,
RMSNorm, SwiGLU, grouped-query attention, bias-free linears) is Llama-shaped when its config
says so (``check``): the export is then a directory that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads with no code of ours:
``config.json`` (``model_type: llama``, ``architectures: [LlamaForCausalLM]``, plus
megafusion's own section under ``"megafusion"``, which Hugging Face keeps as an unused
attribute) and ``model.safetensors`` with Hugging Face's names. What must agree for equal
logits, and where megafusion gets it:

* RoPE: megatron's ``rotary_interleaved=False`` (rotate-half, the frequencies repeated
  across the two halves of a head) is Hugging Face Llama's layout; ``rope_theta = model.rope_base``;
  full rotary dimension; positions 0..s-1.
* RMSNorm epsilon: megatron's ``TransformerConfig.layernorm_epsilon`` (``rms_norm_eps``).
* Tied embeddings: ``tie_word_embeddings = model.tie_embeddings`` (no ``lm_head.weight`` then).
* No biases (``add_bias_linear=False``), so ``attention_bias = mlp_bias = false``.
* Vocabulary: ``model.vocab_size`` rows, megatron-core does not pad it (the config keeps it a
  multiple of ``parallel.tp``).

Tensor names (``L`` = ``decoder.layers.i``, exported names of ``megafusion.interop.names``):

=============================================  ====================================================
megafusion export                               Hugging Face Llama
=============================================  ====================================================
``embedding.word_embeddings.weight``            ``model.embed_tokens.weight``
``L.input_layernorm.norm.weight``               ``model.layers.i.input_layernorm.weight``
``L.self_attention.linear_qkv.weight``          ``model.layers.i.self_attn.{q,k,v}_proj.weight`` (split)
``L.self_attention.linear_proj.weight``         ``model.layers.i.self_attn.o_proj.weight``
``L.pre_mlp_layernorm.norm.weight``             ``model.layers.i.post_attention_layernorm.weight``
``L.mlp.linear_fc1.weight``                     ``model.layers.i.mlp.{gate,up}_proj.weight`` (split)
``L.mlp.linear_fc2.weight``                     ``model.layers.i.mlp.down_proj.weight``
``decoder.final_layernorm.norm.weight``         ``model.norm.weight``
``output_layer.weight`` (untied only)           ``lm_head.weight``
=============================================  ====================================================

``linear_qkv`` holds, per query group g (= key/value head), that group's query heads then
its key head then its value head: rows ``[g*(r+2)*d, (g+1)*(r+2)*d)`` with ``r`` query heads
per group and head dim ``d``; Hugging Face's query head ``j`` uses key/value head
``j // r``, so q/k/v are that layout regrouped. ``linear_fc1`` is ``[gate; up]`` (megatron's
SwiGLU: ``silu(first half) * second half``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

MODEL_TYPE = "llama"
ARCHITECTURES = ["LlamaForCausalLM"]
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def rms_norm_eps() -> float:
    """megatron-core's default ``layernorm_epsilon`` (megafusion does not change it)."""
    from megatron.core.transformer import TransformerConfig

    return float(TransformerConfig.__dataclass_fields__["layernorm_epsilon"].default)


def problems(cfg) -> list[str]:
    """Why ``cfg``'s model is not a Llama (empty when it is)."""
    m = cfg.model
    if m.kind != "text":
        return [f"model.kind = {m.kind!r}: a Transfusion model also has image patch and timestep embeddings and a "
                "flow head that LlamaForCausalLM has no place for (export it with --format megafusion)"]
    out = []
    if m.activation != "swiglu":
        out.append(f"model.activation = {m.activation!r} (Llama's MLP is SwiGLU: swiglu)")
    if m.normalization != "rmsnorm":
        out.append(f"model.normalization = {m.normalization!r} (Llama uses RMSNorm: rmsnorm)")
    if m.moe.num_experts:
        out.append(f"model.moe.num_experts = {m.moe.num_experts} (Llama has a dense MLP; MoE is not Llama-shaped)")
    if m.hidden_size % m.num_heads:
        out.append(f"model.hidden_size = {m.hidden_size} is not a multiple of model.num_heads = {m.num_heads}")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        out.append(f"model.num_heads = {m.num_heads} is not a multiple of model.num_kv_heads = {kv}")
    return out


def check(cfg) -> None:
    """Raises ValueError naming every way ``cfg``'s model is not Llama-shaped."""
    found = problems(cfg)
    if found:
        raise ValueError("--format hf-llama needs a Llama-shaped text model (RoPE, RMSNorm, SwiGLU, GQA), but "
                         + "; ".join(found))


def hf_config(cfg, dtype: str, megafusion: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of the export: Hugging Face's LlamaConfig fields, megafusion's section last."""
    m = cfg.model
    out: dict[str, Any] = {
        "architectures": ARCHITECTURES, "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads or m.num_heads, "head_dim": m.hidden_size // m.num_heads,
        "hidden_act": "silu", "max_position_embeddings": m.seq_length, "rms_norm_eps": rms_norm_eps(),
        "rope_theta": float(m.rope_base), "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "tie_word_embeddings": bool(m.tie_embeddings), "initializer_range": m.init_std,
        "torch_dtype": HF_DTYPES[dtype], "use_cache": True,
    }
    if megafusion is not None:
        out["megafusion"] = megafusion
    return out


def is_hf_llama(raw: dict[str, Any]) -> bool:
    return isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE


def config_tree(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A megafusion config tree for a Hugging Face Llama ``config.json`` without megafusion's
    section (a Llama from elsewhere); ValueError naming each field megafusion cannot run."""
    bad = []
    if raw.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act = {raw['hidden_act']!r} (megafusion's SwiGLU is silu)")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            bad.append(f"{key} = true (megafusion's linears have no bias)")
    scaling = raw.get("rope_scaling") or {}
    params = raw.get("rope_parameters") or {}
    if (scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default") != "default":
        bad.append(f"rope scaling {scaling or params} (megafusion has plain RoPE)")
    heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
    if raw.get("head_dim") not in (None, hidden // heads):
        bad.append(f"head_dim = {raw['head_dim']} (megafusion's is hidden_size / num_attention_heads = {hidden // heads})")
    eps = float(raw.get("rms_norm_eps", 1e-6))
    if abs(eps - rms_norm_eps()) > 1e-12:
        bad.append(f"rms_norm_eps = {eps} (megafusion's is {rms_norm_eps()})")
    if bad:
        raise ValueError(f"'{where}' is a Llama that megafusion cannot run as is: " + "; ".join(bad))
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return {"model": {"kind": "text", "vocab_size": int(raw["vocab_size"]), "hidden_size": hidden,
                      "num_layers": int(raw["num_hidden_layers"]), "num_heads": heads,
                      "num_kv_heads": int(raw.get("num_key_value_heads") or heads),
                      "ffn_hidden_size": int(raw["intermediate_size"]),
                      "seq_length": int(raw.get("max_position_embeddings", 2048)),
                      "activation": "swiglu", "normalization": "rmsnorm",
                      "tie_embeddings": bool(raw.get("tie_word_embeddings", True)), "rope_base": float(theta)},
            "train": {"precision": "bf16" if dtype == "bfloat16" else "fp32"}}


def _shape(cfg) -> tuple[int, int, int]:
    """(query heads per group r, key/value groups, head dim d)."""
    m = cfg.model
    groups = m.num_kv_heads or m.num_heads
    return m.num_heads // groups, groups, m.hidden_size // m.num_heads


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {  # exported suffix -> Hugging Face suffix (one to one)
    "input_layernorm.norm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.norm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
              "decoder.final_layernorm.norm.weight": "model.norm.weight",
              "output_layer.weight": "lm_head.weight"}


def to_hf(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Exported (megafusion) tensors -> Hugging Face Llama tensors; every tensor mapped once."""
    r, groups, d = _shape(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        match = _LAYER.match(name)
        suffix = match.group(2) if match else None
        if suffix in _LAYER_NAMES:
            out[f"model.layers.{match.group(1)}.{_LAYER_NAMES[suffix]}"] = t
        elif suffix == "self_attention.linear_qkv.weight":
            grouped = t.reshape(groups, r + 2, d, t.shape[-1])
            prefix = f"model.layers.{match.group(1)}.self_attn."
            out[prefix + "q_proj.weight"] = grouped[:, :r].reshape(groups * r * d, -1).contiguous()
            out[prefix + "k_proj.weight"] = grouped[:, r].reshape(groups * d, -1).contiguous()
            out[prefix + "v_proj.weight"] = grouped[:, r + 1].reshape(groups * d, -1).contiguous()
        elif suffix == "mlp.linear_fc1.weight":
            gate, up = t.chunk(2, dim=0)
            out[f"model.layers.{match.group(1)}.mlp.gate_proj.weight"] = gate.contiguous()
            out[f"model.layers.{match.group(1)}.mlp.up_proj.weight"] = up.contiguous()
        else:
            raise ValueError(f"tensor {name!r} has no Hugging Face Llama counterpart (is the model Llama-shaped?)")
    return out


def from_hf(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors -> exported (megafusion) names; the inverse of ``to_hf``.
    A tied model's ``lm_head.weight`` (some writers keep it) is dropped; names megafusion has
    no place for are kept as they are, so the strict load names them."""
    r, groups, d = _shape(cfg)
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    rest = dict(tensors)
    if cfg.model.tie_embeddings:
        rest.pop("lm_head.weight", None)
    for i in range(cfg.model.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (rest.pop(p + f"self_attn.{x}_proj.weight", None) for x in "qkv")
        if q is not None and k is not None and v is not None:
            h = q.shape[-1]
            out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
                [q.reshape(groups, r, d, h), k.reshape(groups, 1, d, h), v.reshape(groups, 1, d, h)], dim=1
            ).reshape(groups * (r + 2) * d, h)
        else:
            rest.update({p + f"self_attn.{x}_proj.weight": t for x, t in zip("qkv", (q, k, v)) if t is not None})
        gate, up = rest.pop(p + "mlp.gate_proj.weight", None), rest.pop(p + "mlp.up_proj.weight", None)
        if gate is not None and up is not None:
            out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        else:
            rest.update({p + f"mlp.{x}_proj.weight": t for x, t in (("gate", gate), ("up", up)) if t is not None})
    for name, t in rest.items():
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if name in top:
            out[top[name]] = t
        elif match and match.group(2) in layer_names:
            out[f"decoder.layers.{match.group(1)}.{layer_names[match.group(2)]}"] = t
        else:
            out[name] = t
    return out
