"""Inference: a trained model restored and run, with no training code.

- `restore`: the model and its weights from a workdir's checkpoint, jitted embed and logits;
- `matcher`: exact top-k cosine search, on one device or a gallery sharded over a mesh;
- `gallery`: enrolled identities (a pickle-free .npz) and the known/unknown search;
- `recognizer`: `FaceRecognizer`, what `jfacerec.load(workdir)` returns.
"""
