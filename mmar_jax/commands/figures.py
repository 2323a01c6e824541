"""The figures the commands write: matplotlib on its Agg backend (no display needed), saved to
PNG bytes so that each file is written atomically."""

from __future__ import annotations

import io


def pyplot():
  """matplotlib.pyplot with the Agg backend chosen before its first import."""
  import matplotlib  # lazy: a second to import, and only the figures need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above
  return plt


def png_bytes(fig, dpi: int) -> bytes:
  """A figure as PNG bytes, and the figure closed."""
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  pyplot().close(fig)
  return buf.getvalue()
