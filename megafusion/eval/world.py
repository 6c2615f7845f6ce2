"""ShapesWorld rollouts of a trained run: the held-out world it is scored on and one of its
action videos rolled out by the model (what ``megafusion generate --rollout`` shows)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from megafusion.data.shapes import HELDOUT_SEED, ShapesWorld, WorldConfig, canonical_action
from megafusion.data.shapes.video import agent_caption, apply_actions


def eval_world(gen) -> ShapesWorld:
    """The held-out ShapesWorld (``HELDOUT_SEED``) with the clip lengths of ``gen``'s training
    stream (``Generator.world_config``; the default world's for preprocessed data). Its
    ``holdout`` is the training world's: its ordinary draws are the seen split, and where
    compositions were held out its ``unseen_*`` draws are the unseen split."""
    base = gen.world_config or WorldConfig(image_size=gen.representation.image_size)
    return ShapesWorld(config=replace(base, seed=HELDOUT_SEED))


@dataclass
class HeldoutRollout:
    """One held-out action video rolled out: ``truth`` uint8 [F, S, S, 3] (rendered for
    ``actions``), ``frames`` uint8 [F - context_frames, S, S, 3] predicted from the first
    ``context_frames`` of ``truth``."""

    index: int
    actions: list[str]
    caption: str
    context_frames: int
    truth: np.ndarray
    frames: np.ndarray


def rollout_heldout(gen, index: int, opts=None, actions: list[str] | None = None,
                    caption: str | None = None) -> HeldoutRollout:
    """Rolls out held-out action video ``index`` from its context frames with ``gen``
    (a ``megafusion.inference.generate.Generator``). ``actions`` (any spelling
    ``canonical_action`` reads) replace the episode's, and the ground truth is re-rendered
    for them; ``caption`` replaces the agent caption of the actions."""
    world = eval_world(gen)
    sample = world.action_video(index)
    truth = sample.frames
    if actions is not None:
        if not actions:
            raise ValueError("rollout_heldout: actions=[] names no action; give None for the episode's own")
        actions = [canonical_action(a) for a in actions]
        start = tuple(int(v) for v in sample.path[0])
        truth = sample.episode.render(apply_actions(start, actions, world.lattice.k))
    else:
        actions = sample.actions
    c = sample.context_frames
    caption = caption if caption is not None else agent_caption(sample.episode, actions)
    frames = gen.rollout(truth[:c], actions, caption, opts)
    return HeldoutRollout(index, list(actions), caption, c, np.asarray(truth), frames)
