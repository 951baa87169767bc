"""The Avro codec registered with Faust as ``kefu-avro``, for topics that send records."""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs

from schemas.codec import CODEC
from schemas.records import Record

CODEC_NAME = "kefu-avro"


class FaustAvroCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        if isinstance(obj, bytes):
            return obj  # already encoded (relayed dead letters, replays)
        if not isinstance(obj, Record):
            raise TypeError(f"kefu-avro encodes kefu records, not {type(obj).__name__}")
        return CODEC.encode(obj)

    def _loads(self, s: bytes) -> Any:
        return CODEC.decode(s)


def register() -> None:
    codecs.register(CODEC_NAME, FaustAvroCodec())
