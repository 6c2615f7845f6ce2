"""``python -m megafusion.data.shapes --out DIR``: write a ShapesWorld dataset (see export.py)."""

from .export import main

raise SystemExit(main())
