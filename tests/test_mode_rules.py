"""client/modes.py: the one home of the mode rules shared by client, servers and UIs."""
from __future__ import annotations

import pytest

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.modes import (Focus, Mode, control_maps_used, embedding_roles, focus_role,
                                       output_size, generation_size, resolve_parameters, transformer_role)


def test_defaults_follow_the_reference():
    params, ignored = resolve_parameters(Mode.CONTROLNET, {})
    assert params["steps"] == 28 and params["guidance"] == 3.5 and params["strength"] == 0.8
    assert params["line_strength"] == 0.4 and params["depth_strength"] == 0.2 and not ignored


def test_unused_parameters_are_accepted_and_reported():
    params, ignored = resolve_parameters(Mode.VARIATION, {"strength": 0.5, "depth": False, "steps": 3})
    assert ignored == ["depth", "strength"] and "strength" not in params and params["steps"] == 3
    _, ignored = resolve_parameters(Mode.IMG2IMG, {"aspect_ratio": "16:9"})
    assert ignored == ["aspect_ratio"]


@pytest.mark.parametrize("mode,given,name", [
    (Mode.IMG2IMG, {"strength": 0.0}, "strength"), (Mode.IMG2IMG, {"strength": 1.5}, "strength"),
    (Mode.VARIATION, {"steps": 0}, "steps"), (Mode.VARIATION, {"steps": 201}, "steps"),
    (Mode.VARIATION, {"guidance": -0.1}, "guidance"), (Mode.VARIATION, {"image_count": 0}, "image_count"),
    (Mode.VARIATION, {"image_count": 17}, "image_count"), (Mode.VARIATION, {"aspect_ratio": "5:4"}, "aspect_ratio"),
    (Mode.VARIATION, {"width": 64}, "height"), (Mode.VARIATION, {"unknown": 1}, "unknown"),
])
def test_bad_parameters_name_themselves(mode, given, name):
    with pytest.raises(InvalidArgument) as error:
        resolve_parameters(mode, given)
    assert error.value.parameter == name and name in str(error.value)


def test_focus_is_all_or_none_and_in_range():
    assert Focus.from_parts(None, None, None) is None
    with pytest.raises(InvalidArgument, match="radius"):
        Focus.from_parts(0.5, 0.5, None)
    with pytest.raises(InvalidArgument, match="center_x"):
        Focus(1.5, 0.5, 0.2)
    with pytest.raises(InvalidArgument, match="radius must be > 0"):
        Focus(0.5, 0.5, 0.0)
    with pytest.raises(InvalidArgument):
        Mode.parse("outpaint")


def test_which_image_gets_what():
    assert focus_role(Mode.VARIATION) == "a" and focus_role(Mode.INPAINT) == "b"
    assert embedding_roles(Mode.IMG2IMG, True) == ["b"] and embedding_roles(Mode.IMG2IMG, False) == ["a"]
    assert embedding_roles(Mode.CONTROLNET, True) == ["a", "b"]
    assert transformer_role(Mode.CONTROLNET, {"a", "b"}) == "b" and transformer_role(Mode.VARIATION, {"a"}) == "a"


def test_control_maps_follow_the_reference_order_and_fallback():
    base, _ = resolve_parameters(Mode.CONTROLNET, {"depth_strength": 0.7})
    assert control_maps_used(base) == [("depth", 2, 0.7), ("line", 0, 0.4)]
    neither, ignored = resolve_parameters(Mode.CONTROLNET, {"depth": False, "line": False, "line_strength": 0.9})
    assert control_maps_used(neither) == [("depth", 2, 0.2), ("line", 0, 0.4)] and ignored == ["line_strength"]
    line_only, _ = resolve_parameters(Mode.CONTROLNET, {"depth": False})
    assert control_maps_used(line_only) == [("line", 0, 0.4)]


def test_sizes():
    assert generation_size(1000, 667) == (1000, 664) and output_size(1000, 664) == (992, 656)


def test_sizes_follow_a_declared_native_size():
    from qwen2vl_flux.client.modes import ASPECT_RATIOS, aspect_ratio_size, variation_size

    assert all(aspect_ratio_size(r) == size == aspect_ratio_size(r, 1024) for r, size in ASPECT_RATIOS.items())
    assert aspect_ratio_size("1:1", 128) == (128, 128) and aspect_ratio_size("16:9", 128) == (160, 96)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in (aspect_ratio_size(r, 128) for r in ASPECT_RATIOS))
    assert variation_size({"aspect_ratio": "1:1"}, 128) == (128, 128)
    assert variation_size({"aspect_ratio": "1:1", "width": 64, "height": 32}, 128) == (64, 32)
    assert generation_size(512, 384, 128) == (144, 104) and generation_size(100, 80, 128) == (96, 80)
    assert generation_size(1000, 667) == generation_size(1000, 667, None) == (1000, 664)


def test_mask_rule():
    from PIL import Image

    from qwen2vl_flux.client.images import fit_mask

    # image a's shape (up to rounding): resized to image a, then image a's resize rule (floor to 8)
    assert fit_mask(Image.new("L", (200, 100)), (100, 50)).size == (96, 48)
    assert fit_mask(Image.new("L", (201, 100)), (100, 50)).size == (96, 48)
    assert fit_mask(Image.new("L", (100, 50)), (100, 50), native_size=32).size == (40, 16)
    with pytest.raises(InvalidArgument, match="mask is 100x60 but image a is 100x50"):
        fit_mask(Image.new("L", (100, 60)), (100, 50))
