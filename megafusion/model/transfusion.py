"""The Transfusion model on megatron-core.

One transformer reads a packed sequence of text tokens and continuous image/frame latent
patches (``megafusion.data.sample.Sample``). Text is trained by next-token prediction, the
latents by flow matching (``megafusion.diffusion.flow``)::

    tokens ─► VocabParallelEmbedding ────────────┐
    x_t    ─► PatchIn + TimestepEmbedding(t) ────┴► where(latent) ─► [SP scatter]
           ─► TransformerBlock (hybrid mask, RoPE from `positions`)
           ─┬► LM head ─► CE [b, s]
            └► PatchOut ─► latent prediction [b, s, C]

The block is megatron-core's (``transfusion_block_spec``): every parallel layout of the
trainer (TP, SP, PP, VPP, EP, DP) works for it, the word embedding is tied to the LM head
across pipeline stages (``LanguageModule``) and the cross-entropy is vocab-parallel.

Options (``model.*``): ``attention`` sdpa | flex | triton (``megafusion.model.attention``);
``ffn`` dense | modality and ``moe.*`` (``megafusion.model.modality_ffn``);
``time_conditioning`` additive (above) | adaln (``megafusion.model.adaln``);
``patch_adapter`` linear (above) | unet (``megafusion.model.unet``);
``image_positions`` 1d | 2d | 3d (``megafusion.model.embeddings.rope_coordinates``: (time, row,
column) per patch, time = the span's start, so 3d is the same scheme seen on video frames),
``rope_layout`` contiguous | interleaved (which frequencies each axis gets),
``frame_positions`` same | 1d (frames keep 1-D positions) and ``patch_positions`` none |
learned (``PatchPositionEmbedding`` added to the latent inputs), ``frame_conditioning`` none |
previous (each frame patch also embeds the clean patch at its place one frame back).

``build_transfusion_model`` builds one pipeline stage from the run's config. What it is
trained on (data stream, noising, condition dropout, the loss) is the Transfusion recipe's
(``megafusion.recipes.transfusion``).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from megafusion.config import Config
from megafusion.data.sample import IGNORE_INDEX, TEXT, VIDEO
from megafusion.model.adaln import AdaLNNorm, TimeContext
from megafusion.model.embeddings import (FrameActionIn, PatchIn, PatchOut, PatchPositionEmbedding,
                                         TimestepEmbedding, gather_previous_frames, mean_between_frames,
                                         previous_frame_index, previous_window_index, rope_axis_of_frequency,
                                         rope_coordinates)
from megafusion.model.ffn import ffn_spec
from megafusion.model.init import init_weights
from megafusion.model.mask import HybridMaskInfo
from megafusion.model.routing import ModalityContext
from megafusion.model.spec import transfusion_block_spec
from megafusion.model.unet import UNetDown, UNetUp


class TransfusionModel(LanguageModule):
    """One pipeline (virtual) stage of the Transfusion transformer.

    Args:
        config: megatron ``TransformerConfig`` (``build_transformer_config``).
        block_spec: ``TransformerBlockSubmodules`` of this stage (``transfusion_block_spec``).
        vocab_size: text vocabulary (must be divisible by the TP size).
        latent_dim: C, channels of one latent patch (from the vision representation).
        pre_process / post_process: whether this stage holds the embeddings / the heads.
        tie_embeddings: share the word embedding with the LM head.
        rope_base: RoPE base.
        modality_context: optional FFN hook object with ``set(modality [b, s])`` called
            before the decoder runs (``megafusion.model.modality_ffn.ModalityContext``).
        time_context: the ``TimeContext`` of the block's AdaLN norms (``time_conditioning:
            adaln``), set before the decoder runs; None adds the timestep embedding to the
            latent inputs instead (``additive``).
        image_grid_width: patches per row of an image for 2-D RoPE (``image_positions: 2d``,
            see ``rope_coordinates``); None = 1-D positions.
        unet_layout: (channels, patch size, tokens per image) of the latent tokens for U-Net
            patch adapters (``patch_adapter: unet``, ``megafusion.model.unet``); None =
            linear adapters. Every image/frame span must then hold a whole image.
        patch_positions: tokens per image for a learned absolute patch-position embedding
            added to the latent inputs (``model.patch_positions: learned``); None = none.
        rope_layout: which RoPE frequencies each (time, row, column) axis rotates by
            (``rope_axis_of_frequency``).
        frames_1d: video frames keep 1-D positions under 2-D/3-D RoPE (``model.frame_positions: 1d``).
        frame_conditioning: ``previous``: each video-frame patch also gets a linear embedding
            of the clean latent at its place in the frame before it; ``window``: of the 3x3
            window of clean latents around that place (``frame_grid_width`` wide patch grids);
            ``none`` (``model.frame_conditioning``).
        frame_actions: each video-frame patch also gets ``FrameActionIn`` of the mean word
            embedding of the text between the frame before it and it, the action in
            action-conditioned video (``model.action_conditioning: embedding``).
        frame_grid_width: the frames' patch grid width (``frame_conditioning: window``).
    """

    def __init__(self, config, block_spec, vocab_size: int, latent_dim: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, tie_embeddings: bool = True,
                 rope_base: float = 10000.0, vp_stage: int | None = None, modality_context=None,
                 time_context=None, image_grid_width: int | None = None,
                 unet_layout: tuple[int, int, int] | None = None, patch_positions: int | None = None,
                 rope_layout: str = "contiguous", frames_1d: bool = False, frame_conditioning: str = "none",
                 frame_actions: bool = False, frame_grid_width: int | None = None) -> None:
        super().__init__(config=config)
        self.vocab_size = vocab_size
        self.latent_dim = latent_dim
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = tie_embeddings
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.modality_context = modality_context
        self.time_context = time_context
        self.image_grid_width = image_grid_width
        self.unet_layout = unet_layout
        self.rope_layout = rope_layout
        self.frames_1d = frames_1d
        self.previous_frame_in = None
        self.action_in = None
        if frame_conditioning not in ("none", "previous", "window"):
            raise ValueError(f"frame_conditioning={frame_conditioning!r}: choose none, previous or window")
        if frame_conditioning == "window" and not frame_grid_width:
            raise ValueError("frame_conditioning='window' needs frame_grid_width (the frames' patch grid width)")
        self.frame_conditioning = frame_conditioning
        self.frame_grid_width = frame_grid_width

        if pre_process:
            # Scatter to the sequence-parallel region ourselves, after the patches are added.
            self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab_size,
                                                    max_sequence_length=max_sequence_length,
                                                    position_embedding_type="rope",
                                                    scatter_to_sequence_parallel=False, tp_group=self.tp_group)
            self.patch_in = (PatchIn(latent_dim, config.hidden_size) if unet_layout is None
                             else UNetDown(*unet_layout[:2], config.hidden_size))
            if time_context is None:
                self.time_embed = TimestepEmbedding(config.hidden_size)
            self.patch_position = (PatchPositionEmbedding(patch_positions, config.hidden_size)
                                   if patch_positions else None)
            window = 9 if frame_conditioning == "window" else 1
            self.previous_frame_in = (PatchIn(window * latent_dim, config.hidden_size)
                                      if frame_conditioning != "none" else None)
            self.action_in = FrameActionIn(config.hidden_size) if frame_actions else None
        # Holds inv_freq only; positions are per token (they restart in every document).
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_interleaved=config.rotary_interleaved,
                                              rotary_base=int(rope_base),
                                              use_cpu_initialization=config.use_cpu_initialization)
        self.decoder = TransformerBlock(config=config, spec=block_spec, pre_process=pre_process,
                                        post_process=post_process, pg_collection=self.pg_collection,
                                        vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and tie_embeddings, tp_group=self.tp_group)
            self.patch_out = (PatchOut(config.hidden_size, latent_dim) if unet_layout is None
                              else UNetUp(*unet_layout[:2], config.hidden_size))
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first read their input from the previous stage."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        assert len(input_tensor) == 1, "TransfusionModel takes one input tensor per stage"
        self.decoder.set_input_tensor(input_tensor[0])

    def rope(self, positions: torch.Tensor, span_ids: torch.Tensor, modality: torch.Tensor | None = None
             ) -> torch.Tensor:
        """positions, span_ids, modality [b, s] -> rotary angles [s, b, 1, kv_channels] (megatron's layout).

        1-D: angle = position * inv_freq. 2-D/3-D: each frequency is rotated by one of the
        (time, row, column) coordinates of ``rope_coordinates`` (``rope_axis_of_frequency``);
        with ``frames_1d`` video frames are placed like text (1-D), so ``modality`` is needed.
        """
        inv_freq = self.rotary_pos_emb.inv_freq.to(positions.device)
        if self.image_grid_width is None:
            freqs = positions.t().float()[..., None] * inv_freq  # [s, b, d/2]
        else:
            if self.frames_1d:
                if modality is None:
                    raise ValueError("TransfusionModel.rope: frame_positions 1d needs the modality of each position")
                span_ids = torch.where(modality == VIDEO, torch.full_like(span_ids, -1), span_ids)
            coords = rope_coordinates(positions, span_ids, self.image_grid_width)  # [3, b, s]
            section = rope_axis_of_frequency(inv_freq.numel(), self.rope_layout).to(positions.device)
            freqs = coords[section].permute(2, 1, 0).float() * inv_freq  # [s, b, d/2]
        if self.config.rotary_interleaved:
            emb = torch.stack([freqs, freqs], dim=-1).flatten(-2)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        return emb[:, :, None, :]

    def adapt(self, adapter: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
              modality: torch.Tensor) -> torch.Tensor:
        """Applies a patch adapter to x [b, s, d_in] -> [b, s, d_out].

        Linear adapters run on every position (text positions are discarded later); U-Net
        adapters run on the images: the latent positions regrouped as [n, T, d_in].
        """
        if self.unet_layout is None:
            return adapter(x)
        b, s, _ = x.shape
        is_latent = modality != TEXT
        per_image = self.unet_layout[2]
        count = int(is_latent.sum())
        if count % per_image:
            raise ValueError(f"the U-Net patch adapter needs whole images of {per_image} patches; the batch has "
                             f"{count} latent positions")
        t_image = timesteps[is_latent].view(-1, per_image)[:, 0]
        y = adapter(x[is_latent].view(-1, per_image, x.shape[-1]), t_image)
        out = y.new_zeros(b, s, y.shape[-1])
        out[is_latent] = y.reshape(-1, y.shape[-1])
        return out

    def embed(self, tokens: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
              modality: torch.Tensor, span_ids: torch.Tensor | None = None,
              previous_frames: torch.Tensor | None = None, frame_actions: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Decoder input [s, b, h] (the local [s/tp, b, h] slice under sequence parallelism).

        Text positions get their token embedding; latent positions (modality != TEXT) get
        PatchIn(x_t) + TimestepEmbedding(t) instead (PatchIn(x_t) alone with AdaLN), plus
        the learned patch position with ``patch_positions`` (``span_ids`` [b, s] needed), plus
        the embedded ``previous_frames`` [b, s, C] ([b, s, 9 C]) with ``frame_conditioning`` (``gather_previous_frames``),
        plus the embedded ``frame_actions`` [b, s, h] with ``frame_actions`` (``frame_actions_of``).
        """
        text = self.embedding(input_ids=tokens, position_ids=None)  # [s, b, h]
        is_latent = (modality != TEXT).t().unsqueeze(-1)  # [s, b, 1]
        visual = self.adapt(self.patch_in, latents.to(text.dtype), timesteps, modality).transpose(0, 1)
        if self.time_context is None:
            visual = visual + self.time_embed(timesteps.t()).to(text.dtype)
        if self.patch_position is not None:
            if span_ids is None:
                raise ValueError("TransfusionModel.embed: learned patch positions need span_ids")
            visual = visual + self.patch_position(span_ids).transpose(0, 1).to(text.dtype)
        if self.previous_frame_in is not None:
            if previous_frames is None:
                raise ValueError("TransfusionModel.embed: frame_conditioning previous needs previous_frames")
            visual = visual + self.previous_frame_in.forward_sparse(previous_frames.to(text.dtype)).transpose(0, 1)
        if self.action_in is not None:
            if frame_actions is None:
                raise ValueError("TransfusionModel.embed: action_conditioning embedding needs frame_actions")
            visual = visual + self.action_in(frame_actions.to(text.dtype)).transpose(0, 1)
        # contiguous: the residual stream keeps this layout and pipeline p2p sends need it
        hidden = torch.where(is_latent, visual, text).contiguous()
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.tp_group)
        return hidden

    def previous_frames_index(self, span_ids: torch.Tensor, modality: torch.Tensor, doc_ids: torch.Tensor
                              ) -> torch.Tensor:
        """[b, s] ([b, s, 9] with a window) int64: the sequence index of each video-frame patch's
        place in the frame before it (or of the 3x3 window around it); -1 where there is none.
        Depends on the layout only, so a decoder reuses it across the ODE steps of a frame."""
        if self.frame_conditioning == "window":
            return previous_window_index(span_ids, modality, doc_ids, self.frame_grid_width)
        return previous_frame_index(span_ids, modality, doc_ids)

    def frame_actions_of(self, tokens: torch.Tensor, span_ids: torch.Tensor, modality: torch.Tensor,
                         doc_ids: torch.Tensor) -> torch.Tensor:
        """[b, s, h]: for each video-frame patch, the mean word embedding of the text tokens
        [b, s] between the frame before it and it (zeros elsewhere). At inference ``tokens``
        is the whole sequence, so a frame sees its action even when run as a chunk alone."""
        words = self.embedding.word_embeddings(tokens)  # [b, s, h]
        return mean_between_frames(words, span_ids, modality, doc_ids)

    def heads(self, hidden: torch.Tensor, timesteps: torch.Tensor, modality: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last stage: final hidden states [s, b, h] ([s/tp, b, h] under SP) -> (vocab-parallel
        logits [s, b, vocab / tp], latent predictions [b, s, C]); ``timesteps``/``modality``
        [b, s] are read by U-Net adapters (whole images only)."""
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=output_weight)
        full = hidden
        if self.config.sequence_parallel:
            # The head sees every position on every TP rank; the backward splits the gradient.
            full = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        return logits, self.adapt(self.patch_out, full.transpose(0, 1), timesteps, modality)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
                latents: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                modality: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                decoder_input: torch.Tensor | None = None, clean_latents: torch.Tensor | None = None,
                inference_context=None, previous_index: torch.Tensor | None = None,
                frame_actions: torch.Tensor | None = None):
        """Runs this stage, for training and decoding alike.

        Args:
            tokens: [b, s] int64 token ids (anything at latent positions).
            positions: [b, s] int64 RoPE positions (``Sample.positions``).
            attention_mask: [2, b, s] int64, ``HybridMaskInfo(doc_ids, span_ids).as_tensor()``
                (a ``HybridMaskInfo`` works too, but not with activation recomputation).
            latents: [b, s, C] noised latents x_t (zeros at text positions).
            timesteps: [b, s] float flow time t per position (0 at text).
            modality: [b, s] int64 TEXT / IMAGE / VIDEO.
            labels: [b, s] int64 next-token targets (``IGNORE_INDEX`` allowed) or None.
            decoder_input: [s, b, h] overrides the embeddings (first stage only).
            clean_latents: [b, s, C] clean latents, read by ``frame_conditioning`` for the
                frame before each frame (None: ``latents``, whose earlier frames are clean at
                inference).
            inference_context: megatron's ``StaticInferenceContext`` (KV cache), as
                ``GPTModel.forward`` takes it. The inputs still describe the whole sequence
                (RoPE and the mask need every position), but only the positions from
                ``inference_context.sequence_len_offset`` on are computed: the ones before
                are in the cache.
            previous_index: [b, s] ([b, s, 9] with a window) the ``previous_frames_index`` of
                the whole sequence, which depends on its layout only (a decoder computes it
                once for all ODE steps of a frame); None: computed here.
            frame_actions: [b, s, h] the ``frame_actions_of`` the whole sequence, likewise.

        Returns:
            Not the last stage: hidden states [s', b, h] ([s'/tp, b, h] under SP).
            Last stage: ``(text, latent_pred)`` with latent_pred [b, s', C] and ``text`` the
            per-token cross-entropy [b, s'] if ``labels`` is given, else the vocab-parallel
            logits [b, s', vocab / tp]; s' = the positions computed (s without a context).
        """
        b, s = tokens.shape
        if modality is None:
            modality = torch.full_like(tokens, TEXT)
        if timesteps is None:
            timesteps = torch.zeros(b, s, device=tokens.device)
        new = slice(0 if inference_context is None else inference_context.sequence_len_offset, None)
        # The per-position hooks (FFN modality, AdaLN time) see the positions that run.
        if self.modality_context is not None:
            self.modality_context.set(modality[:, new])
        if self.time_context is not None:
            self.time_context.set(timesteps[:, new], modality[:, new])
        mask_info = HybridMaskInfo.coerce(attention_mask)
        span_ids = mask_info.span_ids
        if decoder_input is None and self.pre_process:
            if latents is None:
                latents = torch.zeros(b, s, self.latent_dim, device=tokens.device)
            previous = actions = None
            if self.previous_frame_in is not None:
                if previous_index is None:
                    previous_index = self.previous_frames_index(span_ids, modality, mask_info.doc_ids)
                source = latents if clean_latents is None else clean_latents
                previous = gather_previous_frames(source, previous_index)[:, new]
            if self.action_in is not None:
                if frame_actions is None:
                    frame_actions = self.frame_actions_of(tokens, span_ids, modality, mask_info.doc_ids)
                actions = frame_actions[:, new]
            decoder_input = self.embed(tokens[:, new], latents[:, new], timesteps[:, new], modality[:, new],
                                       span_ids[:, new], previous, actions)

        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                              rotary_pos_emb=self.rope(positions, span_ids, modality),
                              inference_context=inference_context)
        if not self.post_process:
            return hidden

        logits, latent_pred = self.heads(hidden, timesteps[:, new], modality[:, new])
        if labels is None:
            return logits.transpose(0, 1).contiguous(), latent_pred
        labels = labels[:, new]
        safe_labels = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
        return self.compute_language_model_loss(safe_labels, logits), latent_pred


def build_transfusion_model(cfg: Config, transformer_config, pre_process: bool, post_process: bool,
                            vp_stage: int | None, *, latent_dim: int, tokens_per_image: int,
                            unet_layout: tuple[int, int, int] | None = None, image_grid_width: int | None = None,
                            frame_grid_width: int | None = None) -> tuple[TransfusionModel, ModalityContext]:
    """One pipeline (virtual) stage of ``cfg.model``'s Transfusion model, on CPU, initialised
    from ``train.seed``, and the ``ModalityContext`` its FFNs read (routing statistics live there).

    The sizes that come from the data's representation, not the config: ``latent_dim`` (C),
    ``tokens_per_image`` (learned patch positions), ``unet_layout`` (``patch_adapter: unet``),
    ``image_grid_width`` (2-D/3-D RoPE) and ``frame_grid_width`` (``frame_conditioning: window``).
    """
    m = cfg.model
    # FFN hook: dense / modality-specific FFN / MoE with per-modality shared experts, all
    # reading the modality of each position from one context per model chunk.
    context = ModalityContext()
    mlp_spec = ffn_spec(cfg, transformer_config, context)
    time_context = norm_spec = None
    if m.time_conditioning == "adaln":
        time_context = TimeContext()
        norm_spec = ModuleSpec(module=AdaLNNorm, params={"context": time_context})
    # model.spec local | te: megatron's torch or Transformer Engine linears/norms, our core attention.
    spec = transfusion_block_spec(transformer_config, m.attention, m.moe.num_experts, vp_stage, mlp_spec,
                                  norm_spec, spec=m.spec)
    model = TransfusionModel(transformer_config, spec, vocab_size=m.vocab_size, latent_dim=latent_dim,
                             max_sequence_length=m.seq_length, pre_process=pre_process,
                             post_process=post_process, tie_embeddings=m.tie_embeddings,
                             rope_base=m.rope_base, vp_stage=vp_stage, modality_context=context,
                             time_context=time_context, image_grid_width=image_grid_width,
                             unet_layout=unet_layout,
                             patch_positions=tokens_per_image if m.patch_positions == "learned" else None,
                             rope_layout=m.rope_layout, frames_1d=m.frame_positions == "1d",
                             frame_conditioning=m.frame_conditioning,
                             frame_actions=m.action_conditioning == "embedding",
                             frame_grid_width=frame_grid_width)
    init_weights(model, cfg.train.seed, m.init_std, m.num_layers,
                 std_of={"patch_position.table.weight": m.patch_position_init_std})
    return model, context
