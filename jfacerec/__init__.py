"""jfacerec: face recognition in JAX/Flax.

`jfacerec.load(workdir)` returns a trained model that embeds, verifies and identifies faces
(see jfacerec/api.py).
"""


def __getattr__(name: str):
    # Lazy: `import jfacerec` stays cheap for the commands that never need a model.
    if name in ("load", "FaceRecognizer", "Match", "UNKNOWN"):
        from jfacerec import api

        return getattr(api, name)
    raise AttributeError(f"module 'jfacerec' has no attribute {name!r}")
