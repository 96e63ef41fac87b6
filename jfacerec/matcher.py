"""Moved to `jfacerec.inference.matcher`; this path re-exports it for one release (0.2)."""

from jfacerec.inference.matcher import shard_gallery, top_k_cosine

__all__ = ["shard_gallery", "top_k_cosine"]
