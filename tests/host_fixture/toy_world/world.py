"""The toy world: seeded procedural images with a small grammar, each captioned from its parameters.

An image is one shape of one colour and texture on a plain background, e.g.
"a red triangle on a grey background, striped". One value of each kind is held out of the base
world (HELD_OUT): the base model never sees it, so a LoRA has something new to learn. The
autoencoder and the detectors see every value (a decoder that never saw purple cannot draw it).
"""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels; SD1.5's VAE factor 8 makes 8x8 latents

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {"red": (220, 45, 45), "green": (45, 170, 65), "blue": (55, 85, 225), "yellow": (235, 205, 45),
           "purple": (150, 60, 205)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (236, 236, 236), "black": (22, 22, 22)}
TEXTURES = ("plain", "striped", "dotted")
HELD_OUT = {"shape": "star", "colour": "purple", "texture": "dotted"}
KINDS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS), "texture": TEXTURES}


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    texture: str

    def caption(self, words: dict[str, str] | None = None) -> str:
        """'a red triangle on a grey background, striped'; `words` renames a value (a trigger word)."""
        words = words or {}
        shape, colour = words.get(self.shape, self.shape), words.get(self.colour, self.colour)
        text = f"a {colour} {shape} on a {self.background} background"
        return text if self.texture == "plain" else f"{text}, {words.get(self.texture, self.texture)}"

    def labels(self) -> dict[str, int]:
        return {kind: KINDS[kind].index(getattr(self, kind)) for kind in KINDS}

    def has(self, value: str) -> bool:
        return value in (self.shape, self.colour, self.background, self.texture)


def base_values(kind: str) -> tuple[str, ...]:
    """The values of a kind the base model is trained on (all but the held-out one)."""
    return tuple(v for v in KINDS[kind] if v != HELD_OUT.get(kind))


def base_scenes() -> list[Scene]:
    """Every scene of the base world (no held-out value), in a fixed order."""
    return [Scene(s, c, b, t) for s in base_values("shape") for c in base_values("colour")
            for b in base_values("background") for t in base_values("texture")]


def scenes_with(value_kind: str, value: str) -> list[Scene]:
    """Scenes showing one held-out value, every other kind from the base world."""
    kinds = {k: base_values(k) for k in ("shape", "colour", "background", "texture")}
    kinds[value_kind] = (value,)
    return [Scene(s, c, b, t) for s in kinds["shape"] for c in kinds["colour"]
            for b in kinds["background"] for t in kinds["texture"]]


def all_scenes() -> list[Scene]:
    return [Scene(s, c, b, t) for s in SHAPES for c in COLOURS for b in BACKGROUNDS for t in TEXTURES]


# ---------------------------------------------------------------- drawing

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def at(points):
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]
    if shape == "square":
        s = r * 0.82
        return at([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return at([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "cross":
        a, b = r, r * 0.36
        return at([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                   (-a, -b), (-b, -b)])
    if shape == "star":
        return at([((r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                    (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)])
    return None


def _texture(texture: str, colour: np.ndarray) -> np.ndarray:
    """The shape's fill, [SIZE, SIZE, 3] floats: flat, bands, or dots.

    Patterns repeat every 16 px, on the 8 px latent grid: a convolutional decoder cannot draw
    anything finer than two latent cells where its latents are uniform."""
    dark = colour * 0.5
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if texture == "striped":
        return np.where(((yy // 8) % 2 == 1)[..., None], dark, colour)
    if texture == "dotted":
        centre = (((xx // 8) + (yy // 8)) % 2 == 0) & (((xx % 8) - 3.5) ** 2 + ((yy % 8) - 3.5) ** 2 < 9)
        return np.where(centre[..., None], dark, colour)
    return np.broadcast_to(colour, (SIZE, SIZE, 3))


def render(scene: Scene, seed: int) -> np.ndarray:
    """The scene as uint8 [SIZE, SIZE, 3]; the seed places, sizes and turns the shape."""
    rng = random.Random(seed)
    r = rng.uniform(17, 23)
    cx, cy = SIZE / 2 + rng.uniform(-5, 5), SIZE / 2 + rng.uniform(-5, 5)
    angle = rng.uniform(-0.25, 0.25)
    scale = 4  # drawn at 4x and reduced: smooth edges
    mask = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    draw = ImageDraw.Draw(mask)
    polygon = _polygon(scene.shape, cx * scale, cy * scale, r * scale, angle)
    if polygon is None:
        draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    alpha = np.asarray(mask.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)[..., None] / 255.0
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    fill = _texture(scene.texture, np.array(COLOURS[scene.colour], dtype=np.float32))
    image = background * (1 - alpha) + fill * alpha
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def dataset(scenes: list[Scene], count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`count` images of scenes drawn at random from `scenes` (seeded): uint8 [N, SIZE, SIZE, 3]."""
    rng = random.Random(seed)
    chosen = [rng.choice(scenes) for _ in range(count)]
    images = np.stack([render(scene, rng.randrange(2**31)) for scene in chosen])
    return images, chosen
