from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class ControlKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_KIND_UNSPECIFIED: _ClassVar[ControlKind]
    DEPTH: _ClassVar[ControlKind]
    LINE: _ClassVar[ControlKind]

class LineDetector(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINE_DETECTOR_UNSPECIFIED: _ClassVar[LineDetector]
    AUTO: _ClassVar[LineDetector]
    ANYLINE: _ClassVar[LineDetector]
    CANNY: _ClassVar[LineDetector]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    VARIATION: _ClassVar[Mode]
    IMG2IMG: _ClassVar[Mode]
    INPAINT: _ClassVar[Mode]
    CONTROLNET: _ClassVar[Mode]
    CONTROLNET_INPAINT: _ClassVar[Mode]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    PNG: _ClassVar[ImageFormat]
    WEBP: _ClassVar[ImageFormat]
    JPEG: _ClassVar[ImageFormat]
    RAW_RGB8: _ClassVar[ImageFormat]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
UINT8: DType
BOOL: DType
CONTROL_KIND_UNSPECIFIED: ControlKind
DEPTH: ControlKind
LINE: ControlKind
LINE_DETECTOR_UNSPECIFIED: LineDetector
AUTO: LineDetector
ANYLINE: LineDetector
CANNY: LineDetector
MODE_UNSPECIFIED: Mode
VARIATION: Mode
IMG2IMG: Mode
INPAINT: Mode
CONTROLNET: Mode
CONTROLNET_INPAINT: Mode
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
PNG: ImageFormat
WEBP: ImageFormat
JPEG: ImageFormat
RAW_RGB8: ImageFormat

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PaddedTensor(_message.Message):
    __slots__ = ("tensor", "valid_length")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    VALID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    valid_length: int
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., valid_length: _Optional[int] = ...) -> None: ...

class Focus(_message.Message):
    __slots__ = ("center_x", "center_y", "radius")
    CENTER_X_FIELD_NUMBER: _ClassVar[int]
    CENTER_Y_FIELD_NUMBER: _ClassVar[int]
    RADIUS_FIELD_NUMBER: _ClassVar[int]
    center_x: float
    center_y: float
    radius: float
    def __init__(self, center_x: _Optional[float] = ..., center_y: _Optional[float] = ..., radius: _Optional[float] = ...) -> None: ...

class ImageData(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class EncoderImage(_message.Message):
    __slots__ = ("image", "focus", "role")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FOCUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    image: ImageData
    focus: Focus
    role: str
    def __init__(self, image: _Optional[_Union[ImageData, _Mapping]] = ..., focus: _Optional[_Union[Focus, _Mapping]] = ..., role: _Optional[str] = ...) -> None: ...

class ModelFingerprint(_message.Message):
    __slots__ = ("family", "checkpoint_id", "qwen_hidden_size", "joint_attention_dim", "inner_dim", "pooled_dim", "t5_max_length")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    QWEN_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    JOINT_ATTENTION_DIM_FIELD_NUMBER: _ClassVar[int]
    INNER_DIM_FIELD_NUMBER: _ClassVar[int]
    POOLED_DIM_FIELD_NUMBER: _ClassVar[int]
    T5_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    family: str
    checkpoint_id: str
    qwen_hidden_size: int
    joint_attention_dim: int
    inner_dim: int
    pooled_dim: int
    t5_max_length: int
    def __init__(self, family: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., qwen_hidden_size: _Optional[int] = ..., joint_attention_dim: _Optional[int] = ..., inner_dim: _Optional[int] = ..., pooled_dim: _Optional[int] = ..., t5_max_length: _Optional[int] = ...) -> None: ...

class Versions(_message.Message):
    __slots__ = ("package", "api", "torch", "transformers", "diffusers", "grpc", "protobuf")
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    TORCH_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMERS_FIELD_NUMBER: _ClassVar[int]
    DIFFUSERS_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    PROTOBUF_FIELD_NUMBER: _ClassVar[int]
    package: str
    api: str
    torch: str
    transformers: str
    diffusers: str
    grpc: str
    protobuf: str
    def __init__(self, package: _Optional[str] = ..., api: _Optional[str] = ..., torch: _Optional[str] = ..., transformers: _Optional[str] = ..., diffusers: _Optional[str] = ..., grpc: _Optional[str] = ..., protobuf: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_image_pixels", "max_image_count", "max_steps", "max_queue", "max_prompt_bytes", "max_request_id_length", "max_output_pixels", "max_pixel_steps", "max_control_maps", "max_guidance", "min_image_side", "max_image_side", "image_formats")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXEL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTROL_MAPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_image_pixels: int
    max_image_count: int
    max_steps: int
    max_queue: int
    max_prompt_bytes: int
    max_request_id_length: int
    max_output_pixels: int
    max_pixel_steps: int
    max_control_maps: int
    max_guidance: float
    min_image_side: int
    max_image_side: int
    image_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_image_count: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ..., max_request_id_length: _Optional[int] = ..., max_output_pixels: _Optional[int] = ..., max_pixel_steps: _Optional[int] = ..., max_control_maps: _Optional[int] = ..., max_guidance: _Optional[float] = ..., min_image_side: _Optional[int] = ..., max_image_side: _Optional[int] = ..., image_formats: _Optional[_Iterable[str]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("role", "fingerprint", "dtype", "device", "limits", "versions", "components", "modes", "checkpoints", "line_detectors", "native_size", "depth_available", "startup")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    LINE_DETECTORS_FIELD_NUMBER: _ClassVar[int]
    NATIVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    STARTUP_FIELD_NUMBER: _ClassVar[int]
    role: str
    fingerprint: ModelFingerprint
    dtype: str
    device: str
    limits: Limits
    versions: Versions
    components: _containers.RepeatedScalarFieldContainer[str]
    modes: _containers.RepeatedScalarFieldContainer[str]
    checkpoints: str
    line_detectors: _containers.RepeatedScalarFieldContainer[str]
    native_size: int
    depth_available: bool
    startup: Startup
    def __init__(self, role: _Optional[str] = ..., fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., components: _Optional[_Iterable[str]] = ..., modes: _Optional[_Iterable[str]] = ..., checkpoints: _Optional[str] = ..., line_detectors: _Optional[_Iterable[str]] = ..., native_size: _Optional[int] = ..., depth_available: bool = ..., startup: _Optional[_Union[Startup, _Mapping]] = ...) -> None: ...

class Startup(_message.Message):
    __slots__ = ("compile_cache", "compile_cache_detail", "phase_seconds", "compiled", "turbo", "step_cache", "cuda_graphs")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COMPILE_CACHE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_CACHE_DETAIL_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    TURBO_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    compile_cache: str
    compile_cache_detail: str
    phase_seconds: _containers.ScalarMap[str, float]
    compiled: bool
    turbo: bool
    step_cache: str
    cuda_graphs: int
    def __init__(self, compile_cache: _Optional[str] = ..., compile_cache_detail: _Optional[str] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., compiled: bool = ..., turbo: bool = ..., step_cache: _Optional[str] = ..., cuda_graphs: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "images", "prompt", "pixel_budget", "pad_to")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PIXEL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PAD_TO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[EncoderImage]
    prompt: str
    pixel_budget: int
    pad_to: int
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[EncoderImage, _Mapping]]] = ..., prompt: _Optional[str] = ..., pixel_budget: _Optional[int] = ..., pad_to: _Optional[int] = ...) -> None: ...

class ImageEmbedding(_message.Message):
    __slots__ = ("role", "tokens", "grid_t", "grid_h", "grid_w", "focus", "pixel_budget")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_T_FIELD_NUMBER: _ClassVar[int]
    GRID_H_FIELD_NUMBER: _ClassVar[int]
    GRID_W_FIELD_NUMBER: _ClassVar[int]
    FOCUS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    role: str
    tokens: PaddedTensor
    grid_t: int
    grid_h: int
    grid_w: int
    focus: Focus
    pixel_budget: int
    def __init__(self, role: _Optional[str] = ..., tokens: _Optional[_Union[PaddedTensor, _Mapping]] = ..., grid_t: _Optional[int] = ..., grid_h: _Optional[int] = ..., grid_w: _Optional[int] = ..., focus: _Optional[_Union[Focus, _Mapping]] = ..., pixel_budget: _Optional[int] = ...) -> None: ...

class EmbeddingBundle(_message.Message):
    __slots__ = ("fingerprint", "images", "prompt", "pooled", "dtype")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    fingerprint: ModelFingerprint
    images: _containers.RepeatedCompositeFieldContainer[ImageEmbedding]
    prompt: PaddedTensor
    pooled: Tensor
    dtype: str
    def __init__(self, fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageEmbedding, _Mapping]]] = ..., prompt: _Optional[_Union[PaddedTensor, _Mapping]] = ..., pooled: _Optional[_Union[Tensor, _Mapping]] = ..., dtype: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("request_id", "bundle", "encode_seconds", "cache_hit")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bundle: EmbeddingBundle
    encode_seconds: float
    cache_hit: bool
    def __init__(self, request_id: _Optional[str] = ..., bundle: _Optional[_Union[EmbeddingBundle, _Mapping]] = ..., encode_seconds: _Optional[float] = ..., cache_hit: bool = ...) -> None: ...

class ControlMap(_message.Message):
    __slots__ = ("kind", "image", "detector")
    KIND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    kind: ControlKind
    image: ImageData
    detector: str
    def __init__(self, kind: _Optional[_Union[ControlKind, str]] = ..., image: _Optional[_Union[ImageData, _Mapping]] = ..., detector: _Optional[str] = ...) -> None: ...

class ControlMapsRequest(_message.Message):
    __slots__ = ("request_id", "image", "kinds", "line_detector", "denoise_radius", "resize_like_generator")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    LINE_DETECTOR_FIELD_NUMBER: _ClassVar[int]
    DENOISE_RADIUS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_LIKE_GENERATOR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: ImageData
    kinds: _containers.RepeatedScalarFieldContainer[ControlKind]
    line_detector: LineDetector
    denoise_radius: float
    resize_like_generator: bool
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[_Union[ImageData, _Mapping]] = ..., kinds: _Optional[_Iterable[_Union[ControlKind, str]]] = ..., line_detector: _Optional[_Union[LineDetector, str]] = ..., denoise_radius: _Optional[float] = ..., resize_like_generator: bool = ...) -> None: ...

class ControlMapsResponse(_message.Message):
    __slots__ = ("request_id", "maps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    maps: _containers.RepeatedCompositeFieldContainer[ControlMap]
    def __init__(self, request_id: _Optional[str] = ..., maps: _Optional[_Iterable[_Union[ControlMap, _Mapping]]] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("seed", "steps", "guidance", "strength", "image_count", "aspect_ratio", "width", "height", "depth", "line", "depth_strength", "line_strength", "corrected_controlnet")
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    LINE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    seed: int
    steps: int
    guidance: float
    strength: float
    image_count: int
    aspect_ratio: str
    width: int
    height: int
    depth: bool
    line: bool
    depth_strength: float
    line_strength: float
    corrected_controlnet: bool
    def __init__(self, seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., strength: _Optional[float] = ..., image_count: _Optional[int] = ..., aspect_ratio: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., depth: bool = ..., line: bool = ..., depth_strength: _Optional[float] = ..., line_strength: _Optional[float] = ..., corrected_controlnet: bool = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("format", "png_compress_level", "quality", "preview_every")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PNG_COMPRESS_LEVEL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    png_compress_level: int
    quality: int
    preview_every: int
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., png_compress_level: _Optional[int] = ..., quality: _Optional[int] = ..., preview_every: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "mode", "bundle", "params", "init_image", "mask", "control_maps", "output", "mask_from_alpha")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MAPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MASK_FROM_ALPHA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: Mode
    bundle: EmbeddingBundle
    params: GenerationParams
    init_image: ImageData
    mask: ImageData
    control_maps: _containers.RepeatedCompositeFieldContainer[ControlMap]
    output: OutputOptions
    mask_from_alpha: bool
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., bundle: _Optional[_Union[EmbeddingBundle, _Mapping]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., init_image: _Optional[_Union[ImageData, _Mapping]] = ..., mask: _Optional[_Union[ImageData, _Mapping]] = ..., control_maps: _Optional[_Iterable[_Union[ControlMap, _Mapping]]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., mask_from_alpha: bool = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "elapsed_seconds", "preview", "stage", "queue_position")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    elapsed_seconds: float
    preview: ImageData
    stage: str
    queue_position: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., preview: _Optional[_Union[ImageData, _Mapping]] = ..., stage: _Optional[str] = ..., queue_position: _Optional[int] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "format", "data", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    format: ImageFormat
    data: bytes
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "prepare_seconds", "denoise_seconds", "decode_seconds", "image_encode_seconds", "total_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    prepare_seconds: float
    denoise_seconds: float
    decode_seconds: float
    image_encode_seconds: float
    total_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., prepare_seconds: _Optional[float] = ..., denoise_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., image_encode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class GenerationSummary(_message.Message):
    __slots__ = ("request_id", "mode", "effective", "ignored_parameters", "timings", "width", "height")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    IGNORED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: Mode
    effective: GenerationParams
    ignored_parameters: _containers.RepeatedScalarFieldContainer[str]
    timings: Timings
    width: int
    height: int
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., effective: _Optional[_Union[GenerationParams, _Mapping]] = ..., ignored_parameters: _Optional[_Iterable[str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "image", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    image: GeneratedImage
    summary: GenerationSummary
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ..., summary: _Optional[_Union[GenerationSummary, _Mapping]] = ...) -> None: ...
