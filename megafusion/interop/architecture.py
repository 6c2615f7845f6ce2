"""What an exported model is: the ``architecture`` block of ``config.json`` and the checks on it.

``describe(cfg, tokenizer, representation)`` summarises everything another stack needs to
run the weights (and everything that must agree for them to mean the same thing)::

    {"model_type": "megafusion-transfusion",
     "text": {"vocab_size": 272, "tokenizer": {"type": "byte", "vocab_size": 266,
              "special_tokens": {"pad": 256, "boi": 257, ...}, "action_tokens": {...}}},
     "transformer": {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "activation", "normalization", "tie_embeddings",
                     "rope_base", "max_sequence_length", "image_positions", "rope_layout",
                     "frame_positions", "frame_conditioning", "action_conditioning"},
     "ffn": "dense" | "modality",
     "moe": null | {"num_experts", "top_k", "expert_ffn_hidden_size", "layers", "router_score",
                    "shared_expert_ffn_hidden_size", "per_modality_shared_experts"},
     "patch_embedding": {"adapter", "latent_dim", "tokens_per_image", "positions"},
     "time_embedding": {"conditioning", "frequency_dim"},
     "visual_representation": {"kind", "image_size", "patch_size", "tokens_per_image",
                               "latent_dim", "path", "latent_stats": null | {"mean", "std"}}}

(The text model has ``text`` without a tokenizer, ``transformer``, ``moe`` and no visual
entries.) ``config`` in ``config.json`` stays the source of truth; this block is derived from
it and checked against it on every read, so a hand-edited field that disagrees is an error.

``weight_fields(cfg)``: the config keys that decide the weights' shapes and meaning (with
defaults resolved), compared when an export is imported into a run with its own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megafusion.config import Config, ConfigError
from megafusion.data.tokenizer import copy_tokenizer  # noqa: F401 (export copies the tokenizer with it)


def _time_frequency_dim() -> int:
    """The sinusoidal feature width of megafusion.model.embeddings.TimestepEmbedding."""
    import inspect

    from megafusion.model.embeddings import TimestepEmbedding

    return int(inspect.signature(TimestepEmbedding).parameters["frequency_dim"].default)


def tokenizer_and_representation(cfg: Config):
    """(tokenizer, representation) of a Transfusion config, (None, None) for the text model."""
    if cfg.model.kind != "transfusion":
        return None, None
    from megafusion.data.shapes_stream import load_tokenizer
    from megafusion.vision import representation_from_config

    return load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type), representation_from_config(cfg.vision)


def _tokenizer(tokenizer) -> dict[str, Any]:
    specials = {name: int(getattr(tokenizer, f"{name}_id")) for name in ("pad", "boi", "eoi", "frame", "eod", "bos")
                if getattr(tokenizer, f"{name}_id", None) is not None}
    kind = getattr(tokenizer, "type", "byte")
    info: dict[str, Any] = {"type": {"SentencePieceTokenizer": "sentencepiece",
                                     "HuggingFaceTokenizer": "huggingface"}.get(kind, "byte"),
                            "vocab_size": int(tokenizer.vocab_size), "special_tokens": specials,
                            "action_tokens": {str(k): int(v) for k, v in tokenizer.action_ids().items()}}
    if getattr(tokenizer, "path", None) is not None:  # a .model file, or a Hugging Face directory
        from megafusion.data.tokenizer import files_digest

        path = Path(tokenizer.path)
        info["file"] = path.name
        info["sha256"] = files_digest(path)
        if tokenizer.added:  # the special tokens appended after the tokenizer's own vocabulary
            info["base_vocab_size"], info["added_tokens"] = int(tokenizer.base_vocab_size), list(tokenizer.added)
    return info


def _representation(cfg: Config, rep, exported_path: str | None) -> dict[str, Any]:
    stats = None
    if rep.has_stats:
        stats = {"mean": [float(v) for v in rep.latent_mean.tolist()],
                 "std": [float(v) for v in rep.latent_std.tolist()]}
    return {"kind": rep.kind, "image_size": int(rep.image_size),
            "patch_size": cfg.vision.patch_size if cfg.vision.representation in ("pixel", "vae") else None,
            "tokens_per_image": int(rep.tokens_per_image), "latent_dim": int(rep.latent_dim),
            "path": exported_path, "latent_stats": stats}


def describe(cfg: Config, tokenizer=None, representation=None, representation_path: str | None = None
             ) -> dict[str, Any]:
    """The ``architecture`` block for ``cfg`` (Transfusion: with its tokenizer and representation)."""
    m, moe = cfg.model, cfg.model.moe
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    arch: dict[str, Any] = {
        "model_type": f"megafusion-{m.kind}",
        "text": {"vocab_size": m.vocab_size},
        "transformer": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
                        "num_kv_heads": m.num_kv_heads or m.num_heads, "head_dim": m.hidden_size // m.num_heads,
                        "ffn_hidden_size": ffn, "activation": m.activation, "normalization": m.normalization,
                        "tie_embeddings": m.tie_embeddings, "rope_base": m.rope_base,
                        "max_sequence_length": m.seq_length},
        "moe": None,
    }
    if moe.num_experts:
        arch["moe"] = {"num_experts": moe.num_experts, "top_k": moe.top_k,
                       "expert_ffn_hidden_size": moe.ffn_hidden_size or ffn, "layers": list(range(m.num_layers)),
                       "router_score": moe.router_score,
                       "shared_expert_ffn_hidden_size": moe.shared_expert_ffn_hidden_size,
                       "per_modality_shared_experts": moe.per_modality_shared_experts}
    if m.kind == "transfusion":
        if tokenizer is None or representation is None:
            tokenizer, representation = tokenizer_and_representation(cfg)
        arch["text"]["tokenizer"] = _tokenizer(tokenizer)
        arch["transformer"]["image_positions"] = m.image_positions
        arch["transformer"]["rope_layout"] = m.rope_layout
        arch["transformer"]["frame_positions"] = m.frame_positions
        arch["transformer"]["frame_conditioning"] = m.frame_conditioning
        arch["transformer"]["action_conditioning"] = m.action_conditioning
        arch["ffn"] = m.ffn
        arch["patch_embedding"] = {"adapter": m.patch_adapter, "latent_dim": int(representation.latent_dim),
                                   "tokens_per_image": int(representation.tokens_per_image),
                                   "positions": m.patch_positions}
        arch["time_embedding"] = {"conditioning": m.time_conditioning, "frequency_dim": _time_frequency_dim()}
        arch["visual_representation"] = _representation(cfg, representation, representation_path)
    return arch


def differences(given: Any, expected: Any, path: str = "architecture") -> list[str]:
    """Every field where ``given`` differs from ``expected`` (unknown, missing or other value)."""
    if isinstance(given, dict) and isinstance(expected, dict):
        out = [f"unknown field '{path}.{k}' (= {given[k]!r})" for k in sorted(set(given) - set(expected))]
        out += [f"missing field '{path}.{k}' (expected {expected[k]!r})" for k in sorted(set(expected) - set(given))]
        for k in sorted(set(given) & set(expected)):
            out += differences(given[k], expected[k], f"{path}.{k}")
        return out
    if given != expected:
        return [f"'{path}' is {given!r} but the config gives {expected!r}"]
    return []


def weight_fields(cfg: Config) -> dict[str, Any]:
    """Config keys (dotted) that decide the weights' shapes and meaning, defaults resolved."""
    m, moe = cfg.model, cfg.model.moe
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    fields = {"model.kind": m.kind, "model.vocab_size": m.vocab_size, "model.hidden_size": m.hidden_size,
              "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
              "model.num_kv_heads": m.num_kv_heads or m.num_heads, "model.ffn_hidden_size": ffn,
              "model.activation": m.activation, "model.normalization": m.normalization,
              "model.tie_embeddings": m.tie_embeddings, "model.rope_base": m.rope_base,
              "model.moe.num_experts": moe.num_experts}
    if moe.num_experts:
        fields.update({"model.moe.top_k": moe.top_k, "model.moe.ffn_hidden_size": moe.ffn_hidden_size or ffn,
                       "model.moe.shared_expert_ffn_hidden_size": moe.shared_expert_ffn_hidden_size,
                       "model.moe.router_score": moe.router_score,
                       "model.moe.per_modality_shared_experts": moe.per_modality_shared_experts})
    if m.kind == "transfusion":
        fields.update({"model.ffn": m.ffn, "model.patch_adapter": m.patch_adapter,
                       "model.time_conditioning": m.time_conditioning, "model.image_positions": m.image_positions,
                       "model.patch_positions": m.patch_positions, "model.rope_layout": m.rope_layout,
                       "model.frame_positions": m.frame_positions, "model.frame_conditioning": m.frame_conditioning,
                       "model.action_conditioning": m.action_conditioning,
                       "vision.representation": cfg.vision.representation, "vision.image_size": cfg.vision.image_size})
        if cfg.vision.representation in ("pixel", "vae"):
            fields["vision.patch_size"] = cfg.vision.patch_size
    return fields


def check_compatible(exported: Config, run: Config, exported_where: str, run_where: str) -> None:
    """Raises ConfigError naming every field where the run's config disagrees with the export's."""
    a, b = weight_fields(exported), weight_fields(run)
    problems = [f"{k} = {b.get(k)!r} in {run_where} but {a.get(k)!r} in {exported_where}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not problems and exported.model.kind == "transfusion":
        # Same shapes; the tokenizer and the latent statistics must agree too.
        ea, ra = describe(exported), describe(run)
        for label, key, sub in (("data.tokenizer", "text", "tokenizer"),
                                ("vision.path (latent statistics)", "visual_representation", "latent_stats")):
            if ea[key][sub] != ra[key][sub]:
                problems.append(f"{label}: {run_where} gives {_short(ra[key][sub])} but {exported_where} has "
                                f"{_short(ea[key][sub])}")
    if problems:
        raise ConfigError(f"the run's config ({run_where}) does not match the exported model ({exported_where}):\n  "
                          + "\n  ".join(problems) + "\nMake these fields equal to the export's (or import without "
                          "--config to use the exported config as is).")


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(f'{v:.4g}' if isinstance(v, float) else repr(v) for v in value[:3])}, ... ({len(value)})]"
    return repr(value)
