"""`qwen2vl-flux`: generate through the two services, run the demo, make the tiny preset."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .api import Client, GenerationResult, ServiceError
from .errors import InvalidArgument
from .help_format import DefaultsHelpFormatter
from .modes import ASPECT_RATIOS, DEFAULTS, Focus, Mode

DEFAULT_TINY_DIR = Path.home() / ".cache" / "qwen2vl-flux" / "tiny"
# A held-out generated scene (training/scenes.py, HELD_OUT_SEED), never seen in training.
DEMO_INPUT = Path(__file__).parent / "assets" / "demo_input.png"


def demo_model_dir() -> Path:
    """The trained demo model shipped inside the package (checkpoints/demo), found without
    importing the package (and so without torch)."""
    spec = importlib.util.find_spec("qwen2vl_flux.checkpoints")
    return Path(next(iter(spec.submodule_search_locations))) / "demo"


ENCODER_ENV, GENERATOR_ENV = "QWEN2VL_FLUX_ENCODER", "QWEN2VL_FLUX_GENERATOR"
DEFAULT_ENCODER, DEFAULT_GENERATOR = "127.0.0.1:50051", "127.0.0.1:50052"


def default_addresses() -> tuple[str, str]:
    """Where `serve` listens and the other commands connect, unless told otherwise."""
    return os.environ.get(ENCODER_ENV, DEFAULT_ENCODER), os.environ.get(GENERATOR_ENV, DEFAULT_GENERATOR)


def _progress_bar(description: str):
    """The bar appears with the first step, so a call that fails earlier prints none."""
    bar = None

    def update(progress) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=progress.total, desc=description, unit="step", leave=False)
        bar.total = progress.total
        bar.n = progress.step
        bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()

    return close, update


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="", help="text for T5 (default: none)")
    p.add_argument("--seed", type=int, default=None, help="default: random, printed and stored in the PNG")
    p.add_argument("--steps", type=int, default=None, help=f"denoise steps (default: {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=None, help=f"default: {DEFAULTS['guidance']}")
    p.add_argument("--image-count", type=int, default=None, help=f"default: {DEFAULTS['image_count']}")
    p.add_argument("--aspect-ratio", default=None, choices=list(ASPECT_RATIOS),
                   help=f"variation (default: {DEFAULTS['aspect_ratio']}); sizes scale to the model's native size")
    p.add_argument("--width", type=int, default=None,
                   help="variation: explicit size, multiple of 16 (default: the model's native size)")
    p.add_argument("--height", type=int, default=None, help="with --width")
    p.add_argument("--center-x", type=float, default=None, help="focus circle (all three or none; default: none)")
    p.add_argument("--center-y", type=float, default=None, help="focus centre, 0..1")
    p.add_argument("--radius", type=float, default=None, help="focus radius, (0, 1]")
    p.add_argument("--out", default="out", help="directory for the images")
    p.add_argument("--format", default="png", choices=["png", "webp", "jpeg", "raw"], help="image format")


def _add_connection_args(p: argparse.ArgumentParser, generator: bool = True) -> None:
    env = os.environ.get
    encoder, generator_address = default_addresses()
    p.add_argument("--encoder", default=encoder,
                   help=f"host:port, several comma-separated, or dns:///name:port (env {ENCODER_ENV})")
    if generator:
        p.add_argument("--generator", default=generator_address,
                       help=f"likewise (env {GENERATOR_ENV})")
    p.add_argument("--token-file", default=env("QWEN2VL_FLUX_TOKEN_FILE"),
                   help="bearer token file (env QWEN2VL_FLUX_TOKEN_FILE, or the token in QWEN2VL_FLUX_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the servers' certificates")
    p.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each call, in seconds")


def _client(args) -> Client:
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("QWEN2VL_FLUX_TOKEN")
    return Client(encoder=args.encoder, generator=getattr(args, "generator", args.encoder), timeout=args.timeout,
                  token=token or None, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _write(result: GenerationResult, out: Path, stem: str, extra: tuple[str, ...] = ()) -> list[Path]:
    """The images as `OUT/STEM-SEED-INDEX.EXT`; where a file of that run's names (`extra` too)
    exists already, `STEM-SEED-rN-...` with the first N that overwrites nothing, so a run with the
    same seed but other parameters never replaces an earlier one."""
    out.mkdir(parents=True, exist_ok=True)
    extension = {"jpeg": "jpg", "raw": "rgb"}.get(result.format, result.format)
    names = [f"{i}.{extension}" for i in range(len(result.data))] + list(extra)
    base, run = f"{stem}-{result.seed}", 1
    while any((out / f"{base}-{name}").exists() for name in names):
        run += 1
        base = f"{stem}-{result.seed}-r{run}"
    paths = [out / f"{base}-{name}" for name in names]
    for path, data in zip(paths, result.data):
        path.write_bytes(data)  # as the generator made it, parameters and versions in its metadata
    return paths


def _control_map_args(values: list[str]) -> dict[str, str] | None:
    maps = {}
    for value in values or []:
        kind, sep, path = value.partition("=")
        if not sep or kind not in ("depth", "line"):
            raise InvalidArgument("control_map", f"--control-map takes depth=IMG or line=IMG, got {value!r}")
        maps[kind] = path
    return maps or None


def _generate(client: Client, args, description: str = "denoise") -> GenerationResult:
    mode = Mode.parse(getattr(args, "mode", Mode.VARIATION.value))
    params = {name: getattr(args, name, None) for name in (
        "seed", "steps", "guidance", "image_count", "aspect_ratio", "width", "height", "strength", "depth", "line",
        "depth_strength", "line_strength", "corrected_controlnet")}
    kwargs = dict(prompt=args.prompt, focus=Focus.from_parts(args.center_x, args.center_y, args.radius))
    if mode is not Mode.VARIATION:
        kwargs["reference"] = args.reference
    if mode.uses_mask:
        kwargs.update(mask=args.mask, mask_from_alpha=args.mask is None)
    if mode.uses_controlnet:
        kwargs.update(control_maps=_control_map_args(args.control_map), line_detector=args.line_detector)
    close, update = _progress_bar(description)
    try:
        return client.run(mode, args.input, progress=update, output_format=args.format, **kwargs,
                          **{k: v for k, v in params.items() if v is not None})
    finally:
        close()


def cmd_generate(args) -> int:
    with _client(args) as client:
        result = _generate(client, args)
    mode = Mode.parse(args.mode)
    stem = Path(args.input).stem if mode is Mode.VARIATION else f"{Path(args.input).stem}-{mode.value}"
    for path in _write(result, Path(args.out), stem):
        print(path)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"seed {result.seed}; the same again: {_again(args, result.seed)}", file=sys.stderr)
    return 0


def _again(args, seed: int) -> str:
    """The command line that was run, with its seed fixed: it paints the same image."""
    argv, kept, skip = list(args.argv), [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
        elif word == "--seed":
            skip = True
        elif not word.startswith("--seed="):
            kept.append(word)
    return shlex.join(["qwen2vl-flux", *kept, "--seed", str(seed)])


def cmd_control_maps(args) -> int:
    with _client(args) as client:
        kinds = args.kinds
        if kinds is None:   # what this encoder can make
            kinds = ["depth", "line"] if client.encoder_makes_depth() else ["line"]
            if kinds == ["line"]:
                print(f"note: the encoder at {args.encoder} has no depth model: the line map only", file=sys.stderr)
        result = client.control_maps(args.input, kinds=kinds, line_detector=args.line_detector,
                                     denoise_radius=args.denoise_radius)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind, image in result.maps.items():
        path = out / f"{Path(args.input).stem}-{kind}.png"
        image.save(path)
        print(f"{path}\t{result.detectors[kind]}")
    return 0


def cmd_convert_depth(args) -> int:
    from qwen2vl_flux.encoder_server.control_maps import convert_depth_anything

    print(convert_depth_anything(Path(args.pth), Path(args.out)))
    return 0


def cmd_make_tiny(args) -> int:
    try:
        from qwen2vl_flux.checkpoints.tiny import make_tiny_checkpoints
    except ImportError as e:
        raise SystemExit(f"making checkpoints needs the server extra: pip install 'qwen2vl-flux[server]' ({e})")
    print(make_tiny_checkpoints(args.dir))
    return 0


def side_by_side(inputs, outputs, min_height: int = 256):
    """Input(s) then output(s) in one row at the output size, enlarged by an integer factor
    (nearest neighbour, so pixels stay pixels) until at least `min_height` tall."""
    from PIL import Image

    width, height = outputs[0].size
    tiles = [im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS) for im in inputs]
    tiles += [im.convert("RGB") for im in outputs]
    row = Image.new("RGB", (width * len(tiles), height))
    for i, tile in enumerate(tiles):
        row.paste(tile, (i * width, 0))
    factor = max(1, -(-min_height // height))
    return row.resize((row.width * factor, height * factor), Image.Resampling.NEAREST)


def cmd_demo(args) -> int:
    from PIL import Image

    from .launch import serving_pair

    if args.random_tiny:
        checkpoints = Path(args.checkpoints or DEFAULT_TINY_DIR)
        if not (checkpoints / "flux").exists():
            print(f"making the random tiny preset in {checkpoints}", file=sys.stderr)
            cmd_make_tiny(argparse.Namespace(dir=checkpoints))
    else:
        checkpoints = Path(args.checkpoints) if args.checkpoints else demo_model_dir()
        if not (checkpoints / "flux").exists():
            raise SystemExit(f"no checkpoint at {checkpoints}: the trained demo model ships in the repository "
                             f"(checkpoints/demo); pass --checkpoints DIR, or --random-tiny for random weights")
    with Image.open(args.input) as picture:
        picture.load()
    # No size given: the model's own (the demo model declares 128, its training scenes' size).
    with serving_pair(checkpoints, lambda server: print(f"{server.role} serving on {server.address}",
                                                        file=sys.stderr)) as (encoder, generator):
        with Client(encoder=encoder.address, generator=generator.address, timeout=args.timeout) as client:
            result = _generate(client, args)
    *paths, pair = _write(result, Path(args.out), "demo", extra=("side-by-side.png",))
    for path in paths:
        print(path)
    side_by_side([picture], result.images).save(pair)
    print(pair)
    print(f"seed {result.seed}; the same picture again: {_again(args, result.seed)}", file=sys.stderr)
    return 0


def _listen_address(address: str, option: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in address or "," in address:
        raise InvalidArgument(option, f"{option} must be HOST:PORT to listen on, got {address!r}")
    return host.strip("[]"), int(port)


def cmd_serve(args) -> int:
    """Both servers in the foreground, logs on this terminal; Ctrl-C (or SIGTERM) stops both."""
    from .launch import ServerFailed, ServerProcess

    checkpoints = Path(args.checkpoints) if args.checkpoints else demo_model_dir()
    if not (checkpoints / "flux").exists():
        raise SystemExit(f"no checkpoint at {checkpoints}: pass --checkpoints DIR in the published layout")
    servers = []
    for role, address, option in (("encoder", args.encoder, "--encoder"), ("generator", args.generator,
                                                                         "--generator")):
        host, port = _listen_address(address, option)
        servers.append(ServerProcess(role, checkpoints, "--log-format", args.log_format, host=host, port=port,
                                     inherit_output=True))

    def interrupt(*_):
        raise KeyboardInterrupt

    # Set both: a shell's background job starts with SIGINT ignored.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_serving(timeout=args.start_timeout)
        encoder, generator = (server.address for server in servers)
        flags = "" if (encoder, generator) == (DEFAULT_ENCODER, DEFAULT_GENERATOR) else \
            f" --encoder {encoder} --generator {generator}"
        print(f"serving {checkpoints}: encoder on {encoder}, generator on {generator}; Ctrl-C stops both\n"
              f"try: qwen2vl-flux generate --input IMAGE{flags}", flush=True)   # stderr: the servers' logs
        while True:
            for server in servers:
                if server.process.poll() is not None:
                    print(f"{server.role} exited with code {server.process.returncode}; stopping",
                          file=sys.stderr)
                    return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    except ServerFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for server in servers:   # both drain at once
            if server.process is not None and server.process.poll() is None:
                server.process.terminate()
        for server in servers:
            server.stop()
            server.remove_files()   # its port file's; the logs went to this terminal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl-flux", description=__doc__, formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    command = functools.partial(sub.add_parser, formatter_class=DefaultsHelpFormatter)

    serve = command("serve", help="both servers in one command (the demo model by default, loopback); "
                                  "Ctrl-C stops both")
    serve.add_argument("--checkpoints", default=None,
                       help="default: the trained demo model in the package, " + str(demo_model_dir()))
    encoder, generator = default_addresses()
    serve.add_argument("--encoder", default=encoder,
                       help=f"HOST:PORT the encoder listens on (env {ENCODER_ENV})")
    serve.add_argument("--generator", default=generator,
                       help=f"HOST:PORT the generator listens on (env {GENERATOR_ENV})")
    serve.add_argument("--log-format", default="text", choices=["text", "json"], help="the servers' logs")
    serve.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for both to serve")
    serve.set_defaults(func=cmd_serve)

    gen = command("generate", help="encode an image and generate from it")
    gen.add_argument("--mode", default=Mode.VARIATION.value, choices=[m.value for m in Mode], help="what to do")
    gen.add_argument("--input", required=True, help="image a")
    gen.add_argument("--reference", default=None, help="image b (modes other than variation)")
    gen.add_argument("--mask", default=None,
                     help="inpaint modes: white = repaint (default: the input's alpha channel)")
    gen.add_argument("--strength", type=float, default=None, help=f"how much of image a is repainted, (0, 1] (default: {DEFAULTS['strength']})")
    gen.add_argument("--depth", action=argparse.BooleanOptionalAction, default=None,
                     help="ControlNet modes: use the depth map (with neither depth nor line, both are used)")
    gen.add_argument("--line", action=argparse.BooleanOptionalAction, default=None,
                     help="ControlNet modes: use the line map")
    gen.add_argument("--depth-strength", type=float, default=None, help=f"default: {DEFAULTS['depth_strength']}")
    gen.add_argument("--line-strength", type=float, default=None, help=f"default: {DEFAULTS['line_strength']}")
    gen.add_argument("--line-detector", default="auto", choices=["auto", "anyline", "canny"],
                     help="auto: Anyline when the checkpoint has its weights, else canny")
    gen.add_argument("--control-map", action="append", metavar="KIND=IMG",
                     help="a ready-made map (depth=IMG or line=IMG) instead of computing it")
    gen.add_argument("--corrected-controlnet", action="store_true", default=None,
                     help="ControlNet modes: the corrected behaviour instead of the reference's quirks")
    _add_connection_args(gen)
    _add_generation_args(gen)
    gen.set_defaults(func=cmd_generate)

    maps = command("control-maps", help="write the depth and line maps the ControlNet modes would use")
    maps.add_argument("--input", required=True, help="image a")
    maps.add_argument("--out", default="out", help="directory for the maps")
    maps.add_argument("--kinds", nargs="+", default=None, choices=["depth", "line"],
                      help="maps to make (default: depth and line, or line alone from an encoder without a depth model)")
    maps.add_argument("--line-detector", default="auto", choices=["auto", "anyline", "canny"],
                      help="auto: Anyline when the checkpoint has its weights, else canny")
    maps.add_argument("--denoise-radius", type=float, default=None, help="Gaussian blur of the maps, in pixels")
    _add_connection_args(maps, generator=False)
    maps.set_defaults(func=cmd_control_maps)

    convert = command("convert-depth-anything",
                             help="convert the original depth_anything_v2_vitl.pth to the Hugging Face format")
    convert.add_argument("pth")
    convert.add_argument("out")
    convert.set_defaults(func=cmd_convert_depth)

    tiny = command("make-tiny-checkpoints", help="write the tiny random-weight preset")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_make_tiny)

    demo = command("demo", help="the trained demo model end to end: both servers, one variation, "
                                       "the image and input|output side by side")
    demo.add_argument("--checkpoints", default=None,
                      help="default: the trained demo model in the package (with --random-tiny: "
                           f"the random tiny preset, made in {DEFAULT_TINY_DIR} if missing)")
    demo.add_argument("--random-tiny", action="store_true", help="random tiny weights instead (machinery only)")
    demo.add_argument("--input", default=str(DEMO_INPUT), help="default: a held-out generated scene")
    demo.add_argument("--timeout", type=float, default=600.0, help="deadline of each call, in seconds")
    _add_generation_args(demo)
    demo.set_defaults(func=cmd_demo)

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ServiceError, InvalidArgument, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
