"""jfacerec: face recognition in JAX/Flax.

`jfacerec.load(workdir)` returns a trained model that embeds, verifies and identifies faces
(see jfacerec/inference/recognizer.py); `jfacerec.align(image, landmarks)` warps a face onto the
ArcFace template by five detected points (jfacerec/data/align.py). The packages and their layering: ARCHITECTURE.md.
"""

_LAZY = {"load": "jfacerec.inference.recognizer", "FaceRecognizer": "jfacerec.inference.recognizer",
         "Match": "jfacerec.inference.gallery", "UNKNOWN": "jfacerec.inference.gallery",
         "align": "jfacerec.data.align"}


def __getattr__(name: str):
    # Lazy: `import jfacerec` stays cheap for the commands that never need a model.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jfacerec' has no attribute {name!r}")
