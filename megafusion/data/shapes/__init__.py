"""ShapesWorld: a seeded procedural multimodal world (images + captions + VQA, text
documents, physics videos, action-conditioned agent videos) with exactly known answers.

Stream samples with :class:`ShapesWorld`; write files for ``tools/preprocess_data.py``
with :func:`write_dataset`; score models with ``megafusion.eval.shapes``.
"""

from .export import load_png, save_png, write_dataset, write_video
from .holdout import HOLDOUT_MODES, Holdout, holdout_for
from .scene import (BACKGROUND, COLORS, DEFAULT_VOCAB, PALETTE, POSITION_NAMES, POSITIONS, SHAPES, SIZES, Scene,
                    ShapeObject, Vocab, render_scene, sample_scene)
from .text import VQA, ParsedObject, caption, make_vqa, normalize_answer, parse_caption, vqa_document, vqa_prompt
from .video import ACTION_ALIASES, ACTION_TOKENS, ACTIONS, apply_actions, canonical_action
from .world import (HELDOUT_SEED, ActionVideoSample, ImageTextSample, PlanningTask, ShapesWorld, TextDocument,
                    VideoSample, WorldConfig)

__all__ = [
    "ShapesWorld", "WorldConfig", "HELDOUT_SEED", "ImageTextSample", "TextDocument", "VideoSample", "ActionVideoSample",
    "PlanningTask", "Scene", "ShapeObject", "render_scene", "sample_scene", "caption", "parse_caption",
    "ParsedObject", "VQA", "make_vqa", "normalize_answer", "vqa_prompt", "vqa_document", "Vocab", "DEFAULT_VOCAB",
    "ACTIONS", "ACTION_ALIASES", "ACTION_TOKENS",
    "canonical_action", "apply_actions", "write_dataset", "save_png", "load_png", "write_video",
    "Holdout", "HOLDOUT_MODES", "holdout_for",
    "SHAPES", "COLORS", "PALETTE", "BACKGROUND", "SIZES", "POSITIONS", "POSITION_NAMES",
]
