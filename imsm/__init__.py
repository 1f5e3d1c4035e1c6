"""imsm: Interweaving Memories of a Siamese LLM (Song et al., AAAI 2025): PEFT without forgetting.

The Hydra configuration ships inside the package (``imsm/conf``), so an installed copy runs from any directory.
"""

from pathlib import Path

__version__ = "0.1.0"

CONF_DIR = Path(__file__).resolve().parent / "conf"
