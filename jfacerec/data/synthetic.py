"""Procedural synthetic identities: face-like RGB images with identity and nuisance factors.

Every identity is a parameter vector drawn from a fixed prior with a generator seeded by
``(seed, identity)``: head shape, skin tone, hair colour and style, eye spacing and colour, brows,
nose, mouth, ears, beard and glasses. Every image of an identity adds nuisance drawn with a generator
seeded by ``(seed, identity, image)``: pose (yaw shifts the inner features), rotation, scale, shift,
lighting direction and colour cast, expression (mouth, eyes, brows), background, occlusion, blur and
sensor noise. Hence identity ``i`` is the same person in every call, image ``j`` of identity ``i`` is
always the same picture, and identities never used in training come from the same prior: the open
set.

The renderer is vectorised over images with NumPy: shapes are soft masks (a sigmoid of a signed
distance) evaluated on a ``[n, size, size]`` coordinate grid, so edges are anti-aliased at any size.
Colour planes are kept apart while painting (``[3, n, size, size]``): a mask then broadcasts over
whole rows rather than over a trailing axis of 3, which made compositing 3x slower.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Generator streams: the second-to-last entry of the seed sequence keeps identity and image draws
# independent even when an identity id equals an image id.
_IDENTITY_STREAM = 0
_IMAGE_STREAM = 1

_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 96], [160, 104, 70],
     [120, 76, 50], [90, 58, 40]], np.float32) / 255.0
_HAIR_COLOURS = np.array(
    [[20, 16, 14], [60, 40, 28], [110, 72, 40], [170, 120, 60], [225, 200, 140], [150, 60, 30],
     [185, 185, 185], [235, 235, 230]], np.float32) / 255.0
_IRIS_COLOURS = np.array(
    [[60, 40, 25], [100, 70, 40], [60, 110, 160], [70, 130, 90], [120, 120, 120]],
    np.float32) / 255.0

# Names of the identity parameters, in the order of the vector drawn by `identity_params`.
IDENTITY_KEYS = (
    "face_w", "face_h", "jaw", "skin_r", "skin_g", "skin_b", "hair_r", "hair_g", "hair_b",
    "hairline", "hair_volume", "hair_side", "fringe", "eye_dx", "eye_y", "eye_size", "iris_r",
    "iris_g", "iris_b", "brow_y", "brow_tilt", "brow_thick", "nose_len", "nose_w", "mouth_y",
    "mouth_w", "lip_thick", "lip_r", "ear_size", "beard", "glasses", "mole_x", "mole_y", "mole",
)
IMAGE_KEYS = (
    "angle", "scale", "shift_x", "shift_y", "yaw", "light_dir", "light_strength", "brightness",
    "cast_r", "cast_g", "cast_b", "smile", "mouth_open", "eye_open", "brow_raise", "bg_r", "bg_g",
    "bg_b", "bg2_r", "bg2_g", "bg2_b", "bg_dir", "bg_freq", "occ_on", "occ_x", "occ_y", "occ_w",
    "occ_h", "occ_r", "occ_g", "occ_b", "blur", "noise",
)


def _identity_vector(seed: int, identity: int) -> np.ndarray:
    """Draws one identity's parameters from the prior. Returns float32 [len(IDENTITY_KEYS)]."""
    rng = np.random.default_rng([seed, _IDENTITY_STREAM, identity])
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.1, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.2, 3)
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.8, 1.2, 3)
    values = dict(
        face_w=rng.uniform(0.48, 0.66), face_h=rng.uniform(0.62, 0.80), jaw=rng.uniform(0.0, 1.0),
        skin_r=skin[0], skin_g=skin[1], skin_b=skin[2],
        hair_r=hair[0], hair_g=hair[1], hair_b=hair[2],
        hairline=rng.uniform(-0.75, -0.35), hair_volume=rng.uniform(0.0, 0.25),
        hair_side=rng.uniform(-0.2, 0.7), fringe=rng.uniform(-1.0, 1.0),
        eye_dx=rng.uniform(0.18, 0.30), eye_y=rng.uniform(-0.18, -0.02),
        eye_size=rng.uniform(0.06, 0.11),
        iris_r=iris[0], iris_g=iris[1], iris_b=iris[2],
        brow_y=rng.uniform(0.10, 0.18), brow_tilt=rng.uniform(-0.35, 0.35),
        brow_thick=rng.uniform(0.015, 0.045),
        nose_len=rng.uniform(0.12, 0.28), nose_w=rng.uniform(0.05, 0.12),
        mouth_y=rng.uniform(0.28, 0.45), mouth_w=rng.uniform(0.12, 0.26),
        lip_thick=rng.uniform(0.02, 0.05), lip_r=rng.uniform(0.55, 0.85),
        ear_size=rng.uniform(0.08, 0.16),
        beard=float(rng.uniform() < 0.25) * rng.uniform(0.5, 1.0),
        glasses=float(rng.uniform() < 0.2),
        mole_x=rng.uniform(-0.35, 0.35), mole_y=rng.uniform(-0.2, 0.45),
        mole=float(rng.uniform() < 0.4),
    )
    return np.array([values[k] for k in IDENTITY_KEYS], np.float32)


def _image_vector(seed: int, identity: int, image: int) -> np.ndarray:
    """Draws one image's nuisance parameters. Returns float32 [len(IMAGE_KEYS)]."""
    rng = np.random.default_rng([seed, _IMAGE_STREAM, identity, image])
    bg = rng.uniform(0.0, 1.0, 3)
    bg2 = rng.uniform(0.0, 1.0, 3)
    occ = rng.uniform(0.0, 1.0, 3)
    values = dict(
        angle=rng.normal(0.0, 0.18), scale=rng.uniform(0.80, 1.12),
        shift_x=rng.uniform(-0.14, 0.14), shift_y=rng.uniform(-0.12, 0.12),
        yaw=rng.uniform(-0.45, 0.45), light_dir=rng.uniform(0.0, 2 * np.pi),
        light_strength=rng.uniform(0.0, 0.5), brightness=rng.uniform(0.7, 1.2),
        cast_r=rng.uniform(0.92, 1.08), cast_g=rng.uniform(0.92, 1.08),
        cast_b=rng.uniform(0.92, 1.08),
        smile=rng.uniform(-0.6, 1.0), mouth_open=rng.uniform(0.0, 1.0) ** 3,
        eye_open=np.clip(rng.uniform(0.1, 1.4), 0.1, 1.0), brow_raise=rng.uniform(-0.03, 0.05),
        bg_r=bg[0], bg_g=bg[1], bg_b=bg[2], bg2_r=bg2[0], bg2_g=bg2[1], bg2_b=bg2[2],
        bg_dir=rng.uniform(0.0, 2 * np.pi), bg_freq=rng.uniform(0.5, 6.0),
        occ_on=float(rng.uniform() < 0.3), occ_x=rng.uniform(-0.8, 0.8),
        occ_y=rng.uniform(-0.8, 0.8), occ_w=rng.uniform(0.15, 0.5), occ_h=rng.uniform(0.1, 0.4),
        occ_r=occ[0], occ_g=occ[1], occ_b=occ[2],
        blur=rng.uniform(0.0, 1.2), noise=rng.uniform(0.0, 0.06),
    )
    return np.array([values[k] for k in IMAGE_KEYS], np.float32)


def identity_params(identity_ids: Sequence[int], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Identity parameters as a dict of float32 [n] arrays, one entry per `IDENTITY_KEYS`."""
    table = np.stack([_identity_vector(seed, int(i)) for i in identity_ids])
    return {k: table[:, j] for j, k in enumerate(IDENTITY_KEYS)}


def image_params(identity_ids: Sequence[int], image_ids: Sequence[int], *,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Nuisance parameters as a dict of float32 [n] arrays, one entry per `IMAGE_KEYS`."""
    table = np.stack([_image_vector(seed, int(i), int(j)) for i, j in zip(identity_ids, image_ids)])
    return {k: table[:, j] for j, k in enumerate(IMAGE_KEYS)}


def _soft(signed_distance: np.ndarray, pixel: float) -> np.ndarray:
    """Soft inside-mask of a shape from its signed distance (negative inside), ~1 pixel wide."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / pixel, -30.0, 30.0)))


def _ellipse(x, y, cx, cy, rx, ry):
    """Approximate signed distance to an axis-aligned ellipse, in face units."""
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * np.minimum(rx, ry)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-composites `colour` ([n, 3]) over `canvas` ([3, n, s, s]) where `mask` ([n, s, s])."""
    out = mask * (_planes(colour) - canvas)  # a fresh array, so the sum is taken in place
    out += canvas
    return out


def _planes(colour: np.ndarray) -> np.ndarray:
    """[n, 3] colours -> [3, n, 1, 1], to broadcast over [3, n, s, s] planes."""
    return colour.T[:, :, None, None]


def _col(p: dict[str, np.ndarray], prefix: str, suffixes: str = "rgb") -> np.ndarray:
    return np.stack([p[f"{prefix}_{c}"] for c in suffixes], axis=-1)


def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable 5-tap Gaussian blur with a per-image sigma ([n]); img is [3, n, s, s]."""
    taps = np.arange(-2, 3, dtype=np.float32)
    w = np.exp(-0.5 * (taps[None, :] / np.maximum(sigma[:, None], 1e-3)) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    for axis in (2, 3):
        pads = [(0, 0)] * 4
        pads[axis] = (2, 2)
        padded = np.pad(img, pads, mode="edge")
        size = img.shape[axis]
        # Tap t reads the padded planes shifted by t along `axis`: a slice, not a copy.
        img = sum(w[None, :, t, None, None] * padded[(slice(None),) * axis + (slice(t, t + size),)]
                  for t in range(5))
    return img


def render_params(ident: dict[str, np.ndarray], nuis: dict[str, np.ndarray], *, image_size: int,
                  noise: np.ndarray) -> np.ndarray:
    """Renders faces from parameter dicts ([n] each). `noise` is float32 [n, s, s, 3] N(0, 1).

    Returns float32 [n, image_size, image_size, 3] in [0, 1].
    """
    n, s = len(ident["face_w"]), image_size
    pixel = 2.0 / s
    col = lambda v: v[:, None, None]  # noqa: E731  [n] -> [n, 1, 1] for broadcasting
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s * 2.0 - 1.0
    v, u = np.meshgrid(grid, grid, indexing="ij")  # image coords, y down
    u, v = u[None], v[None]

    # Inverse similarity transform: image coordinates -> face coordinates.
    cos_a, sin_a = np.cos(nuis["angle"]), np.sin(nuis["angle"])
    du, dv = u - col(nuis["shift_x"]), v - col(nuis["shift_y"])
    x = (col(cos_a) * du + col(sin_a) * dv) / col(nuis["scale"])
    y = (-col(sin_a) * du + col(cos_a) * dv) / col(nuis["scale"])
    fpix = pixel / col(nuis["scale"])
    # Yaw moves the inner features sideways and narrows the face a little.
    yaw = col(nuis["yaw"])
    fw = col(ident["face_w"]) * (1.0 - 0.12 * np.abs(yaw))
    fh = col(ident["face_h"])
    xi = x - 0.22 * yaw * fw  # inner-feature coordinates

    # Background: two colours blended along a wave in a random direction.
    bg_t = 0.5 + 0.5 * np.sin(col(nuis["bg_freq"]) * (u * col(np.cos(nuis["bg_dir"]))
                                                       + v * col(np.sin(nuis["bg_dir"]))))
    img = _planes(_col(nuis, "bg")) * (1.0 - bg_t) + _planes(_col(nuis, "bg2")) * bg_t

    hair = _col(ident, "hair")
    skin = np.clip(_col(ident, "skin"), 0.0, 1.0)
    # Hair behind the head: a larger ellipse, with side length set by `hair_side`.
    hair_back = _ellipse(x, y, 0.0, col(-0.15 + 0.5 * ident["hair_side"] * 0.3),
                         fw + col(ident["hair_volume"]) + 0.04,
                         fh * (0.9 + 0.35 * col(ident["hair_side"])) + col(ident["hair_volume"]))
    img = _paint(img, _soft(hair_back, fpix) * (col(ident["hair_side"]) > -0.1), hair)
    # Ears.
    for side in (-1.0, 1.0):
        ear = _ellipse(x, y, side * fw * 0.98, -0.05, col(ident["ear_size"]) * 0.6,
                       col(ident["ear_size"]))
        img = _paint(img, _soft(ear, fpix), skin * 0.92)
    # Face: an ellipse whose lower half narrows with `jaw` towards a chin.
    taper = 1.0 - col(ident["jaw"]) * 0.35 * np.clip(y / fh, 0.0, 1.0) ** 2
    face_sd = _ellipse(x / taper, y, 0.0, 0.0, fw, fh)
    face = _soft(face_sd, fpix)
    img = _paint(img, face, skin)
    # Beard: lower face darkened towards the hair colour.
    beard = face * _soft(col(ident["mouth_y"]) * fh - 0.06 - y, fpix) * col(ident["beard"])
    img = _paint(img, beard * 0.85, hair * 0.9)
    # Hair on top: everything above the hairline inside the hair outline, plus a fringe wave.
    line = col(ident["hairline"]) * fh + 0.06 * col(ident["fringe"]) * np.sin(6.0 * x / fw)
    top = _soft(y - line, fpix) * _soft(_ellipse(x, y, 0.0, -0.05, fw + 0.06
                                                 + col(ident["hair_volume"]) * 0.5,
                                                 fh + col(ident["hair_volume"])), fpix)
    img = _paint(img, top, hair)

    # Eyes: white, iris, then an eyelid of skin colour that closes with `eye_open`.
    eye_y = col(ident["eye_y"]) * fh
    er = col(ident["eye_size"])
    for side in (-1.0, 1.0):
        ex = side * col(ident["eye_dx"]) * fw * 1.6
        white = _soft(_ellipse(xi, y, ex, eye_y, er * 1.3, er * 0.75), fpix)
        img = _paint(img, white, np.full((n, 3), 0.95, np.float32))
        iris = _soft(_ellipse(xi, y, ex + 0.25 * er * col(nuis["yaw"]), eye_y, er * 0.6, er * 0.6),
                     fpix) * white
        img = _paint(img, iris, _col(ident, "iris"))
        pupil = _soft(_ellipse(xi, y, ex + 0.25 * er * col(nuis["yaw"]), eye_y, er * 0.25,
                               er * 0.25), fpix) * white
        img = _paint(img, pupil, np.full((n, 3), 0.05, np.float32))
        lid = white * _soft(y - (eye_y - er * 0.75 + 1.5 * er * (1.0 - col(nuis["eye_open"]))),
                            fpix)
        img = _paint(img, lid, skin * 0.85)
        # Brow: a tilted bar above the eye.
        by = eye_y - col(ident["brow_y"]) - col(nuis["brow_raise"])
        tilt = side * col(ident["brow_tilt"])
        dist = np.abs((y - by) - tilt * (xi - ex)) - col(ident["brow_thick"])
        brow = _soft(np.maximum(dist, np.abs(xi - ex) - er * 1.6), fpix)
        img = _paint(img, brow, hair * 0.8)
        # Glasses: a ring around each eye and a bridge.
        ring = np.abs(_ellipse(xi, y, ex, eye_y, er * 2.0, er * 1.6)) - 0.012
        img = _paint(img, _soft(ring, fpix) * col(ident["glasses"]),
                     np.full((n, 3), 0.08, np.float32))
    bridge = np.maximum(np.abs(y - eye_y) - 0.01, np.abs(xi) - col(ident["eye_dx"]) * fw * 0.5)
    img = _paint(img, _soft(bridge, fpix) * col(ident["glasses"]),
                 np.full((n, 3), 0.08, np.float32))

    # Nose: a shaded triangle-ish wedge from between the eyes down.
    nl, nw = col(ident["nose_len"]), col(ident["nose_w"])
    t = np.clip((y - eye_y) / nl, 0.0, 1.0)
    nose = _soft(np.maximum(np.abs(xi) - nw * (0.3 + 0.7 * t), np.maximum(eye_y - y, y - eye_y - nl)),
                 fpix)
    img = _paint(img, nose * 0.45, skin * 0.7)
    nostril = _soft(_ellipse(xi, y, 0.0, eye_y + nl, nw * 0.9, 0.025), fpix)
    img = _paint(img, nostril * 0.7, skin * 0.45)

    # Mouth: a curved band (smile bends it), opening into a dark interior.
    my = col(ident["mouth_y"]) * fh
    mw = col(ident["mouth_w"])
    curve = -col(nuis["smile"]) * 0.08 * (1.0 - (xi / mw) ** 2)
    open_h = col(ident["lip_thick"]) * (1.0 + 2.5 * col(nuis["mouth_open"]))
    band = np.maximum(np.abs(y - my - curve) - open_h, np.abs(xi) - mw)
    lips = _soft(band, fpix)
    lip_colour = np.stack([ident["lip_r"], ident["lip_r"] * 0.45, ident["lip_r"] * 0.45], -1)
    img = _paint(img, lips, lip_colour)
    inner = np.maximum(np.abs(y - my - curve) - open_h * 0.55 * col(nuis["mouth_open"]),
                       np.abs(xi) - mw * 0.8)
    img = _paint(img, _soft(inner, fpix), np.full((n, 3), 0.15, np.float32))
    # A mole: a small dark dot at an identity-specific place. Its mask is float64 (np.minimum of
    # two Python floats is a NumPy float64), and so is the image from here on; left so, because
    # float32 would change a few pixels of the dataset every documented figure was measured on.
    mole = _soft(_ellipse(xi, y, col(ident["mole_x"]) * fw, col(ident["mole_y"]) * fh, 0.025, 0.025),
                 fpix) * col(ident["mole"]) * face
    img = _paint(img, mole, skin * 0.35)

    # Lighting: a directional gradient, global brightness and a colour cast.
    shade = 1.0 + col(nuis["light_strength"]) * (u * col(np.cos(nuis["light_dir"]))
                                                 + v * col(np.sin(nuis["light_dir"])))
    img = img * (shade * col(nuis["brightness"])) * _planes(_col(nuis, "cast"))
    # Occlusion: a random rectangle in image coordinates.
    occ = _soft(np.maximum(np.abs(u - col(nuis["occ_x"])) - col(nuis["occ_w"]) / 2,
                           np.abs(v - col(nuis["occ_y"])) - col(nuis["occ_h"]) / 2),
                pixel) * col(nuis["occ_on"])
    img = _paint(img, occ, _col(nuis, "occ"))
    img = _blur(img, nuis["blur"] * s / 64.0)
    img = img + noise.transpose(3, 0, 1, 2) * col(nuis["noise"])
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0).transpose(1, 2, 3, 0))


def render_faces(identity_ids: Sequence[int] | np.ndarray, image_ids: Sequence[int] | np.ndarray,
                 *, image_size: int = 64, seed: int = 0) -> np.ndarray:
    """Renders image `image_ids[k]` of identity `identity_ids[k]` for every k.

    Args:
      identity_ids: int [n], any non-negative integers; each is one person.
      image_ids: int [n], which picture of that person.
      image_size: side of the square output.
      seed: the dataset seed; the same (seed, identity, image) always gives the same picture.

    Returns:
      uint8 [n, image_size, image_size, 3].
    """
    identity_ids = np.asarray(identity_ids, np.int64).reshape(-1)
    image_ids = np.asarray(image_ids, np.int64).reshape(-1)
    if identity_ids.shape != image_ids.shape:
        raise ValueError(f"identity_ids {identity_ids.shape} and image_ids {image_ids.shape} differ")
    if (identity_ids < 0).any() or (image_ids < 0).any():
        raise ValueError("identity and image ids must be non-negative")
    n = len(identity_ids)
    if n == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    # Each identity's parameters are drawn once however many of its images are rendered.
    unique, which = np.unique(identity_ids, return_inverse=True)
    ident = {k: v[which] for k, v in identity_params(unique, seed=seed).items()}
    nuis = image_params(identity_ids, image_ids, seed=seed)
    noise = np.stack([
        np.random.default_rng([seed, _IMAGE_STREAM, int(i), int(j), 1]).standard_normal(
            (image_size, image_size, 3), dtype=np.float32)
        for i, j in zip(identity_ids, image_ids)])
    img = render_params(ident, nuis, image_size=image_size, noise=noise)
    return np.round(img * 255.0).astype(np.uint8)
