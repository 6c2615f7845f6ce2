"""Checkpoint interop: ``megafusion export`` (distributed checkpoint -> safetensors + config.json)
and ``megafusion import`` (the reverse). ``names`` owns the parameter-name mapping both ways; ``safetensors_io``
reads and writes the exported files (also for ``megafusion.inference.loading``)."""
