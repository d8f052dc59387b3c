"""ComfyUI loads this repository as a node pack when it is cloned into ComfyUI/custom_nodes/
(ComfyUI-Manager's install from the git URL and the Comfy Registry both take the repository
root); the nodes themselves live in comfyui_nodes/."""
if __package__:
    from .comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (pytest does so with the repository root): no nodes to offer
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
