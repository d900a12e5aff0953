"""A stricter multipart/form parser for the API, registered in place of BentoML's.

BentoML's own parser treats a *text* value in a file field as a URL and downloads it
(an SSRF surface, and a 500 for anything that is not a URL), runs json.loads on the bytes
of a file sent under an unknown field name (a 500 on any binary file), and lets a
malformed body escape as a 500. Here all of those are 400s with a reason, and the
service never fetches anything.
"""
from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic_core import PydanticCustomError, ValidationError
from starlette.datastructures import UploadFile

from covid_cxr.serve.bentoml_private import MultipartSerde, register_serde, serde_for

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _bad(kind: str, msg: str, field: str = "body") -> ValidationError:
    return ValidationError.from_exception_data(
        "Input", [{"type": PydanticCustomError(kind, msg), "loc": (field,), "input": ""}])


def _takes_list(ann: Any) -> bool:
    """`list[X]`, `Optional[list[X]]`, `list[X] | None` -> True."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = typing.get_args(ann)[0]
    origin = typing.get_origin(ann)
    return isinstance(origin, type) and issubclass(origin, list)


class FilesOnlyMultipartSerde(MultipartSerde):
    files_only = True

    async def parse_request(self, request: Any, cls: Any) -> Any:
        try:
            form = await request.form()
        except Exception as e:
            raise _bad("malformed_body", f"cannot parse the multipart/form body: {e}") from None
        data: dict[str, Any] = {}
        for k in form:
            values = form.getlist(k)
            if k in cls.multipart_fields:
                files = [v for v in values if isinstance(v, UploadFile)]
                if len(files) != len(values):
                    raise _bad("file_required", "send the image as a file part (multipart/form-data with a "
                               "filename), not as text; URLs are not fetched", k)
                data[k] = files if _takes_list(cls.model_fields[k].annotation) else files[0]
            elif k in cls.model_fields:
                v = values[0]
                if isinstance(v, UploadFile):
                    raise _bad("unexpected_file", f"field {k!r} takes a value, not a file", k)
                try:
                    data[k] = json.loads(v)
                except ValueError:
                    data[k] = v
            # any other field is ignored (a missing required one is reported by validation)
        return cls.model_validate(data)


def install() -> None:
    """Parse multipart/form and urlencoded request bodies with FilesOnlyMultipartSerde (idempotent)."""
    for media_type in FORM_TYPES:
        if not getattr(serde_for(media_type), "files_only", False):
            register_serde(media_type, FilesOnlyMultipartSerde)
