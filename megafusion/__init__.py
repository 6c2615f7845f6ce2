"""megafusion: a Megatron-scale trainer for native multimodal pretraining (Transfusion)."""

__version__ = "0.1.0"
