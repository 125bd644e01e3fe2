"""Seed-compatible entry point: ``python pipeline.py --volume V --mask M --output results.csv --device cpu``."""
from helpers.cli import main

raise SystemExit(main())
