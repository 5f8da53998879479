"""LoRA Workbench: load, stack, train and merge LoRAs inside ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_LIST
from .nodes.routes import register_routes

WEB_DIRECTORY = "./web"
register_routes()  # /lora_workbench/info for the frontend's LoRA info panel; no-op without a server


class LoRAWorkbench(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> ComfyExtension:
    return LoRAWorkbench()
