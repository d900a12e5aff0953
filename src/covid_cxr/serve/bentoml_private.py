"""Every BentoML internal the service relies on, in one place, for exactly BentoML 1.4.40.

BentoML documents no hook to replace the parser of multipart/form request bodies, so the
service swaps its own in (multipart.py) through the serde table of `_bentoml_impl`. Nothing
else in covid_cxr may import `_bentoml_impl`, `_bentoml_sdk` or `bentoml._internal`;
tests/service/test_bentoml_private.py fails when an upgrade changes what is used here.

Importing this module on another BentoML version is an error: read what changed in the
names below, adapt, re-run that test, then update TESTED_BENTOML.
"""
from __future__ import annotations

import bentoml

TESTED_BENTOML = "1.4.40"

if bentoml.__version__ != TESTED_BENTOML:
    raise RuntimeError(
        f"covid_cxr.serve relies on BentoML internals tested with bentoml=={TESTED_BENTOML} only "
        f"(covid_cxr/serve/bentoml_private.py), but bentoml=={bentoml.__version__} is installed: "
        f"install bentoml=={TESTED_BENTOML} (bentofile.yaml, pyproject.toml), or check those internals "
        "and update TESTED_BENTOML"
    )

from _bentoml_impl import serde as _serde  # noqa: E402

# The base class of BentoML's multipart/form parser; `parse_request(request, cls)` gets the
# API's input model `cls`, whose `multipart_fields` lists the fields that take files.
MultipartSerde = _serde.MultipartSerde


def serde_for(media_type: str) -> type:
    """The parser BentoML uses for request bodies of this media type."""
    return _serde.ALL_SERDE[media_type]


def register_serde(media_type: str, cls: type) -> None:
    """Parse request bodies of `media_type` with `cls` (a MultipartSerde subclass) from now on."""
    _serde.ALL_SERDE[media_type] = cls  # type: ignore[index]
