"""The one strict msgpack reader for bytes a peer sent (wire messages, stream headers,
handshake flights).

Every string, binary, array and map is capped by the caller, so a forged length header
cannot make the reader allocate; ext types are refused; map keys must be str; trailing
bytes are an error; nesting is bounded by msgpack's own stack (1024 levels). Any failure
comes out as the caller's ``ProtocolError`` subclass, naming ``what`` was being read.
``msgpack.unpackb`` keeps no state between calls and reads the input without copying it.
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgpack

from fedloom.transport.errors import ProtocolError


def unpack_strict(
    data: bytes | bytearray | memoryview,
    *,
    what: str,
    error: type[ProtocolError],
    max_str: int,
    max_bin: int,
    max_array: int,
    max_map: int,
    use_list: bool = True,
) -> Any:
    """Decode ``data`` under the caps; raise ``error`` (naming ``what``) for anything else."""

    def reject_ext(code: int, _data: bytes) -> NoReturn:
        raise error(f"{what}: msgpack ext type {code} is not allowed")

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=use_list,
            strict_map_key=True,
            ext_hook=reject_ext,
            max_str_len=max_str,
            max_bin_len=max_bin,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise error(f"{what}: trailing bytes after it") from None
    except msgpack.StackError:
        raise error(f"{what}: garbled msgpack (nesting deeper than 1024 levels)") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise error(f"{what}: garbled msgpack ({exc})") from None
