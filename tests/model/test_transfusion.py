"""The Transfusion model, in one process (gloo world of one, CPU), built by its recipe.

Checks behaviour against independent definitions: the attention rule seen through the
whole model (documents isolated, text causal, image spans bidirectional), RoPE positions
restarting per document, sdpa vs flex through every layer. The recipe's loss, condition
dropout and batches are tested in tests/recipes/test_transfusion_recipe.py.
"""

import numpy as np
import pytest
import torch

from megafusion.config import ConfigError, load_config, validate
from megafusion.data.byte_tokenizer import ByteTokenizer
from megafusion.data.sample import IMAGE, TEXT, VIDEO
from megafusion.data.shapes_stream import ShapesStream

CONFIG = "examples/configs/tiny_transfusion.yaml"
SMALL = ["model.seq_length=128", "model.num_layers=2", "train.micro_batch_size=2", "train.device=cpu"]


def make_provider(overrides=()):
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes.transfusion import TransfusionProvider

    cfg = load_config(CONFIG, [*SMALL, *overrides])
    return TransfusionProvider(cfg, build_transformer_config(cfg, torch.device("cpu")))


def image_indices(provider, n=2):
    """The first n sample indices whose packs hold images or frames with a diffusion loss."""
    return [i for i in range(64) if provider.stream.sample(i).image_loss_mask.any()][:n]


def run(model, tokens, positions, doc_ids, span_ids, latents, t, modality, labels=None):
    mask = torch.stack([doc_ids, span_ids])
    return model(tokens, positions, mask, latents=latents, timesteps=t, modality=modality, labels=labels)


def hand_batch(n=24, c=192, seed=0):
    """Two documents: [text(4) <boi> image(6) <eoi> text(3)] then [text(5) ...] + padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (1, n), generator=g)
    modality = torch.full((1, n), TEXT)
    span = torch.full((1, n), -1)
    modality[0, 5:11] = IMAGE
    span[0, 5:11] = 0
    doc = torch.zeros(1, n, dtype=torch.long)
    doc[0, 15:] = 1
    positions = torch.cat([torch.arange(15), torch.arange(n - 15)])[None]
    latents = torch.randn(1, n, c, generator=g) * (modality != TEXT).unsqueeze(-1)
    t = torch.rand(1, n, generator=g) * (modality != TEXT)
    return tokens, positions, doc, span, latents, t, modality


# --------------------------------------------------------------------------- model


def test_forward_backward_shapes_and_grads(megatron_world):
    provider = make_provider()
    model = provider.build(pre_process=True, post_process=True, vp_stage=None)
    batch = provider.batch(image_indices(provider))
    assert batch["flow_loss_mask"].any() and batch["text_loss_mask"].any()
    output, loss_func = provider.forward_step(batch, model)
    ce, pred = output
    assert ce.shape == (2, 128) and pred.shape == (2, 128, provider.latent_dim) == (2, 128, 192)
    loss, count, metrics = loss_func(output)
    assert torch.isfinite(loss) and int(count) == 1
    assert set(metrics) == set(provider.metric_names)
    loss.backward()
    for name in ("embedding.word_embeddings.weight", "patch_in.proj.weight", "time_embed.mlp.0.weight",
                 "patch_out.proj.weight", "decoder.layers.0.self_attention.linear_qkv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_attention_rule_through_the_model(megatron_world):
    """Changing position k changes output i only if i may attend to k (directly or via layers)."""
    provider = make_provider()
    model = provider.build(pre_process=True, post_process=True, vp_stage=None).eval()
    tokens, positions, doc, span, latents, t, modality = hand_batch()
    with torch.no_grad():
        base_logits, base_pred = run(model, tokens, positions, doc, span, latents, t, modality)

        def changed_at(k_text=None, k_latent=None):
            tok, lat = tokens.clone(), latents.clone()
            if k_text is not None:
                tok[0, k_text] = (tok[0, k_text] + 7) % 256
            if k_latent is not None:
                lat[0, k_latent] += 1.0
            logits, pred = run(model, tok, positions, doc, span, lat, t, modality)
            diff = (logits - base_logits).abs().amax(-1) + (pred - base_pred).abs().amax(-1)
            return diff[0] > 1e-6

        # later text in document 0 (position 12): nothing before it changes
        d = changed_at(k_text=12)
        assert not d[:12].any() and d[12:15].all() and not d[15:].any()
        # the last patch of the image (position 10) reaches every patch of its span, not the text before it
        d = changed_at(k_latent=10)
        assert not d[:5].any() and d[5:15].all() and not d[15:].any()
        # document 1 never affects document 0
        d = changed_at(k_text=16)
        assert not d[:15].any() and d[16:].all()


def test_positions_restart_per_document(megatron_world):
    """A document gives the same outputs alone or packed after another one (RoPE from positions)."""
    provider = make_provider()
    model = provider.build(pre_process=True, post_process=True, vp_stage=None).eval()
    tokens, positions, doc, span, latents, t, modality = hand_batch()
    second = slice(15, 24)
    with torch.no_grad():
        packed_logits, _ = run(model, tokens, positions, doc, span, latents, t, modality)
        alone_logits, _ = run(model, tokens[:, second], positions[:, second], doc[:, second] * 0,
                              span[:, second], latents[:, second], t[:, second], modality[:, second])
    torch.testing.assert_close(packed_logits[:, second], alone_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_attention_backends_agree_with_sdpa_through_the_model(megatron_world, backend):
    results = {}
    for name in ("sdpa", backend):
        provider = make_provider([f"model.attention={name}"])
        model = provider.build(pre_process=True, post_process=True, vp_stage=None)
        batch = provider.batch(image_indices(provider))
        assert batch["span_ids"].max() >= 0  # image spans, so the bidirectional part is exercised
        output, loss_func = provider.forward_step(batch, model)
        loss, _, _ = loss_func(output)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert results["sdpa"][0].item() == pytest.approx(results[backend][0].item(), abs=1e-5)
    for param, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results[backend][1][param], grad, atol=1e-5, rtol=1e-4, msg=param)


def test_layout_independent_init_and_checkpoint_keys(megatron_world):
    """Two builds are identical (init by checkpoint key), and every extra module has a unique key."""
    provider = make_provider()
    a = provider.build(pre_process=True, post_process=True, vp_stage=None)
    b = provider.build(pre_process=True, post_process=True, vp_stage=None)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=name)
    from megafusion.model.init import _leaf_sharded_tensors

    keys = [(sh.key, sh.global_offset) for sh in _leaf_sharded_tensors(a.sharded_state_dict())]
    assert len(keys) == len(set(keys))
    names = {key for key, _ in keys}
    assert {"patch_in.proj.weight", "patch_out.proj.weight", "time_embed.mlp.0.weight"} <= names


# --------------------------------------------------------------------------- loss and data


def test_stream_is_a_pure_function_of_seed_and_index():
    cfg = load_config(CONFIG, ["data.shapes_weights={text: 1, image_text: 1, video: 1, action_video: 1}"])
    a, b = ShapesStream.from_config(cfg), ShapesStream.from_config(cfg)
    for i in (5, 0, 3):
        b.sample(i + 100)  # a different history must not matter
        sa, sb = a.sample(i), b.sample(i)
        for name in ("tokens", "latents", "doc_ids", "span_ids", "image_loss_mask", "clean_spans"):
            assert torch.equal(getattr(sa, name), getattr(sb, name)), name
    kinds = set()
    for i in range(24):
        s = a.sample(i)
        kinds |= set(s.modality.unique().tolist())
        # every span holds whole images: tokens_per_image patches between <boi> and <eoi>
        for span in s.span_ids.unique().tolist():
            if span < 0:
                continue
            idx = (s.span_ids == span).nonzero().squeeze(1)
            assert len(idx) == a.tokens_per_image
            assert s.tokens[idx[0] - 1] == a.tokenizer.boi_id and s.tokens[idx[-1] + 1] == a.tokenizer.eoi_id
        assert not (s.clean_spans & s.image_loss_mask).any()
    assert kinds == {TEXT, IMAGE, VIDEO}
    assert any(a.sample(i).clean_spans.any() for i in range(24))  # action videos' context frames


def test_byte_tokenizer_roundtrip_and_vocab_check(megatron_world):
    tok = ByteTokenizer()
    text = "a big red circle: größer"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.boi_id, tok.eoi_id] + tok.encode_action("up")) == "<boi><eoi><act_up>"
    assert tok.vocab_size == 266
    with pytest.raises(ConfigError, match="model.vocab_size = 256 is smaller"):
        make_provider(["model.vocab_size=256"])


def test_3d_positions_use_the_time_row_column_scheme(megatron_world):
    """Video frames get their own time coordinate: 3d is the 2d (time, row, col) scheme."""
    two_d, three_d = make_provider(["model.image_positions=2d"]), make_provider(["model.image_positions=3d"])
    assert three_d.image_grid_width == two_d.image_grid_width == 4


# --------------------------------------------------------------------------- AdaLN


def test_adaln_norm_modulates_latent_positions_only(megatron_world):
    from megafusion.model.adaln import AdaLNNorm, TimeContext
    from megafusion.model.embeddings import sinusoidal_embedding

    provider = make_provider(["model.time_conditioning=adaln"])
    ctx = TimeContext()
    norm = AdaLNNorm(provider.transformer_config, 64, eps=1e-5, context=ctx)
    torch.nn.init.normal_(norm.modulation.weight)
    s, b = 6, 2
    x = torch.randn(s, b, 64)
    modality = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, VIDEO, TEXT]] * b)
    t = torch.rand(b, s)
    ctx.set(t, modality)
    y = norm(x)
    assert y.is_contiguous()  # megatron's MoE router views its input
    plain = torch.nn.functional.rms_norm(x, (64,), norm.norm.norm.weight, 1e-5)
    shift, scale = (sinusoidal_embedding(t.t(), 256) @ norm.modulation.weight.t()).chunk(2, -1)
    expected = torch.where((modality != TEXT).t()[..., None], plain * (1 + scale) + shift, plain)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_adaln_model_conditions_on_time(megatron_world, moe):
    provider = make_provider(["model.time_conditioning=adaln"] + (["model.moe.num_experts=4"] if moe else []))
    model = provider.build(pre_process=True, post_process=True, vp_stage=None).eval()
    assert not hasattr(model, "time_embed")
    assert any("modulation" in name for name, _ in model.named_parameters())
    tokens, positions, doc, span, latents, t, modality = hand_batch()
    with torch.no_grad():
        logits_a, pred_a = run(model, tokens, positions, doc, span, latents, t, modality)
        logits_b, pred_b = run(model, tokens, positions, doc, span, latents, t * 0.5, modality)
    assert (pred_a[0, 5:11] - pred_b[0, 5:11]).abs().amax() > 1e-4  # the image hears t
    torch.testing.assert_close(logits_a[0, :5], logits_b[0, :5], atol=0, rtol=0)  # text before it does not


# --------------------------------------------------------------------------- 2-D positions


def test_rope_coordinates_known_answer():
    from megafusion.model.embeddings import rope_coordinates

    # text(2) <boi> 4 patches of a 2x2 image <eoi> text, then a frame of 4 patches
    span = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, -1, 1, 1, 1, 1]])
    pos = torch.arange(13)[None]
    coords = rope_coordinates(pos, span, grid_width=2)
    assert coords[:, 0, :3].tolist() == [[0, 1, 2]] * 3
    assert coords[:, 0, 3:7].tolist() == [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]
    assert coords[:, 0, 7:9].tolist() == [[7, 8]] * 3
    assert coords[:, 0, 9:].tolist() == [[9, 9, 9, 9], [9, 9, 10, 10], [9, 10, 9, 10]]


def test_rope_axis_of_frequency_layouts():
    from megafusion.model.embeddings import rope_axis_of_frequency

    # axes: 0 time, 1 row, 2 column; frequency 0 is the highest
    assert rope_axis_of_frequency(8, "contiguous").tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert rope_axis_of_frequency(8, "interleaved").tolist() == [1, 2, 0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="'diagonal'"):
        rope_axis_of_frequency(8, "diagonal")


def test_interleaved_rope_rotates_image_columns_by_the_highest_frequencies(megatron_world):
    """Two patches one column apart: with the interleaved layout their column angle differs
    by the second-highest frequency; contiguous gives columns only the lowest ones."""
    span = torch.tensor([[-1, 0, 0, 0, 0]])
    positions = torch.arange(5)[None]
    angles = {}
    for layout in ("contiguous", "interleaved"):
        model = make_provider(["model.image_positions=3d", f"model.rope_layout={layout}"]).build(
            pre_process=True, post_process=True, vp_stage=None)
        assert model.rope_layout == layout
        inv_freq = model.rotary_pos_emb.inv_freq
        emb = model.rope(positions, span)[:, 0, 0, : inv_freq.numel()]  # [s, d/2] angles
        angles[layout] = (emb[2] - emb[1], inv_freq)  # patch (row 0, col 1) minus patch (0, 0)
    diff, inv_freq = angles["interleaved"]
    assert torch.allclose(diff[1], inv_freq[1]) and diff[0] == 0  # column axis: frequency 1; row axis: 0 unchanged
    diff, inv_freq = angles["contiguous"]
    n = inv_freq.numel()
    assert diff[: 2 * n // 3 + 1].abs().max() == 0 and torch.allclose(diff[-1], inv_freq[-1])


def test_frame_positions_1d_keeps_video_frames_on_1d_rope(megatron_world):
    """Under 3-D RoPE with ``frame_positions: 1d`` a video frame rotates exactly as with 1-D
    positions while an image keeps its (time, row, column) coordinates."""
    span = torch.tensor([[-1, 0, 0, 0, 0, -1, 1, 1, 1, 1, -1]])
    modality = torch.tensor([[TEXT] + [IMAGE] * 4 + [TEXT] + [VIDEO] * 4 + [TEXT]])
    positions = torch.arange(11)[None]
    three_d = make_provider(["model.image_positions=3d", "model.frame_positions=1d"]).build(
        pre_process=True, post_process=True, vp_stage=None)
    one_d = make_provider(["model.image_positions=1d"]).build(pre_process=True, post_process=True, vp_stage=None)
    plain = make_provider(["model.image_positions=3d"]).build(pre_process=True, post_process=True, vp_stage=None)
    mixed, linear, spatial = (m.rope(positions, span, modality) for m in (three_d, one_d, plain))
    torch.testing.assert_close(mixed[6:], linear[6:], rtol=0, atol=0)  # the frame and the text after it
    torch.testing.assert_close(mixed[:6], spatial[:6], rtol=0, atol=0)  # the image as under plain 3-D
    assert not torch.equal(mixed[1:5], linear[1:5])
    with pytest.raises(ValueError, match="needs the modality"):
        three_d.rope(positions, span)


def test_2d_positions_leave_text_unchanged_and_move_images(megatron_world):
    tokens, positions, doc, span, latents, t, modality = hand_batch()
    outputs = {}
    for mode in ("1d", "2d"):
        provider = make_provider([f"model.image_positions={mode}"])
        model = provider.build(pre_process=True, post_process=True, vp_stage=None).eval()
        with torch.no_grad():
            outputs[mode] = run(model, tokens, positions, doc, span, latents, t, modality)
    (logits_1d, pred_1d), (logits_2d, pred_2d) = outputs["1d"], outputs["2d"]
    torch.testing.assert_close(logits_2d[0, :5], logits_1d[0, :5], atol=1e-6, rtol=1e-6)  # text before the image
    torch.testing.assert_close(logits_2d[0, 15:], logits_1d[0, 15:], atol=1e-6, rtol=1e-6)  # a text-only document
    assert (pred_2d[0, 5:11] - pred_1d[0, 5:11]).abs().amax() > 1e-4


def test_patch_position_embedding_known_answer():
    from megafusion.model.embeddings import PatchPositionEmbedding, span_offsets

    # text(2) <boi> 4 patches <eoi>, then two frames of 4 patches back to back
    span = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, 1, 1, 1, 1, 2, 2, 2, 2]])
    k, start = span_offsets(span)
    latent = span[0] >= 0
    assert k[0, latent].tolist() == [0, 1, 2, 3] * 3
    assert start[0, latent].tolist() == [3] * 4 + [8] * 4 + [12] * 4
    emb = PatchPositionEmbedding(4, 8)
    out = emb(span)[0]
    assert out[~latent].abs().sum() == 0
    torch.testing.assert_close(out[3:7], emb.table.weight)  # the k-th patch reads row k
    torch.testing.assert_close(out[8:12], out[12:16])  # consecutive frames share the table
    with pytest.raises(ValueError, match="more than tokens_per_image = 4"):
        emb(torch.tensor([[0, 0, 0, 0, 0]]))


def test_learned_patch_positions_leave_text_unchanged_and_move_images(megatron_world):
    """The embedding is added to latent inputs only: text before an image and text-only
    documents are untouched; every latent position hears it; generation's cached path
    passes span ids too (tests/inference)."""
    tokens, positions, doc, span, latents, t, modality = hand_batch()
    outputs = {}
    for mode in ("none", "learned"):
        provider = make_provider([f"model.patch_positions={mode}"])
        model = provider.build(pre_process=True, post_process=True, vp_stage=None).eval()
        assert hasattr(model, "patch_position") and (model.patch_position is not None) == (mode == "learned")
        with torch.no_grad():
            outputs[mode] = run(model, tokens, positions, doc, span, latents, t, modality)
    (logits_a, pred_a), (logits_b, pred_b) = outputs["none"], outputs["learned"]
    torch.testing.assert_close(logits_b[0, :5], logits_a[0, :5], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits_b[0, 15:], logits_a[0, 15:], atol=1e-6, rtol=1e-6)
    assert ((pred_b[0, 5:11] - pred_a[0, 5:11]).abs().amax(-1) > 1e-4).all()


def _random_packed_rows(seed: int, n_rows: int = 20, length: int = 60):
    """Packed rows of text, images, frames of several clips and documents (some frames back to
    back, a short frame, a frame after an image): (span, modality, doc) lists per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        span, modality, doc, sid, d = [], [], [], 0, 0
        while len(span) < length:
            kind = rng.choice(["text", "image", "frame", "doc"], p=[0.3, 0.15, 0.45, 0.1])
            if kind == "doc":
                d += 1
                continue
            n = int(rng.integers(1, 4)) if kind == "text" else int(rng.choice([4, 4, 4, 3]))
            span += [-1] * n if kind == "text" else [sid] * n
            modality += [TEXT if kind == "text" else IMAGE if kind == "image" else VIDEO] * n
            doc += [d] * n
            sid += kind != "text"
        rows.append((span[:length], modality[:length], doc[:length]))
    return rows


def _previous_frame_reference(span, modality, doc):
    """previous_frame_index by a loop over spans in order (one row)."""
    spans = []  # (start, length, modality, doc) in sequence order
    for i, sid in enumerate(span):
        if sid >= 0 and (i == 0 or span[i - 1] != sid):
            spans.append([i, 0, modality[i], doc[i]])
        if sid >= 0:
            spans[-1][1] += 1
    out = [-1] * len(span)
    for j, (start, length, mod, d) in enumerate(spans):
        if j == 0 or mod != VIDEO:
            continue
        p_start, p_length, p_mod, p_doc = spans[j - 1]
        if p_mod == VIDEO and p_doc == d:
            for k in range(min(length, p_length)):
                out[start + k] = p_start + k
    return out


def test_previous_frame_index_against_a_loop():
    """Packed rows (``_random_packed_rows``) against the loop above."""
    from megafusion.model.embeddings import gather_previous_frames, previous_frame_index

    rows = _random_packed_rows(0)
    span, modality, doc = (torch.tensor([r[i] for r in rows]) for i in range(3))
    index = previous_frame_index(span, modality, doc)
    expected = torch.tensor([_previous_frame_reference(*r) for r in rows])
    assert (expected >= 0).sum() > 50  # the layouts exercise the rule
    assert torch.equal(index, expected)
    latents = torch.randn(*span.shape, 5)
    gathered = gather_previous_frames(latents, index)
    has = index >= 0
    assert torch.equal(gathered[has], latents[has.nonzero()[:, 0], index[has]])
    assert gathered[~has].abs().sum() == 0


def _previous_window_reference(span, modality, doc, grid):
    """previous_window_index by loops (one row): the 3x3 window around each frame patch's
    place in the frame before, for patches the previous-frame rule pairs up."""
    centre = _previous_frame_reference(span, modality, doc)
    out = [[-1] * 9 for _ in span]
    for i, c in enumerate(centre):
        if c < 0:
            continue
        k = i - next(j for j in range(i, -1, -1) if j == 0 or span[j - 1] != span[i])  # offset in the span
        p_start = c - k
        p_length = sum(1 for s in span if s == span[c])
        for w, (dr, dc) in enumerate((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
            r, q = k // grid + dr, k % grid + dc
            if 0 <= r < grid and 0 <= q < grid and r * grid + q < p_length:
                out[i][w] = p_start + r * grid + q
    return out


def test_previous_window_index_against_a_loop():
    """The 3x3 window (2x2 frames: most neighbours leave the grid; short frames cut some off)
    against the loop above, and the gather of windows against indexing."""
    from megafusion.model.embeddings import gather_previous_frames, previous_window_index

    rows = _random_packed_rows(1)
    span, modality, doc = (torch.tensor([r[i] for r in rows]) for i in range(3))
    index = previous_window_index(span, modality, doc, grid=2)
    expected = torch.tensor([_previous_window_reference(*r, grid=2) for r in rows])
    assert (expected >= 0).sum() > 200 and (expected[..., 4] >= 0).sum() < (expected >= 0).sum()
    assert torch.equal(index, expected)
    latents = torch.randn(*span.shape, 5)
    gathered = gather_previous_frames(latents, index).view(*span.shape, 9, 5)
    has = index >= 0
    b, i, w = has.nonzero().unbind(-1)
    assert torch.equal(gathered[b, i, w], latents[b, index[b, i, w]])
    assert gathered[~has].abs().sum() == 0


def test_mean_between_frames_against_a_loop():
    """mean_between_frames on packed rows against a float64 loop over spans: each frame
    whose span before it is a frame of its document gets the mean over the text between."""
    from megafusion.model.embeddings import mean_between_frames

    span, modality, doc = (torch.tensor([r[i] for r in _random_packed_rows(2)]) for i in range(3))
    values = torch.randn(*span.shape, 6)
    got = mean_between_frames(values, span, modality, doc)
    expected = torch.zeros(*span.shape, 6, dtype=torch.float64)
    for r in range(len(span)):
        sp = span[r].tolist()
        spans = [[i, i] for i, sid in enumerate(sp) if sid >= 0 and (i == 0 or sp[i - 1] != sid)]
        for sp_ in spans:
            while sp_[1] + 1 < len(sp) and sp[sp_[1] + 1] == sp[sp_[0]]:
                sp_[1] += 1
        for (p_start, p_end), (start, end) in zip(spans, spans[1:]):
            between = range(p_end + 1, start)
            if (modality[r, start] == VIDEO and modality[r, p_start] == VIDEO and doc[r, p_start] == doc[r, start]
                    and len(between)):
                expected[r, start:end + 1] = values[r, list(between)].double().mean(0)
    assert (expected.abs().sum(-1) > 0).sum() > 50  # the layouts exercise the rule
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def _clip_then_image():
    """(span, modality, doc, positions) [1, 20]: a two-frame clip, then an image in another
    document: [text(2) <boi> frame(4) <eoi> act <frame> <boi> frame(4) <eoi>] [text(2) image(4) text]."""
    span = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, 2, 2, 2]])
    modality = torch.where(span >= 0, VIDEO, TEXT)
    modality[0, 17:] = IMAGE
    doc = torch.tensor([[0] * 16 + [1] * 4])
    positions = torch.cat([torch.arange(16), torch.arange(4)])[None]
    return span, modality, doc, positions


def test_frame_conditioning_previous_reads_the_clean_frame_before(megatron_world):
    """With ``frame_conditioning: previous`` a frame hears the *clean* latents of the frame
    before it (``clean_latents``), nothing else does, and without ``clean_latents`` the
    sequence's own latents are read (inference, where earlier frames are clean)."""
    n, c = 20, 192
    span, modality, doc, positions = _clip_then_image()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, n), generator=g)
    clean = torch.randn(1, n, c, generator=g) * (span >= 0).unsqueeze(-1)
    t = torch.rand(1, n, generator=g) * (span >= 0)
    x_t = (1 - t.unsqueeze(-1)) * clean + t.unsqueeze(-1) * torch.randn(1, n, c, generator=g)
    mask = torch.stack([doc, span])
    model = make_provider(["model.frame_conditioning=previous"]).build(pre_process=True, post_process=True,
                                                                         vp_stage=None).eval()
    other = clean.clone()
    other[0, 3:7] = torch.randn(4, c, generator=g)  # another clean first frame, same x_t

    def forward(clean_latents):
        with torch.no_grad():
            return model(tokens, positions, mask, latents=x_t, timesteps=t, modality=modality,
                         clean_latents=clean_latents)

    (logits_a, pred_a), (logits_b, pred_b) = forward(clean), forward(other)
    moved = (pred_b[0] - pred_a[0]).abs().amax(-1) > 1e-4
    assert moved[11:15].all()  # the second frame reads the first's clean latents
    assert not moved[:11].any() and not moved[16:].any()  # nothing before it, nor the other document
    torch.testing.assert_close(logits_b[0, :11], logits_a[0, :11], rtol=0, atol=0)
    torch.testing.assert_close(forward(None)[1], forward(x_t)[1], rtol=0, atol=0)
    plain = make_provider().build(pre_process=True, post_process=True, vp_stage=None)
    assert plain.previous_frame_in is None


def test_action_conditioning_embedding_reaches_only_frames_after_an_action(megatron_world):
    """``action_conditioning: embedding``: the frame after ``<eoi> act <frame> <boi>`` gets the
    action input (zeroing its projection changes that frame's prediction only) and it is the
    mean word embedding of those four tokens."""
    n, c = 20, 192
    span, modality, doc, positions = _clip_then_image()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, n), generator=g)
    x_t = torch.randn(1, n, c, generator=g) * (span >= 0).unsqueeze(-1)
    t = torch.rand(1, n, generator=g) * (span >= 0)
    mask = torch.stack([doc, span])
    model = make_provider(["model.action_conditioning=embedding"]).build(pre_process=True, post_process=True,
                                                                           vp_stage=None).eval()
    actions = model.frame_actions_of(tokens, span, modality, doc)
    words = model.embedding.word_embeddings(tokens[:, 7:11])[0].mean(0)
    torch.testing.assert_close(actions[0, 11:15], words.expand(4, -1))
    assert actions[0, :11].abs().sum() == 0 and actions[0, 15:].abs().sum() == 0

    def forward():
        with torch.no_grad():
            return model(tokens, positions, mask, latents=x_t, timesteps=t, modality=modality)

    logits_a, pred_a = forward()
    with torch.no_grad():
        model.action_in.proj.weight.zero_()
    logits_b, pred_b = forward()
    moved = (pred_b[0] - pred_a[0]).abs().amax(-1) > 1e-4
    assert moved[11:15].all() and not moved[:11].any() and not moved[16:].any()
    torch.testing.assert_close(logits_b[0, :11], logits_a[0, :11], rtol=0, atol=0)
    assert make_provider().build(pre_process=True, post_process=True, vp_stage=None).action_in is None


def test_one_forward_with_a_kv_cache_equals_the_whole_sequence(megatron_world):
    """``forward(..., inference_context=...)`` (what decoding calls) computes only the positions
    after the cached ones, from inputs that describe the whole sequence: run in chunks it
    gives the logits, latent predictions and losses of one uncached forward, frame inputs
    (previous frame, actions) included, precomputed or not."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megafusion.model.mask import HybridMaskInfo

    n, c = 20, 192
    span, modality, doc, positions = _clip_then_image()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (1, n), generator=g)
    labels = torch.randint(0, 256, (1, n), generator=g)
    x_t = torch.randn(1, n, c, generator=g) * (span >= 0).unsqueeze(-1)
    t = torch.rand(1, n, generator=g) * (span >= 0)
    model = make_provider(["model.frame_conditioning=previous", "model.action_conditioning=embedding"]).build(
        pre_process=True, post_process=True, vp_stage=None).eval()
    inputs = dict(latents=x_t, timesteps=t, modality=modality)
    with torch.no_grad():
        logits, pred = model(tokens, positions, torch.stack([doc, span]), **inputs)
        loss, _ = model(tokens, positions, torch.stack([doc, span]), labels=labels, **inputs)
        for precomputed in (False, True):
            extra = {}
            if precomputed:
                extra = dict(previous_index=model.previous_frames_index(span, modality, doc),
                             frame_actions=model.frame_actions_of(tokens, span, modality, doc))
            context = StaticInferenceContext(max_batch_size=1, max_sequence_length=n)
            parts = []
            for start, end in ((0, 11), (11, 15), (15, n)):  # chunks never split an image/frame span
                context.sequence_len_offset = start
                whole = slice(0, end)
                mask = HybridMaskInfo(doc[:, whole], span[:, whole])
                step = {k: v[:, whole] for k, v in {**inputs, **extra}.items()}
                out = model(tokens[:, whole], positions[:, whole], mask, inference_context=context, **step)
                step_loss, _ = model(tokens[:, whole], positions[:, whole], mask, inference_context=context,
                                     labels=labels[:, whole], **step)
                assert out[0].shape[1] == end - start and out[1].shape[1] == end - start
                parts.append((*out, step_loss))
            torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), pred, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat([p[2] for p in parts], 1), loss, rtol=1e-5, atol=1e-5)


def test_patch_position_init_std(megatron_world):
    """The patch-position table is drawn at ``model.patch_position_init_std`` (the same draw
    scaled: its generator is seeded by the weight's name), every other matrix at init_std."""
    tables, others = {}, {}
    for std in (1.0, 3.0):
        provider = make_provider(["model.patch_positions=learned", f"model.patch_position_init_std={std}"])
        model = provider.build(pre_process=True, post_process=True, vp_stage=None)
        tables[std] = model.patch_position.table.weight.detach().clone()
        others[std] = model.patch_in.proj.weight.detach().clone()
    torch.testing.assert_close(tables[3.0], 3.0 * tables[1.0])
    assert abs(tables[1.0].std().item() - 1.0) < 0.15  # 16 x 64 standard normal draws
    torch.testing.assert_close(others[3.0], others[1.0], rtol=0, atol=0)
    assert others[1.0].std().item() < 0.03  # init_std 0.02
    with pytest.raises(ConfigError, match="patch_position_init_std"):
        validate(load_config(CONFIG, ["model.patch_position_init_std=0"]), world_size=1)


def test_sentencepiece_tokenizer_path(tmp_path):
    from megafusion.data.shapes import ACTIONS, ShapesWorld
    from megafusion.data.tokenizer import train_tokenizer

    world = ShapesWorld(seed=0, image_size=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([world.text_document(i).text for i in range(40)]
                                + [world.image_text(i).caption for i in range(40)]))
    model = train_tokenizer([corpus], tmp_path / "sp", vocab_size=400, actions=ACTIONS)
    cfg = load_config(CONFIG, ["model.seq_length=256", f"data.tokenizer={model}",
                               "data.shapes_weights={text: 0, image_text: 0, video: 0, action_video: 1}"])
    stream = ShapesStream.from_config(cfg)
    tok = stream.tokenizer
    sample = stream.sample(0)
    ids = sample.tokens[sample.modality == TEXT].tolist()
    action_ids = set(tok.action_ids().values())
    assert len(action_ids) == len(ACTIONS) and action_ids & set(ids)  # actions are single tokens
    assert tok.eod_id in ids and tok.boi_id in ids
    assert sample.clean_spans.any()  # the context frame of the action video
    caption = tok.decode(ids[:ids.index(tok.boi_id)])
    assert caption.startswith("The agent")
    # the preprocessing tool's layout: <boi><eoi> a0 <frame> <boi><eoi> a1 <frame> ...
    after_action = [ids[k + 1] for k, i in enumerate(ids[:-1]) if i in action_ids]
    assert after_action and set(after_action) == {tok.frame_id}


# --------------------------------------------------------------------------- U-Net adapters


def test_unet_adapters_shapes_and_locality():
    from megafusion.model.unet import UNetDown, UNetUp, latent_layout
    from megafusion.vision import load_representation

    rep = load_representation("pixel", image_size=32, patch_size=8)
    channels, patch = latent_layout(rep)
    assert (channels, patch) == (3, 8)
    down, up = UNetDown(channels, patch, 64), UNetUp(channels, patch, 64)
    latents = rep.encode(torch.rand(3, 3, 32, 32))  # [3, 16, 192]
    t = torch.rand(3)
    h = down(latents, t)
    assert h.shape == (3, 16, 64) and up(h, t).shape == (3, 16, 192)
    changed = latents.clone()
    changed[1] += 1.0
    diff = (down(changed, t) - h).abs().amax(dim=(1, 2))
    assert diff[1] > 1e-4 and diff[0] == 0 and diff[2] == 0  # images are processed independently


def test_unet_model_trains_on_whole_images(megatron_world):
    provider = make_provider(["model.patch_adapter=unet"])
    model = provider.build(pre_process=True, post_process=True, vp_stage=None)
    output, loss_func = provider.forward_step(provider.batch(image_indices(provider)), model)
    loss, _, _ = loss_func(output)
    loss.backward()
    assert model.patch_in.conv_in.weight.grad.abs().sum() > 0
    assert model.patch_out.conv_out.weight.grad.abs().sum() > 0
    tokens, positions, doc, span, latents, t, modality = hand_batch()  # a 6-patch span: not a whole image
    with pytest.raises(ValueError, match="whole images of 16 patches"):
        run(model, tokens, positions, doc, span, latents, t, modality)
