"""The ComfyUI node pack (comfyui_nodes/) and its workflows (workflows/), without a
ComfyUI install: only ComfyUI's own modules (folder_paths, comfy, comfy.utils,
comfy.model_management) are stubbed; the nodes talk to the real tiny servers."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_flux.client import Client

from pictures import picture

ROOT = Path(__file__).resolve().parent.parent
PACK_DIR = ROOT / "comfyui_nodes"
WORKFLOWS = ROOT / "workflows"

SERVICES, BUNDLE = "QWEN2VL_FLUX_SERVICES", "QWEN2VL_FLUX_BUNDLE"
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# The contract of each node: link inputs (name -> type; widgets are checked separately),
# outputs, function and category.
EXPECTED = {
    "Qwen2VLFluxServices": dict(links={}, outputs=(SERVICES,), function="connect", category="Qwen2VL-Flux",
                                widgets=["encoder", "generator", "timeout", "token", "tls_ca", "tls_cert",
                                         "tls_key"]),
    "Qwen2VLFluxEncode": dict(links={"services": SERVICES, "image": "IMAGE", "reference": "IMAGE"},
                              outputs=(BUNDLE,), function="encode", category="Qwen2VL-Flux",
                              widgets=["prompt", "mode", "focus", "center_x", "center_y", "radius"]),
    "Qwen2VLFluxGenerate": dict(links={"services": SERVICES, "bundle": BUNDLE, "image": "IMAGE", "mask": "MASK",
                                       "depth_map": "IMAGE", "line_map": "IMAGE"},
                                outputs=("IMAGE", "STRING"), function="generate", category="Qwen2VL-Flux",
                                widgets=["mode", "seed", "steps", "guidance", "strength", "image_count",
                                         "aspect_ratio", "width", "height", "depth", "depth_strength", "line",
                                         "line_strength", "line_detector", "corrected_controlnet"]),
    "Qwen2VLFluxControlMaps": dict(links={"services": SERVICES, "image": "IMAGE"},
                                   outputs=("IMAGE", "IMAGE", "STRING"), function="compute",
                                   category="Qwen2VL-Flux/control maps",
                                   widgets=["line_detector", "denoise_radius"]),
    "Qwen2VLFluxControlMapDenoise": dict(links={"image": "IMAGE"}, outputs=("IMAGE",), function="denoise",
                                         category="Qwen2VL-Flux/control maps", widgets=["radius"]),
}
OPTIONAL_LINKS = {"reference", "image", "mask", "depth_map", "line_map"}

# ComfyUI core nodes the workflows use, as ComfyUI defines them: inputs in order
# (name, type, is a widget), outputs, and extra widget values the frontend saves
# (LoadImage's upload button stores "image").
CORE_NODES = {
    "LoadImage": dict(inputs=[("image", "COMBO", True)], outputs=["IMAGE", "MASK"], extra_widgets=1),
    "LoadImageMask": dict(inputs=[("image", "COMBO", True), ("channel", "COMBO", True)], outputs=["MASK"],
                          extra_widgets=1, combos={"channel": ["alpha", "red", "green", "blue"]}),
    "SaveImage": dict(inputs=[("images", "IMAGE", False), ("filename_prefix", "STRING", True)], outputs=[],
                      extra_widgets=0),
    "PreviewImage": dict(inputs=[("images", "IMAGE", False)], outputs=[], extra_widgets=0),
}


# ---------------------------------------------------------------------------- ComfyUI stubs

class _InterruptProcessingException(Exception):
    pass


def _comfy_modules():
    """Stand-ins for ComfyUI's own modules, with the real ones' semantics for what the pack uses."""
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_input_directory = lambda: "/nonexistent/input"
    folder_paths.get_output_directory = lambda: "/nonexistent/output"

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = _InterruptProcessingException
    mm.interrupt_processing_mutex = threading.RLock()
    mm.interrupt_processing = False

    def interrupt_current_processing(value=True):
        with mm.interrupt_processing_mutex:
            mm.interrupt_processing = value

    def processing_interrupted():
        with mm.interrupt_processing_mutex:
            return mm.interrupt_processing

    def throw_exception_if_processing_interrupted():
        with mm.interrupt_processing_mutex:
            if mm.interrupt_processing:
                mm.interrupt_processing = False
                raise mm.InterruptProcessingException()

    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    utils = types.ModuleType("comfy.utils")
    utils.PROGRESS_BAR_HOOK = None
    utils.updates = []          # (value, total) of every update, in order

    def set_progress_bar_global_hook(function):
        utils.PROGRESS_BAR_HOOK = function

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.node_id = total, 0, node_id
            self.hook = utils.PROGRESS_BAR_HOOK

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            value = min(value, self.total)
            self.current = value
            utils.updates.append((value, self.total))
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=self.node_id)

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.set_progress_bar_global_hook = set_progress_bar_global_hook
    utils.ProgressBar = ProgressBar
    comfy.utils, comfy.model_management = utils, mm
    return {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm}


def _comfyui_hook(mm):
    """ComfyUI's own progress hook checks the interrupt flag first (main.py hijack_progress)."""
    def hook(value, total, preview, node_id=None):
        mm.throw_exception_if_processing_interrupted()
    return hook


def load_like_comfyui(module_path: str):
    """nodes.load_custom_node for a directory: the module is named after its path."""
    sys_module_name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comfy():
    stubs = _comfy_modules()
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        ns = types.SimpleNamespace(utils=stubs["comfy.utils"], model_management=stubs["comfy.model_management"])
        ns.utils.set_progress_bar_global_hook(_comfyui_hook(ns.model_management))
        yield ns


@pytest.fixture(scope="module")
def pack(comfy):
    module = load_like_comfyui(str(PACK_DIR))
    yield module
    for name in [n for n in sys.modules if n == str(PACK_DIR) or n.startswith(str(PACK_DIR) + ".")]:
        del sys.modules[name]


@pytest.fixture()
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="module")
def services(pack, servers):
    cls = pack.NODE_CLASS_MAPPINGS["Qwen2VLFluxServices"]
    return cls().connect(servers["encoder"].address, servers["generator"].address, 120.0)[0]


# ---------------------------------------------------------------------------- helpers

def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return picture(width, height, seed, discs=3)


def _tensor(picture: Image.Image) -> torch.Tensor:
    """As ComfyUI's LoadImage makes an IMAGE."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _assert_image(t, batch, height, width):
    assert isinstance(t, torch.Tensor)
    assert tuple(t.shape) == (batch, height, width, 3)
    assert t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


GEN = dict(seed=7, steps=2, guidance=3.5, strength=0.8, image_count=1, aspect_ratio="1:1", width=0, height=0,
           depth=True, depth_strength=0.2, line=True, line_strength=0.4, line_detector="auto",
           corrected_controlnet=False)
ENC = dict(prompt="", focus=False, center_x=0.5, center_y=0.5, radius=0.3)
A = _picture(64, 64, seed=1)
B = _picture(48, 64, seed=2)


# ---------------------------------------------------------------------------- declarations

def test_pack_loads_like_comfyui_from_any_folder_name(comfy, pack, tmp_path):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(EXPECTED)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(EXPECTED)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["Qwen2VLFluxServices"] == "Qwen2VL Flux Services"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["Qwen2VLFluxEncode"] == "Qwen2VL Encode"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["Qwen2VLFluxGenerate"] == "Qwen2VL Flux Generate"
    # A clone under custom_nodes/ with a dotted, hyphenated name loads the same way.
    copy = tmp_path / "custom_nodes" / "ComfyUI-Qwen2VL-Flux.v1"
    shutil.copytree(PACK_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        again = load_like_comfyui(str(copy))
        assert set(again.NODE_CLASS_MAPPINGS) == set(EXPECTED)
    finally:
        for name in [n for n in sys.modules if n.startswith(str(copy).replace(".", "_x_"))]:
            del sys.modules[name]


def test_pyproject_declares_registry_metadata_and_only_the_light_client():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    assert "comfyui" not in meta["project"]["name"].lower()
    assert not any(d.split(">")[0] in ("torch", "transformers", "diffusers") for d in meta["project"]["dependencies"])
    # The client from this very clone, by a direct reference: no package name from the index.
    assert _requirements() == ["."]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


_LOAD_LIKE_COMFYUI = """
import importlib.util, json, logging, os, sys
logging.basicConfig(format="%(levelname)s %(message)s")
path = sys.argv[1]
spec = importlib.util.spec_from_file_location(path.replace(".", "_x_"), os.path.join(path, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
client = sys.modules.get("qwen2vl_flux.client")
print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS), "client": getattr(client, "__file__", None)}))
"""


def test_manager_install_from_the_git_url_in_a_scratch_comfyui(tmp_path):
    """What ComfyUI-Manager does for a git URL (glob/manager_core.py): clone the repository root
    into custom_nodes/, then `python -m pip install LINE` for each line of its requirements.txt,
    inside the clone; ComfyUI then loads the clone's __init__.py. Offline here: the scratch
    Python sees this one's packages (as ComfyUI's brings torch), so pip needs no index."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    venv = tmp_path / "comfyui-venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    clone = tmp_path / "ComfyUI" / "custom_nodes" / "qwen2vl-flux"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for line in _requirements():
        done = subprocess.run([python, "-m", "pip", "install", line], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    loaded = subprocess.run([python, "-c", _LOAD_LIKE_COMFYUI, str(clone)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.splitlines()[-1])
    assert result["nodes"] == sorted(EXPECTED)
    assert result["client"].startswith(str(venv))      # the copy pip installed from the clone


def test_pack_without_the_client_says_in_one_line_how_to_install_it(tmp_path):
    import subprocess

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    loaded = subprocess.run([str(bare / "bin" / "python"), "-c", _LOAD_LIKE_COMFYUI, str(ROOT)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["nodes"] == []
    lines = loaded.stderr.strip().splitlines()
    assert len(lines) == 1 and f"-m pip install {ROOT}" in lines[0], lines


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_node_declarations(pack, name):
    cls, expected = pack.NODE_CLASS_MAPPINGS[name], EXPECTED[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    inputs = {**spec["required"], **spec.get("optional", {})}
    links = {k: v[0] for k, v in inputs.items() if isinstance(v[0], str) and v[0] not in PRIMITIVES}
    widgets = [k for k, v in inputs.items() if isinstance(v[0], list) or v[0] in PRIMITIVES]
    assert links == expected["links"]
    assert widgets == expected["widgets"]
    assert set(spec.get("optional", {})) - set(widgets) <= OPTIONAL_LINKS
    for key, value in inputs.items():
        assert isinstance(value, tuple) and 1 <= len(value) <= 2, key
        options = value[1] if len(value) == 2 else {}
        if isinstance(value[0], list):
            assert value[0] and options.get("default", value[0][0]) in value[0], key
        elif value[0] in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], key
    assert cls.RETURN_TYPES == expected["outputs"]
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert cls.FUNCTION == expected["function"] and callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY == expected["category"]
    assert not getattr(cls, "OUTPUT_NODE", False)
    # Cached by inputs (ComfyUI's default): no IS_CHANGED forcing re-execution.
    assert not hasattr(cls, "IS_CHANGED")
    # The function takes exactly the declared inputs; optional ones have defaults.
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    assert set(params) - {"self"} == set(inputs)
    for key in spec.get("optional", {}):
        assert params[key].default is not inspect.Parameter.empty, key


def test_mode_and_size_widgets_follow_the_client_rules(pack):
    from qwen2vl_flux.client.modes import ASPECT_RATIOS, DEFAULTS, Mode

    gen = pack.NODE_CLASS_MAPPINGS["Qwen2VLFluxGenerate"].INPUT_TYPES()["required"]
    assert gen["mode"][0] == [m.value for m in Mode]
    assert gen["aspect_ratio"][0] == ["auto", *ASPECT_RATIOS] and gen["aspect_ratio"][1]["default"] == "auto"
    for key in ("steps", "guidance", "strength", "depth_strength", "line_strength", "corrected_controlnet"):
        assert gen[key][1]["default"] == DEFAULTS[key]
    enc = pack.NODE_CLASS_MAPPINGS["Qwen2VLFluxEncode"].INPUT_TYPES()["required"]
    assert enc["mode"][0] == [m.value for m in Mode]


def test_services_node_builds_a_client_and_keeps_the_token_out_of_sight(nodes, servers, monkeypatch):
    monkeypatch.setenv("QWEN2VL_FLUX_TOKEN", "s3cret")
    conn = nodes["Qwen2VLFluxServices"].connect(servers["encoder"].address, servers["generator"].address,
                                                30.0)[0]
    assert "s3cret" not in repr(conn)
    client = conn.client()
    assert isinstance(client, Client) and client.timeout == 30.0
    assert client._metadata == (("authorization", "Bearer s3cret"),)
    assert conn.client() is client               # channels are reused
    with pytest.raises(ValueError, match="address"):
        nodes["Qwen2VLFluxServices"].connect(" ", servers["generator"].address, 30.0)


# ---------------------------------------------------------------------------- against the servers

def test_encode_then_generate_img2img(comfy, nodes, services):
    enc, gen = nodes["Qwen2VLFluxEncode"], nodes["Qwen2VLFluxGenerate"]
    image = _tensor(A)
    bundle = enc.encode(services, image, mode="img2img", **ENC)[0]
    again = enc.encode(services, image.clone(), mode="img2img", **ENC)[0]
    assert bundle.data == again.data and bundle.roles == ("a",) and bundle.mode == "img2img"
    assert type(bundle).__name__ == "EmbeddingBundle" and "MB" in repr(bundle)

    comfy.utils.updates.clear()
    params = dict(GEN, image_count=2, strength=1.0)
    first, info = gen.generate(services, bundle, "img2img", image=image, **params)
    _assert_image(first, 2, 64, 64)
    assert comfy.utils.updates == [(1, 2), (2, 2)]
    info = json.loads(info)
    assert info["seed"] == 7 and info["parameters"]["steps"] == 2 and info["ignored_parameters"] == []

    # Fixed seed: the same batch; another seed: another one. Image a defaults to the bundle's.
    second, _ = gen.generate(services, bundle, "img2img", **params)
    assert torch.equal(first, second)
    other, _ = gen.generate(services, bundle, "img2img", image=image, **dict(params, seed=8))
    assert not torch.equal(first, other)


def test_variation_with_reference_focus_and_explicit_size(nodes, services):
    enc, gen = nodes["Qwen2VLFluxEncode"], nodes["Qwen2VLFluxGenerate"]
    bundle = enc.encode(services, _tensor(A), **dict(ENC, mode="variation", focus=True, prompt="a cat"))[0]
    assert bundle.has_prompt
    images, _ = gen.generate(services, bundle, "variation", **dict(GEN, width=64, height=48))
    _assert_image(images, 1, 48, 64)
    with pytest.raises(ValueError, match="both width and height"):
        gen.generate(services, bundle, "variation", **dict(GEN, width=64))
    # The focus goes to the reference outside variation: no reference, a clear error.
    with pytest.raises(ValueError, match="reference"):
        enc.encode(services, _tensor(A), **dict(ENC, mode="img2img", focus=True))
    # A bundle of the reference only cannot drive a mode that reads image a's embedding.
    ref_only = enc.encode(services, _tensor(A), reference=_tensor(B), **dict(ENC, mode="img2img", focus=True))[0]
    assert ref_only.roles == ("b",)
    with pytest.raises(ValueError, match="set Qwen2VL Encode's mode to controlnet"):
        gen.generate(services, ref_only, "controlnet", image=_tensor(A), **GEN)


def test_inpaint_takes_a_mask_of_another_size(nodes, services):
    enc, gen = nodes["Qwen2VLFluxEncode"], nodes["Qwen2VLFluxGenerate"]
    bundle = enc.encode(services, _tensor(A), mode="inpaint", **ENC)[0]
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1.0                       # (H, W), white = repaint; resized to image a
    images, _ = gen.generate(services, bundle, "inpaint", image=_tensor(A), mask=mask, **GEN)
    _assert_image(images, 1, 64, 64)
    # Another shape: the generator's one mask rule refuses it, naming both sizes, before any call.
    with pytest.raises(ValueError, match="mask is 32x16 but image a is 64x64"):
        gen.generate(services, bundle, "inpaint", image=_tensor(A), mask=torch.zeros(16, 32), **GEN)
    with pytest.raises(ValueError, match="MASK"):
        gen.generate(services, bundle, "inpaint", image=_tensor(A), **GEN)


def test_control_maps_denoise_and_controlnet(nodes, services):
    maps_node, denoise = nodes["Qwen2VLFluxControlMaps"], nodes["Qwen2VLFluxControlMapDenoise"]
    depth, line, detector = maps_node.compute(services, _tensor(A), "canny", 0.0)
    _assert_image(depth, 1, 64, 64)
    _assert_image(line, 1, 64, 64)
    assert detector == "depth: depth-anything-v2, line: canny"

    blurred = denoise.denoise(line, 2.0)[0]
    _assert_image(blurred, 1, 64, 64)
    assert float(blurred.std()) < float(line.std())
    assert denoise.denoise(line, 0.0)[0] is line

    enc, gen = nodes["Qwen2VLFluxEncode"], nodes["Qwen2VLFluxGenerate"]
    bundle = enc.encode(services, _tensor(A), mode="controlnet", **ENC)[0]
    given, _ = gen.generate(services, bundle, "controlnet", image=_tensor(A), depth_map=depth, line_map=line,
                            **dict(GEN, line_detector="canny"))
    _assert_image(given, 1, 64, 64)
    # No maps wired: the client computes them with the encoder: the same maps, the same images.
    computed, _ = gen.generate(services, bundle, "controlnet", **dict(GEN, line_detector="canny"))
    assert torch.equal(given, computed)


# ---------------------------------------------------------------------------- workflows

def _definition(pack, kind):
    """(inputs [(name, type, is_widget, options)], outputs [type], extra widget values) of a node type."""
    if kind in CORE_NODES:
        core = CORE_NODES[kind]
        combos = core.get("combos", {})
        inputs = [(n, t, w, {"choices": combos[n]} if n in combos else {}) for n, t, w in core["inputs"]]
        return inputs, core["outputs"], core["extra_widgets"]
    cls = pack.NODE_CLASS_MAPPINGS[kind]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            options = value[1] if len(value) > 1 else {}
            if isinstance(value[0], list):
                inputs.append((name, "COMBO", True, dict(options, choices=value[0])))
            else:
                inputs.append((name, value[0], value[0] in PRIMITIVES, options))
    return inputs, list(cls.RETURN_TYPES), 0


def _widget_names(pack, kind):
    inputs, _, _ = _definition(pack, kind)
    names = []
    for name, _, is_widget, options in inputs:
        if is_widget:
            names.append(name)
            if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                names.append(None)          # the frontend's "control after generate" value
    return names


def _ui_to_api(pack, ui):
    prompt = {}
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        inputs = {}
        for name, value in zip(_widget_names(pack, node["type"]), node["widgets_values"]):
            if name is not None:
                inputs[name] = value
        for slot in node["inputs"]:
            if slot["link"] is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))


def test_there_is_a_workflow_per_mode():
    names = {p.stem for p in UI_FILES}
    assert names == {"qwen2vl_flux_variation", "qwen2vl_flux_img2img", "qwen2vl_flux_inpaint",
                     "qwen2vl_flux_controlnet"}
    for p in UI_FILES:
        assert (WORKFLOWS / f"{p.stem}_api.json").exists()


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_well_formed(pack, path):
    ui = json.loads(path.read_text())
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        assert key in ui
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    known = set(pack.NODE_CLASS_MAPPINGS) | set(CORE_NODES)
    for node in ui["nodes"]:
        assert node["type"] in known, node["type"]
        for key in ("pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"):
            assert key in node, (node["id"], key)
        inputs, outputs, extra = _definition(pack, node["type"])
        # Slots: every link-type input, in declaration order; outputs as declared.
        assert [(s["name"], s["type"]) for s in node["inputs"]] == [(n, t) for n, t, w, _ in inputs if not w]
        assert [s["type"] for s in node["outputs"]] == outputs
        # Widget values line up with the widgets (drag and drop fills them by position).
        names = _widget_names(pack, node["type"])
        assert len(node["widgets_values"]) == len(names) + extra, node["type"]
        options = {n: o for n, _, _, o in inputs}
        for name, value in zip(names, node["widgets_values"]):
            if name is None:
                assert value in ("fixed", "increment", "decrement", "randomize")
            elif "choices" in options[name]:
                assert value in options[name]["choices"], (name, value)
        # Every required link input is connected.
        required = set(pack.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"]) \
            if node["type"] in pack.NODE_CLASS_MAPPINGS else {n for n, t, w in CORE_NODES[node["type"]]["inputs"]}
        for slot in node["inputs"]:
            if slot["name"] in required:
                assert slot["link"] is not None, (node["id"], slot["name"])
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == link_type, (link_id, out["type"], inp["type"], link_type)
        assert link_id in out["links"] and inp["link"] == link_id
        assert _definition(pack, nodes[src]["type"])[1][src_slot] == link_type


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_copy_matches_the_ui_workflow(pack, path):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / f"{path.stem}_api.json").read_text())
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == \
        _ui_to_api(pack, ui)


# A tiny executor for API-format prompts: ComfyUI's order (dependencies first), its
# input validation, pack nodes for real, core nodes as in-memory stand-ins.

def _core_load_image(files, image):
    picture = files[image]
    rgb = _tensor(picture)
    if "A" in picture.getbands():
        mask = 1.0 - torch.from_numpy(np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0)
    else:
        mask = torch.zeros((64, 64), dtype=torch.float32)
    return (rgb, mask.unsqueeze(0))


def _core_load_image_mask(files, image, channel):
    picture = files[image].convert("RGBA")
    values = np.asarray(picture.getchannel("RGBA"["rgba".index(channel[0])]), dtype=np.float32) / 255.0
    mask = torch.from_numpy(values)
    return ((1.0 - mask) if channel == "alpha" else mask).unsqueeze(0),


def execute(pack, prompt, files, overrides=None):
    outputs, saved, done = {}, [], set()
    types_out = {}

    def run(node_id):
        if node_id in done:
            return
        node = prompt[node_id]
        kind = node["class_type"]
        inputs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                run(value[0])
                inputs[name] = outputs[value[0]][value[1]]
            else:
                inputs[name] = value
        inputs.update((overrides or {}).get(kind, {}))
        declared, returns, _ = _definition(pack, kind)
        declared = {n: (t, o) for n, t, _, o in declared}
        assert set(inputs) <= set(declared), (kind, set(inputs) - set(declared))
        for name, value in node["inputs"].items():
            t, options = declared[name]
            if isinstance(value, list):
                assert types_out[value[0]][value[1]] == t, (node_id, name)
            elif "choices" in options:
                assert value in options["choices"], (node_id, name, value)
            elif t in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], (node_id, name, value)
        if kind == "LoadImage":
            result = _core_load_image(files, **inputs)
        elif kind == "LoadImageMask":
            result = _core_load_image_mask(files, **inputs)
        elif kind in ("SaveImage", "PreviewImage"):
            saved.append((node_id, kind, inputs["images"]))
            result = ()
        else:
            cls = pack.NODE_CLASS_MAPPINGS[kind]
            required = set(cls.INPUT_TYPES()["required"])
            assert required <= set(inputs), (kind, required - set(inputs))
            result = getattr(cls(), cls.FUNCTION)(**inputs)
            assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
        outputs[node_id], types_out[node_id] = result, returns
        done.add(node_id)

    for node_id in prompt:
        run(node_id)
    return saved


def _files():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return {"example.png": A, "reference.png": B, "mask.png": mask.convert("RGB")}


@pytest.mark.parametrize("name", ["variation", "img2img", "inpaint", "controlnet"])
def test_api_workflow_runs_against_the_servers(comfy, pack, servers, name):
    prompt = json.loads((WORKFLOWS / f"qwen2vl_flux_{name}_api.json").read_text())
    overrides = {"Qwen2VLFluxServices": {"encoder": servers["encoder"].address,
                                         "generator": servers["generator"].address},
                 "Qwen2VLFluxGenerate": {"steps": 2},
                 "Qwen2VLFluxControlMaps": {"line_detector": "canny"}}   # Anyline's first load is slow
    if name == "variation":
        overrides["Qwen2VLFluxGenerate"].update(width=64, height=64)
    comfy.utils.updates.clear()
    saved = execute(pack, prompt, _files(), overrides)
    final = [images for _, kind, images in saved if kind == "SaveImage"]
    assert len(final) == 1
    count = next(v["inputs"]["image_count"] for v in prompt.values() if v["class_type"] == "Qwen2VLFluxGenerate")
    _assert_image(final[0], count, 64, 64)
    assert comfy.utils.updates and comfy.utils.updates[-1][0] == comfy.utils.updates[-1][1]
    if name == "controlnet":
        previews = [images for _, kind, images in saved if kind == "PreviewImage"]
        assert len(previews) == 2
        for images in previews:
            _assert_image(images, 1, 64, 64)


# ---------------------------------------------------------------------------- interrupt

class _FakeClient:
    """Stands in for a Client whose generate has the cancel hook: streams progress
    until cancel_event is set."""

    def __init__(self):
        self.cancelled = threading.Event()

    def generate(self, bundle, progress=None, cancel_event=None, **kwargs):
        for step in range(1, 1000):
            if cancel_event.wait(0.01):
                self.cancelled.set()
                raise RuntimeError("generator: CANCELLED")
            progress(types.SimpleNamespace(step=step, total=999))
        raise AssertionError("never cancelled")


def test_interrupt_sets_the_cancel_event_and_raises_comfyuis_exception(comfy, pack):
    nodes_module = sys.modules[pack.__name__ + ".nodes"]
    mm = comfy.model_management
    fake = _FakeClient()
    pbar = comfy.utils.ProgressBar(999)
    timer = threading.Timer(0.2, mm.interrupt_current_processing)
    timer.start()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes_module._generate_interruptible(fake, pbar, bundle=None)
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    assert fake.cancelled.wait(5)
    assert pbar.current >= 1


def _log_lines_since(path: Path, offset: int) -> list[dict]:
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def test_interrupt_stops_the_denoise_loop_on_the_server(comfy, nodes, services, servers):
    mm = comfy.model_management
    enc, gen = nodes["Qwen2VLFluxEncode"], nodes["Qwen2VLFluxGenerate"]
    image = _tensor(A.resize((256, 256)))
    bundle = enc.encode(services, image, mode="img2img", **ENC)[0]
    log_path = servers["generator"].log_path
    offset = log_path.stat().st_size

    def user_presses_cancel(value, total, preview, node_id=None):
        mm.throw_exception_if_processing_interrupted()      # what ComfyUI's hook does
        if value >= 2:
            mm.interrupt_current_processing(True)

    hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(user_presses_cancel)
    start = time.monotonic()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            gen.generate(services, bundle, "img2img", image=image, **dict(GEN, steps=200, strength=1.0))
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
        mm.interrupt_current_processing(False)
    assert time.monotonic() - start < 5

    # The generator logs why the Generate call ended: stopped early, or done.
    deadline, ended = time.monotonic() + 15, None
    while ended is None and time.monotonic() < deadline:
        for entry in _log_lines_since(log_path, offset):
            if entry.get("msg") in ("stopping generation", "rpc cancelled by client"):
                ended = entry["msg"]
                break
            if entry.get("msg") == "rpc done" and entry.get("rpc") == "Generate":
                ended = "finished all steps"
                break
        time.sleep(0.05)
    assert ended in ("stopping generation", "rpc cancelled by client"), ended
