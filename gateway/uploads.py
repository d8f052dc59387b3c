"""Reading a multipart body with its size limit enforced while it arrives (never
buffering more than the limit), before any image is decoded."""
from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .errors import APIError
from .images_api import Form

MAX_FILES = 3          # image (or two image[]) and mask
MAX_FIELDS = 64


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this gateway's limit of {limit} bytes "
                         "(--max-upload-bytes); send smaller images", param="image", code="upload_too_large")


async def read_form(request: Request, max_bytes: int) -> Form:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, f"send multipart/form-data (an image file and form fields), got "
                            f"{content_type or 'no content type'!r}", code="invalid_content_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)

    async def limited():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=MAX_FILES, max_fields=MAX_FIELDS,
                             max_part_size=1024 * 1024)
    try:
        items = await parser.parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed multipart body: {e.message}", code="invalid_multipart") from None
    form = Form()
    for name, value in items.multi_items():
        if isinstance(value, UploadFile):
            form.files.setdefault(name, []).append(await value.read())
            await value.close()
        else:
            form.fields[name] = value
    return form
