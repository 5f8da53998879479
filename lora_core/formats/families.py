"""The one registry of base model families: how to recognise their LoRA files, what to train on
them, and what a trained file says about itself.

Each `Family` holds, for one base model family:
  * how its LoRA files give themselves away: metadata (`ss_base_model_version` /
    `modelspec.architecture`, as their trainers write them) and module-name patterns;
  * its training targets: the attention linears (and feed-forward linears) by that family's
    own naming, as regexes over the host's weight paths (without `diffusion_model.` and `.weight`);
  * the metadata a trained file carries (`modelspec.architecture` as the family's trainers
    write it, kohya's `ss_base_model_version`, a typical resolution);
  * `host_configs`: the names of ComfyUI's model config classes (comfy.supported_models) of
    this family. Plain strings, so this module needs no ComfyUI; the bridge walks a model's
    config class hierarchy and takes the first name found here.
  * `kohya_unet_layout`: for the UNet families, whose kohya files (sd-scripts) name modules by
    their diffusers paths (`lora_unet_down_blocks_0_attentions_0_...`), the standard UNet's block
    layout, from which the host (ComfyUI's unet_to_diffusers) builds the map from its own paths.
    Empty for the others: their trainers (kohya, musubi-tuner) write `lora_unet_` + the ComfyUI path.

Unknown families degrade gracefully: `UNKNOWN_FAMILY` trains the layers whose names say
attention, writes "unknown" as the architecture and never claims another family's name.
Adding a family is one entry in `FAMILIES`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

SD1, SD2, SDXL, SD3, FLUX, UNKNOWN = "SD1.x", "SD2.x", "SDXL", "SD3", "Flux", "unknown"
CHROMA, QWEN_IMAGE, WAN21, WAN22 = "Chroma", "Qwen-Image", "Wan 2.1", "Wan 2.2"
HUNYUAN_VIDEO, LUMINA2, Z_IMAGE, HIDREAM = "HunyuanVideo", "Lumina2", "Z-Image", "HiDream"
LTXV, AURAFLOW, FLUX2, HUNYUAN_IMAGE = "LTX-Video", "AuraFlow", "Flux.2", "HunyuanImage 2.1"

# Separator in module names: kohya writes "_" where diffusers/ComfyUI write ".".
S = r"[._]"


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str                 # modelspec.architecture (without "/lora"), as its trainers write it
    base_model_version: str = ""      # kohya's ss_base_model_version, where kohya trains it
    resolution: str = "1024x1024"
    metadata_hints: tuple[str, ...] = ()   # lowercase substrings of the file's metadata
    key_hints: tuple[str, ...] = ()        # regexes that its LoRA module names match
    attention: tuple[str, ...] = ()        # regexes over host weight paths: attention linears
    feed_forward: tuple[str, ...] = ()     # regexes: feed-forward linears
    host_configs: tuple[str, ...] = ()     # ComfyUI supported_models class names
    # (num_res_blocks, transformer_depth, transformer_depth_middle, transformer_depth_output) of the
    # standard UNet, as ComfyUI's unet_config names them; () where files use the ComfyUI path.
    kohya_unet_layout: tuple = ()
    # regexes: the attention linears that read the text (a separate cross-attention); () where text and
    # image tokens share one joint attention (MMDiTs, single-stream DiTs), so no layer reads only the text.
    cross_attention: tuple[str, ...] = ()
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def _patterns(self, kind: str) -> list[re.Pattern]:
        if kind not in self._compiled:
            self._compiled[kind] = [re.compile(p) for p in getattr(self, kind)]
        return self._compiled[kind]

    def matches_keys(self, names: list[str]) -> bool:
        patterns = self._patterns("key_hints")
        return any(p.search(n) for n in names for p in patterns)

    def unet_config(self) -> dict | None:
        """The standard UNet's layout as a ComfyUI unet_config (the keys unet_to_diffusers reads), or None."""
        if not self.kohya_unet_layout:
            return None
        res, depth, middle, output = self.kohya_unet_layout
        return {"num_res_blocks": list(res), "channel_mult": [1] * len(res), "transformer_depth": list(depth),
                "transformer_depth_middle": middle, "transformer_depth_output": list(output)}

    def is_target(self, path: str, kinds: tuple[str, ...] = ("attention",)) -> bool:
        """Does this host weight path (no `diffusion_model.`, no `.weight`) belong to one of these
        pattern kinds ("attention", "feed_forward", "cross_attention")?"""
        return any(p.search(path) for kind in kinds for p in self._patterns(kind))


_UNET_ATTENTION = (r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",)
_UNET_FF = (r"\.ff\.net\.(0\.proj|2)$",)
_UNET_CROSS = (r"\.attn2\.(to_q|to_k|to_v|to_out\.0)$",)
_UNET_KEYS = (rf"(down_blocks|up_blocks|input_blocks|output_blocks|middle_block|mid_block){S}\d", r"lora_te_")
# The standard UNets' layouts (ComfyUI's model_detection values for SD1.5/SD2 and SDXL base).
_SD_LAYOUT = ((2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0), 1, (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0))
_SDXL_LAYOUT = ((2, 2, 2), (0, 0, 2, 2, 10, 10), 10, (0, 0, 0, 2, 2, 2, 10, 10, 10))
_FLUX_ATTENTION = (r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$", r"single_blocks\.\d+\.linear[12]$")
_FLUX_FF = (r"double_blocks\.\d+\.(img|txt)_mlp\.[02]$",)
_FLUX_KEYS = (rf"(double_blocks|single_blocks|single_transformer_blocks){S}\d",)
# Top-level transformer_blocks (a UNet's sit after "<block>_<n>_"): DiTs named the diffusers way.
_DIT_BLOCKS = r"(?<!\d[._])transformer_blocks"
# diffusers names of MMDiT blocks: Flux, Qwen-Image and HunyuanVideo LoRAs from diffusers look alike.
_DIFFUSERS_MMDIT_KEYS = (rf"{_DIT_BLOCKS}{S}\d+{S}attn{S}(add_q_proj|to_add_out|to_q)",)
_LUMINA_ATTENTION = (r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)$",)
_LUMINA_FF = (r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.w[123]$",)
_LUMINA_KEYS = (rf"(layers|noise_refiner|context_refiner){S}\d+{S}attention{S}(qkv|out)",)
_WAN_ATTENTION = (r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)$",)
_WAN_FF = (r"blocks\.\d+\.ffn\.[02]$",)
_WAN_CROSS = (r"blocks\.\d+\.cross_attn\.(q|k|v|o|k_img|v_img)$",)
# Wan's blocks are top-level: "blocks.0" after a root, never "transformer_blocks" or "down_blocks".
_WAN_BLOCKS = r"(^|\.|lora_unet_|lycoris_)blocks"
_WAN_KEYS = (rf"{_WAN_BLOCKS}{S}\d+{S}(self_attn|cross_attn){S}[qkvo]$", rf"{_WAN_BLOCKS}{S}\d+{S}attn[12]{S}to_")

FAMILIES: list[Family] = [
    Family(SDXL, "stable-diffusion-xl-v1-base", "sdxl_base_v1-0", "1024x1024",
           ("sdxl", "stable-diffusion-xl"),
           (r"lora_te2_", r"text_encoder_2", rf"\d{S}transformer_blocks{S}[1-9]", r"add_embedding", r"label_emb"),
           _UNET_ATTENTION, _UNET_FF, ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
                                       "SDXL_instructpix2pix"), _SDXL_LAYOUT, _UNET_CROSS),
    Family(SD1, "stable-diffusion-v1", "sd_v1", "512x512", ("sd_v1", "stable-diffusion-v1"), _UNET_KEYS,
           _UNET_ATTENTION, _UNET_FF, ("SD15", "SD15_instructpix2pix"), _SD_LAYOUT, _UNET_CROSS),
    Family(SD2, "stable-diffusion-v2-768-v", "sd_v2", "768x768", ("sd_v2", "stable-diffusion-v2"), _UNET_KEYS,
           _UNET_ATTENTION, _UNET_FF, ("SD20", "SD21UnclipL", "SD21UnclipH", "LotusD", "SD_X4Upscaler"), _SD_LAYOUT,
           _UNET_CROSS),
    Family(SD3, "stable-diffusion-3", "sd3", "1024x1024", ("sd3", "stable-diffusion-3"), (rf"joint_blocks{S}\d",),
           (r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)$",),
           (r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc[12]$",), ("SD3",)),
    Family(FLUX, "flux-1-dev", "flux1", "1024x1024", ("flux-1", "flux1", "flux.1", "flux_1"), _FLUX_KEYS + _DIFFUSERS_MMDIT_KEYS,
           _FLUX_ATTENTION, _FLUX_FF, ("Flux", "FluxInpaint", "FluxSchnell")),
    Family(CHROMA, "chroma", "chroma", "1024x1024", ("chroma",), _FLUX_KEYS + (rf"distilled_guidance_layer{S}",),
           _FLUX_ATTENTION, _FLUX_FF, ("Chroma", "ChromaRadiance")),
    Family(FLUX2, "Flux.2-dev", "", "1024x1024", ("flux.2", "flux2", "flux-2"), _FLUX_KEYS,
           _FLUX_ATTENTION, _FLUX_FF, ("Flux2",)),
    Family(HUNYUAN_IMAGE, "hunyuan-image-2.1", "", "2048x2048", ("hunyuan-image",), _FLUX_KEYS,
           _FLUX_ATTENTION, _FLUX_FF, ("HunyuanImage21", "HunyuanImage21Refiner")),
    Family(HUNYUAN_VIDEO, "hunyuan-video", "", "1280x720", ("hunyuan-video", "hunyuan_video", "hunyuanvideo"),
           _FLUX_KEYS + _DIFFUSERS_MMDIT_KEYS + (rf"img_attn_qkv", rf"individual_token_refiner", r"token_refiner"),
           _FLUX_ATTENTION + (r"individual_token_refiner\.blocks\.\d+\.self_attn\.(qkv|proj)$",),
           _FLUX_FF, ("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V", "HunyuanVideo15",
                      "HunyuanVideo15_SR_Distilled")),
    Family(QWEN_IMAGE, "Qwen-Image", "", "1328x1328", ("qwen-image", "qwen_image", "qwenimage"),
           (rf"{_DIT_BLOCKS}{S}\d+{S}(img_mlp|txt_mlp|img_mod|txt_mod)",) + _DIFFUSERS_MMDIT_KEYS,
           (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",),
           (r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)$",), ("QwenImage",)),
    Family(LUMINA2, "lumina-2", "lumina2", "1024x1024", ("lumina",), _LUMINA_KEYS,
           _LUMINA_ATTENTION, _LUMINA_FF, ("Lumina2",)),
    Family(Z_IMAGE, "Z-Image", "", "1024x1024", ("z-image", "z_image", "zimage"), _LUMINA_KEYS,
           _LUMINA_ATTENTION, _LUMINA_FF, ("ZImage",)),
    Family(WAN21, "wan2.1", "", "1280x720", ("wan2.1", "wan2_1", "wan21"), _WAN_KEYS + (r"lora_unet__blocks",),
           _WAN_ATTENTION, _WAN_FF, ("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Vace", "WAN21_Camera",
                                     "WAN21_HuMo"), cross_attention=_WAN_CROSS),
    Family(WAN22, "wan2.2", "", "1280x704", ("wan2.2", "wan2_2", "wan22"), _WAN_KEYS,
           _WAN_ATTENTION, _WAN_FF, ("WAN22_T2V", "WAN22_S2V", "WAN22_Animate", "WAN22_Camera"),
           cross_attention=_WAN_CROSS),
    Family(HIDREAM, "hidream-i1", "", "1024x1024", ("hidream",), (rf"(double_stream_blocks|single_stream_blocks){S}\d",),
           (r"(double_stream_blocks|single_stream_blocks)\.\d+\.block\.attn1\.(to_q|to_k|to_v|to_out)(_t)?$",),
           (r"(double_stream_blocks|single_stream_blocks)\.\d+\.block\.ff_[it]\.(w1|w2|w3)$",), ("HiDream",)),
    Family(LTXV, "ltx-video", "", "768x512", ("ltx",), (rf"{_DIT_BLOCKS}{S}\d+{S}attn[12]{S}to_",),
           (r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",),
           (r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$",), ("LTXV", "LTXAV"),
           cross_attention=(r"transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)$",)),
    Family(AURAFLOW, "auraflow", "", "1024x1024", ("aura",), (rf"(double_layers|single_layers){S}\d",),
           (r"(double_layers|single_layers)\.\d+\.attn\.w[12][qkvo]$",),
           (r"(double_layers|single_layers)\.\d+\.(mlpX|mlpC|mlp)\.(c_fc1|c_fc2|c_proj)$",), ("AuraFlow",)),
]

# Families without an entry: train what is named attention, claim no architecture.
UNKNOWN_FAMILY = Family(
    UNKNOWN, UNKNOWN,
    attention=(r"(^|\.)[a-z_]*(attn\d*|attention)[a-z_]*\.(to_q|to_k|to_v|to_out(\.0)?|q|k|v|o|qkv|proj|out|"
               r"q_proj|k_proj|v_proj|out_proj)$",),
    feed_forward=(r"\.(ff|ffn|mlp|feed_forward)\.",))

_BY_NAME = {f.name: f for f in FAMILIES}
_BY_HOST_CONFIG = {config: f for f in FAMILIES for config in f.host_configs}


def family(name: str) -> Family:
    """The registry entry of a family name; UNKNOWN_FAMILY for names it does not know."""
    return _BY_NAME.get(name, UNKNOWN_FAMILY)


def family_of_host_config(class_names: list[str]) -> str:
    """A family name from a host model's config class and its bases (most specific first)."""
    for name in class_names:
        if name in _BY_HOST_CONFIG:
            return _BY_HOST_CONFIG[name].name
    return UNKNOWN


def families_of_keys(prefixes: list[str]) -> list[str]:
    """Every family whose LoRA module names look like these, in registry order."""
    return [f.name for f in FAMILIES if f.matches_keys(prefixes)]


def guess_family(prefixes: list[str], metadata: dict[str, str], prefer: str | None = None,
                 strict: bool = False) -> str:
    """Which family a LoRA was made for: its metadata first, else its module names.

    Several families share module names (Flux, Chroma and HunyuanVideo all have double_blocks);
    when `prefer` (the host model's family) is one of them, it is taken. `strict`: a name shared by
    several families gives UNKNOWN (for what is written into a file), not the likeliest of them.
    """
    hint = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if hint.strip():
        for f in FAMILIES:
            if any(needle in hint for needle in f.metadata_hints):
                return f.name
    candidates = families_of_keys(prefixes)
    if prefer in candidates:
        return prefer
    if not candidates or (strict and len(candidates) > 1):
        return UNKNOWN
    return candidates[0]


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]
