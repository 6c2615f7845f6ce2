"""Decoding with a trained Transfusion model: text, images, captions, action rollouts.

The command line is ``megafusion generate`` (``megafusion.inference.cli``). From Python::

    with cpu_compat.applied("cpu"), load_run("runs/tiny") as loaded:   # entry points apply the layer
        gen = Generator.from_run(loaded)
        result = gen.generate("There is", max_new_tokens=64)      # text; images where <boi> appears
        image = gen.generate_image("a small red circle at the top left")   # uint8 [S, S, 3]
        text = gen.caption(image)
        frames = gen.rollout(context_frames, actions, caption)

How a sequence is decoded (one document, positions 0..L-1, the layout of
``megafusion.data.shapes_stream``):

- Text: next-token sampling (greedy, or temperature with top-k) with a KV cache: megatron's
  ``StaticInferenceContext`` keeps every layer's keys/values; each step runs only the new
  positions, whose queries are the *last* positions of the keys (``HybridMaskInfo``).
- ``<boi>`` (sampled or forced) starts an image: its ``tokens_per_image`` latent positions
  all carry the same flow time t and are denoised jointly (bidirectional inside the span)
  by an ODE from noise at t = 1 to t = 0 (``megafusion.diffusion.sampling.sample_ode``,
  Euler or Heun, time shift as in training). Each ODE step re-runs only the span's
  positions against the cached prefix (the cache slots of the span are overwritten, not
  committed). Classifier-free guidance mixes in the same span predicted without its text
  condition: the prefix with the caption replaced by the null token, exactly as training's
  condition dropout (``transfusion.drop_text_condition``). The clean latents (t = 0) and
  ``<eoi>`` are then committed and text continues.
- Captioning: the image is encoded to clean latents (t = 0) in ``<boi> .. <eoi>`` and text
  is generated after it.
- Action rollout: caption, context frames (clean), each followed by its action token; every
  new frame is sampled by the ODE and appended as clean context for the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from megafusion.data.sample import IMAGE, TEXT, VIDEO
from megafusion.model.mask import HybridMaskInfo

# --------------------------------------------------------------------------- sequence state


@dataclass
class Chunk:
    """Positions appended to a sequence: tokens [k] int64, latents [k, C], t [k], modality [k],
    span_ids [k] (-1 at text)."""

    tokens: torch.Tensor
    latents: torch.Tensor
    t: torch.Tensor
    modality: torch.Tensor
    span_ids: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def cat(chunks: list["Chunk"]) -> "Chunk":
        return Chunk(*(torch.cat([getattr(c, f) for c in chunks]) for f in
                       ("tokens", "latents", "t", "modality", "span_ids")))


class DecodeState:
    """One sequence being decoded (batch of one, a single document) and its KV cache.

    ``run(chunk, commit)`` returns (logits [k, V], latent predictions [k, C]) of the chunk's
    positions given everything committed before. ``commit=False`` leaves the sequence as it
    was (used by the ODE steps); the cache slots it wrote are overwritten by the next run.
    Without a cache (``use_cache=False``) every run recomputes the whole sequence: the
    reference the cached path is tested against.
    """

    def __init__(self, generator: "Generator", use_cache: bool) -> None:
        self.gen = generator
        dev, C = generator.device, generator.latent_dim
        self.seq = Chunk(torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, C, device=dev),
                         torch.zeros(0, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                         torch.zeros(0, dtype=torch.long, device=dev))
        self.context = None
        if use_cache:
            from megatron.core.inference.contexts import StaticInferenceContext

            self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=generator.max_length)
        self.last_logits: torch.Tensor | None = None  # [V] after the last committed position
        self._frame_inputs_cache: tuple | None = None  # (layout key, (index, actions)) of the last run
        self.next_span = 0

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens.tolist()

    @torch.no_grad()
    def run(self, chunk: Chunk, commit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        start, k = len(self.seq), len(chunk)
        end = start + k
        if end > self.gen.max_length:
            raise ValueError(f"sequence of {end} positions exceeds the generator's max_length "
                             f"{self.gen.max_length}; generate fewer tokens or raise max_length")
        full = Chunk.cat([self.seq, chunk])
        positions = torch.arange(end, device=self.gen.device)[None]
        doc_ids = torch.zeros(1, end, dtype=torch.long, device=self.gen.device)
        mask = HybridMaskInfo(doc_ids, full.span_ids[None])
        inputs = dict(latents=full.latents[None], timesteps=full.t[None], modality=full.modality[None])
        if self.context is None:  # the reference: the whole sequence again
            logits, latent_pred = self.gen.model(full.tokens[None], positions, mask.as_tensor(), **inputs)
            logits, latent_pred = logits[0, start:], latent_pred[0, start:]
        else:  # the model's forward runs the chunk's positions against the cached ones
            self.context.sequence_len_offset = start
            previous_index, actions = self._frame_inputs(full, start, doc_ids)
            logits, latent_pred = self.gen.model(full.tokens[None], positions, mask, **inputs,
                                                 inference_context=self.context, previous_index=previous_index,
                                                 frame_actions=actions)
            logits, latent_pred = logits[0], latent_pred[0]
        if commit:
            self.seq = full
            self.last_logits = logits[-1]
            self._frame_inputs_cache = None  # keyed by the start: only valid for one committed prefix
        return logits.float(), latent_pred.float()

    def _frame_inputs(self, full: Chunk, start: int, doc_ids: torch.Tensor
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The whole sequence's previous-frame index (``frame_conditioning``) and embedded
        actions (``action_conditioning``), None where the model has none. Both depend on the
        layout and the text only, not on the latents, so the ODE steps of one frame compute
        them once (it was a sixth of a rollout's time)."""
        model = self.gen.model
        key = (start, full.span_ids[start:].tolist(), full.modality[start:].tolist(), full.tokens[start:].tolist())
        if self._frame_inputs_cache is not None and self._frame_inputs_cache[0] == key:
            return self._frame_inputs_cache[1]
        index = actions = None
        if getattr(model, "previous_frame_in", None) is not None:
            index = model.previous_frames_index(full.span_ids[None], full.modality[None], doc_ids)
        if getattr(model, "action_in", None) is not None:
            actions = model.frame_actions_of(full.tokens[None], full.span_ids[None], full.modality[None], doc_ids)
        self._frame_inputs_cache = (key, (index, actions))
        return index, actions

    def append_tokens(self, ids: list[int]) -> torch.Tensor:
        """Commits text tokens; returns their logits [k, V]."""
        return self.run(self.gen.text_chunk(ids))[0]

    def new_span_id(self) -> int:
        span = self.next_span
        self.next_span += 1
        return span


# --------------------------------------------------------------------------- options and results


@dataclass
class SamplingOptions:
    """Text: ``temperature`` 0 = greedy; ``top_k`` 0 = no cut. Images: ODE ``steps``,
    ``method`` euler|heun, guidance ``cfg_scale`` (1 = none). ``seed`` drives both.

    ``shift`` / ``frame_shift``: the time shift of the ODE's grid for images / video frames
    (larger: more of the steps near pure noise, where a tiny model decides what goes where);
    None: the run's training shift (``diffusion.time_shift`` / ``frame_time_shift``). As in
    training, frames take the image shift when neither the run nor ``frame_shift`` sets one."""

    temperature: float = 0.0
    top_k: int = 0
    steps: int = 25
    method: str = "euler"
    cfg_scale: float = 3.0
    seed: int = 0
    shift: float | None = None
    frame_shift: float | None = None

    def __post_init__(self):
        for name in ("shift", "frame_shift"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SamplingOptions.{name}={value}: a time shift must be > 0 (1 = no shift)")

    def flow_config(self, diffusion):
        """``diffusion`` (a FlowMatchingConfig) with this sampling's shifts in place of the run's."""
        return replace(
            diffusion,
            time_shift=diffusion.time_shift if self.shift is None else self.shift,
            frame_time_shift=diffusion.frame_time_shift if self.frame_shift is None else self.frame_shift)


@dataclass
class GenerationResult:
    """``text``: the generated text with ``<image k>`` placeholders; ``images``: uint8
    [S, S, 3] each; ``tokens``: the whole sequence's token ids (latent positions hold pad)."""

    prompt: str
    text: str
    images: list[np.ndarray] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- the generator


class Generator:
    """Decoding, image sampling, captioning and rollouts with one Transfusion model.

    Args:
        model: the (unwrapped) ``TransfusionModel`` with pre_process = post_process = True.
        cfg: the run's Config (diffusion prediction / time shift, model sizes).
        tokenizer: the run's tokenizer (``boi_id``, ``eoi_id``, ``eod_id``, ``pad_id``, ...).
        representation: the run's visual representation (encode/decode, normalize).
        use_cache: decode with the KV cache (False: recompute the whole sequence each step).
        max_length: longest sequence a state may reach (default 4x the training length).
    """

    def __init__(self, model, cfg, tokenizer, representation, device=None, use_cache: bool = True,
                 max_length: int | None = None, world_config=None) -> None:
        self.model = model.eval()
        self.world_config = world_config  # the training stream's WorldConfig (clip lengths), if known
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.representation = representation
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.use_cache = use_cache
        self.max_length = max_length or max(4 * cfg.model.seq_length, 512)
        self.latent_dim = representation.latent_dim
        self.tokens_per_image = representation.tokens_per_image
        vocab = model.vocab_size
        # Never sample padding rows of the embedding, nor the null/pad token.
        self._banned = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self._banned[min(tokenizer.vocab_size, vocab):] = True
        self._banned[tokenizer.pad_id] = True
        # <eoi> is written by the generator after an image's latents, never predicted (it is
        # no training target: it follows a latent position).
        self._banned[tokenizer.eoi_id] = True
        self._banned_no_images = self._banned.clone()
        self._banned_no_images[tokenizer.boi_id] = True
        # A caption is text: no video continuation (<frame>) and no action after the captioned
        # image (in action videos an action token follows each frame).
        self._banned_caption = self._banned_no_images.clone()
        self._banned_caption[tokenizer.frame_id] = True
        for action_id in tokenizer.action_ids().values():
            if action_id < vocab:
                self._banned_caption[action_id] = True

    @classmethod
    def from_run(cls, loaded, **kw) -> "Generator":
        """From ``megafusion.inference.loading.load_run`` / ``build_model``."""
        stream = loaded.provider.stream
        world = getattr(stream, "world", None)  # in-process ShapesWorld runs only; indexed runs have none
        return cls(loaded.model, loaded.cfg, stream.tokenizer, stream.representation, loaded.device,
                   world_config=world.config if world is not None else None, **kw)

    def new_state(self, use_cache: bool | None = None) -> DecodeState:
        return DecodeState(self, self.use_cache if use_cache is None else use_cache)

    # ------------------------------------------------------------------ chunks
    def text_chunk(self, ids: list[int]) -> Chunk:
        k, dev = len(ids), self.device
        return Chunk(torch.as_tensor(ids, dtype=torch.long, device=dev), torch.zeros(k, self.latent_dim, device=dev),
                     torch.zeros(k, device=dev), torch.full((k,), TEXT, dtype=torch.long, device=dev),
                     torch.full((k,), -1, dtype=torch.long, device=dev))

    def latent_chunk(self, latents: torch.Tensor, t: float, span: int, modality: int = IMAGE) -> Chunk:
        k, dev = latents.shape[0], self.device
        return Chunk(torch.full((k,), self.tokenizer.pad_id, dtype=torch.long, device=dev), latents.to(dev).float(),
                     torch.full((k,), float(t), device=dev), torch.full((k,), modality, dtype=torch.long, device=dev),
                     torch.full((k,), span, dtype=torch.long, device=dev))

    # ------------------------------------------------------------------ images <-> latents
    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [n, S, S, 3] -> normalised latents [n, tokens_per_image, C] (as training)."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
        rep = self.representation
        return rep.normalize(rep.encode(x)).float().to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """normalised latents [n, T, C] -> uint8 images [n, S, S, 3]."""
        rep = self.representation
        images = rep.decode(rep.denormalize(latents.float().cpu()))
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    # ------------------------------------------------------------------ text
    def pick_token(self, logits: torch.Tensor, opts: SamplingOptions, rng: torch.Generator,
                   allow_images: bool = True, text_only: bool = False) -> int:
        """Greedy (temperature 0) or temperature / top-k sampling from logits [V]
        (``text_only``: no ``<boi>`` nor ``<frame>``; else ``allow_images`` decides ``<boi>``)."""
        banned = self._banned_caption if text_only else self._banned if allow_images else self._banned_no_images
        logits = logits.float().masked_fill(banned, float("-inf"))
        if opts.temperature <= 0:
            return int(logits.argmax())
        logits = logits / opts.temperature
        if opts.top_k > 0:
            kth = torch.topk(logits, min(opts.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1).cpu()
        return int(torch.multinomial(probs, 1, generator=rng))

    # ------------------------------------------------------------------ images
    def _unconditional_state(self, state: DecodeState) -> DecodeState:
        """The state's sequence with its text condition dropped (training's CFG convention:
        the text before the document's first image/frame, ``<boi>`` kept, becomes the null
        token), prefilled into a new cache."""
        from megafusion.recipes.transfusion import drop_text_condition

        seq = state.seq
        # One pending latent position marks where the image being sampled starts when the
        # sequence holds no latent yet.
        modality = torch.cat([seq.modality, seq.modality.new_full((1,), IMAGE)])[None]
        tokens = torch.cat([seq.tokens, seq.tokens.new_full((1,), self.tokenizer.pad_id)])[None]
        doc_ids = torch.zeros_like(tokens)
        drop = torch.ones_like(tokens, dtype=torch.bool)
        nulled, _ = drop_text_condition(tokens, tokens.clone(), modality, doc_ids, drop, self.tokenizer.pad_id)
        uncond = self.new_state()
        uncond.run(Chunk(nulled[0, :-1], seq.latents, seq.t, seq.modality, seq.span_ids))
        uncond.next_span = state.next_span
        return uncond

    @torch.no_grad()
    def sample_latents(self, state: DecodeState, opts: SamplingOptions, modality: int = IMAGE,
                       rng: torch.Generator | None = None) -> torch.Tensor:
        """Samples one image/frame after ``state`` (which must end with ``<boi>``) by the ODE;
        commits its clean latents and ``<eoi>``. Returns normalised latents [T, C]."""
        from megafusion.diffusion.flow import resolve_shift
        from megafusion.diffusion.sampling import sample_ode

        if not len(state) or state.tokens[-1] != self.tokenizer.boi_id:
            raise ValueError("sample_latents: the sequence must end with <boi>")
        T, C = self.tokens_per_image, self.latent_dim
        span = state.new_span_id()
        if rng is None:
            rng = torch.Generator().manual_seed(opts.seed)
        noise = torch.randn(1, T, C, generator=rng).to(self.device)
        uncond = self._unconditional_state(state) if opts.cfg_scale != 1.0 else None

        def denoiser(on: DecodeState):
            def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return on.run(self.latent_chunk(x[0], float(t[0]), span, modality), commit=False)[1][None]
            return run

        d = self.cfg.diffusion
        x0 = sample_ode(denoiser(state), noise, opts.steps, method=opts.method, prediction=d.prediction,
                        shift=float(resolve_shift(opts.flow_config(d), T * C, frame=modality == VIDEO)),
                        cfg_scale=opts.cfg_scale,
                        uncond_model=denoiser(uncond) if uncond is not None else None,
                        min_denominator=d.min_denominator)[0]
        state.run(Chunk.cat([self.latent_chunk(x0, 0.0, span, modality), self.text_chunk([self.tokenizer.eoi_id])]))
        return x0

    def generate_image(self, prompt: str, opts: SamplingOptions | None = None) -> np.ndarray:
        """An image for a text prompt (``prompt <boi>``, then the ODE): uint8 [S, S, 3]."""
        opts = opts or SamplingOptions()
        state = self.new_state()
        state.append_tokens(self.tokenizer.encode(prompt) + [self.tokenizer.boi_id])
        return self.decode_latents(self.sample_latents(state, opts)[None])[0]

    # ------------------------------------------------------------------ text (+ images)
    def continue_text(self, state: DecodeState, max_new_tokens: int, opts: SamplingOptions,
                      rng: torch.Generator, images: list | None = None, max_images: int = 4,
                      text_only: bool = False) -> list[int]:
        """Samples up to ``max_new_tokens`` tokens (stops after ``<eod>``); a ``<boi>`` (sampled,
        or already last in ``state``) is followed by an ODE-sampled image whose latents go to
        ``images``. Returns the new token ids (images not included)."""
        tok = self.tokenizer
        new: list[int] = []
        for _ in range(max_new_tokens + 1):
            if state.tokens and state.tokens[-1] == tok.boi_id and images is not None and len(images) < max_images:
                images.append(self.sample_latents(state, opts, rng=rng))
                new.append(tok.eoi_id)
                continue
            if len(new) >= max_new_tokens:
                break
            t = self.pick_token(state.last_logits, opts, rng, allow_images=images is not None, text_only=text_only)
            new.append(t)
            state.append_tokens([t])
            if t == tok.eod_id:
                break
        return new

    def _render(self, ids: list[int]) -> str:
        """Token ids as text, each image shown as ``<image k>``."""
        tok, out, k, run = self.tokenizer, [], 0, []
        for i in ids:
            if i == tok.eoi_id:
                out.append(tok.decode(run))
                out.append(f"<image {k}>")
                run, k = [], k + 1
            elif i != tok.boi_id:
                run.append(i)
        out.append(tok.decode(run))
        return "".join(out)

    def generate(self, prompt: str, max_new_tokens: int = 64, opts: SamplingOptions | None = None,
                 force_image: bool = False, max_images: int = 4) -> GenerationResult:
        """Text continuation of ``prompt`` (``force_image``: a ``<boi>`` is appended, so an
        image comes first), sampling images wherever ``<boi>`` appears."""
        opts = opts or SamplingOptions()
        rng = torch.Generator().manual_seed(opts.seed)
        state = self.new_state()
        ids = self.tokenizer.encode(prompt) + ([self.tokenizer.boi_id] if force_image else [])
        if not ids:
            raise ValueError("generate: empty prompt; give some text or force_image=True")
        state.append_tokens(ids)
        latents: list[torch.Tensor] = []
        new = self.continue_text(state, max_new_tokens, opts, rng, latents, max_images)
        images = list(self.decode_latents(torch.stack(latents))) if latents else []
        shown = ([self.tokenizer.boi_id] if force_image else []) + new
        return GenerationResult(prompt, self._render(shown), images, state.tokens)

    def caption(self, image: np.ndarray, max_new_tokens: int = 96, opts: SamplingOptions | None = None) -> str:
        """Text generated after ``<boi> image <eoi>`` (clean latents, t = 0), up to ``<eod>``."""
        opts = opts or SamplingOptions()
        rng = torch.Generator().manual_seed(opts.seed)
        state = self.new_state()
        latents = self.encode_images(np.asarray(image)[None])[0]
        tok = self.tokenizer
        state.run(Chunk.cat([self.text_chunk([tok.boi_id]), self.latent_chunk(latents, 0.0, state.new_span_id()),
                             self.text_chunk([tok.eoi_id])]))
        new = self.continue_text(state, max_new_tokens, opts, rng, images=None, text_only=True)
        return tok.decode([i for i in new if i != tok.eod_id])

    # ------------------------------------------------------------------ action rollout
    def rollout(self, context_frames: np.ndarray, actions: list[str], caption: str,
                opts: SamplingOptions | None = None) -> np.ndarray:
        """Next-frame rollout given actions, in the action-video layout of the training data
        (``tools/preprocess_data.py`` and the in-process stream): ``caption``, then each frame
        in ``<boi> .. <eoi>`` followed by the action that moves it to the next frame and
        ``<frame>``. ``context_frames`` uint8 [c, S, S, 3] are clean context;
        ``actions[f]`` moves frame f to f + 1, so ``len(actions) + 1 - c`` frames are
        predicted (each sampled by the ODE, then appended as clean context).
        Returns uint8 [len(actions) + 1 - c, S, S, 3]."""
        opts = opts or SamplingOptions()
        tok = self.tokenizer
        c = len(context_frames)
        if not 1 <= c <= len(actions):
            raise ValueError(f"rollout: {c} context frames need 1 <= c <= len(actions) = {len(actions)}")
        rng = torch.Generator().manual_seed(opts.seed)
        state = self.new_state()
        context = self.encode_images(np.asarray(context_frames))
        parts = [self.text_chunk(tok.encode(caption))]
        for f in range(c):
            parts += [self.text_chunk([tok.boi_id]), self.latent_chunk(context[f], 0.0, state.new_span_id(), VIDEO),
                      self.text_chunk([tok.eoi_id] + tok.encode_action(actions[f]) + [tok.frame_id])]
        parts.append(self.text_chunk([tok.boi_id]))
        state.run(Chunk.cat(parts))
        frames = []
        for f in range(c, len(actions) + 1):
            frames.append(self.sample_latents(state, opts, modality=VIDEO, rng=rng))
            if f < len(actions):
                state.append_tokens(tok.encode_action(actions[f]) + [tok.frame_id, tok.boi_id])
        return self.decode_latents(torch.stack(frames))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def text_logprobs(self, text: str) -> np.ndarray:
        """Natural-log probabilities of each token of ``text`` + ``<eod>`` after the first
        (one full forward, truncated to the training length); float64 [n - 1]."""
        ids = (self.tokenizer.encode(text) + [self.tokenizer.eod_id])[: self.cfg.model.seq_length]
        state = self.new_state(use_cache=False)
        logits = state.run(self.text_chunk(ids))[0]  # [n, V]
        logp = torch.log_softmax(logits[:-1].double(), -1)
        return logp.gather(1, torch.as_tensor(ids[1:], device=logp.device)[:, None])[:, 0].cpu().numpy()
