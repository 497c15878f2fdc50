"""What a run over a scene reports: a dataclass that prints as JSON."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any


class JsonReport:
    """Mixin of the report dataclasses (:class:`~skysense.inference.embed.EmbedReport` and the
    others): :meth:`to_dict` gives the fields with paths as strings, ready for ``json.dumps``."""

    def to_dict(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}
