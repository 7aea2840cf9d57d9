"""nftables transactions through libnftables in-process: the one nft path.

A ``nft`` process costs 6-20 ms to start on this machine; the library
answers a small request in about a tenth of a millisecond and parses and
applies a transaction of thousands of elements in one call (an ``nft -f``
script is one transaction: all of it applies, or nothing). Each context is
created with the calling thread inside the host's namespace, so its netlink
socket stays there; a namespace deleted and made again under its name gets a
new context.

One lock serializes every call into the library, whatever the context: it
keeps process-wide state that is not guarded (nftables 1.0.x, Debian 12's
1.0.6: the interface cache that every ``nft_run_cmd_from_buffer`` releases
at its end, and the one-time set-up in ``nft_ctx_new``), so two contexts used
at once by two threads (two hosts' namespaces in one agent, or one
namespace's text and JSON contexts) could free what the other reads. A
call takes about 0.1 ms, so waiting for one costs little. (CI met a
segmentation fault once in the etcd evacuation benchmark, whose NVEs call
the library from several threads; it did not recur in 18 runs here, so the
cause is not proven, but this is the one unguarded shared state in reach.)

Without the library nothing falls back to a slower path silently: the
first call raises :class:`NftUnavailable` saying what to install.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, ClassVar

from vmm_kernel.netns import CommandFailed, entered, namespace_inode
from vmm_orchestrator.errors import VmmError

LIBRARY = "libnftables.so.1"
OUTPUT_JSON = 1 << 4


class NftUnavailable(VmmError):
    """libnftables cannot be loaded (or gives no context) on this host."""


class NftError(CommandFailed):
    """nft refused a transaction; nothing of it was applied."""


class Nft:
    """libnftables contexts, one per (namespace, output format); thread-safe."""

    _lib: ClassVar[Any] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    #: Held for every call into the library (see the module docstring).
    _calls: ClassVar[threading.Lock] = threading.Lock()
    _contexts: ClassVar[dict[tuple[str | None, int, bool], int]] = {}

    @classmethod
    def library(cls) -> Any:
        """The loaded library; NftUnavailable naming the package when missing."""
        with cls._lock:
            if cls._lib is None:
                try:
                    lib = ctypes.CDLL(LIBRARY)
                except OSError as exc:
                    raise NftUnavailable(
                        f"cannot load {LIBRARY}: {exc}",
                        hint="install Debian's nftables package (libnftables1)",
                    ) from None
                lib.nft_ctx_new.restype = ctypes.c_void_p
                lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
                lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
                lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
                lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
                lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
                lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
                lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
                lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
                lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
                cls._lib = lib
            return cls._lib

    @classmethod
    def _context(cls, netns: str | None, json_output: bool) -> int:
        lib = cls.library()
        key = (netns, namespace_inode(netns), json_output)
        with cls._lock:
            found = cls._contexts.get(key)
            if found is None:
                with cls._calls:
                    with entered(netns):
                        ctx = lib.nft_ctx_new(0)
                    if not ctx:
                        raise NftUnavailable(
                            f"libnftables gave no context in namespace {netns or '(host)'}",
                            hint="check that the nf_tables kernel module is available",
                        )
                    lib.nft_ctx_buffer_output(ctx)
                    lib.nft_ctx_buffer_error(ctx)
                    if json_output:
                        lib.nft_ctx_output_set_flags(ctx, OUTPUT_JSON)
                found = cls._contexts[key] = ctx
        return found

    @classmethod
    def run(cls, netns: str | None, text: str, json_output: bool = False) -> str:
        """Run ``text`` (nft syntax, one transaction) in ``netns``; its output.
        NftError when nft refused it (nothing applied)."""
        lib = cls.library()
        ctx = cls._context(netns, json_output)
        with cls._calls, entered(netns):
            rc = lib.nft_run_cmd_from_buffer(ctx, text.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        if rc != 0:
            where = netns or "(host)"
            raise NftError(["nft", "-f", "-", f"(namespace {where})"], err or f"answered {rc}")
        return out


def nft(netns: str | None, text: str, json_output: bool = False) -> str:
    """Shorthand for :meth:`Nft.run`."""
    return Nft.run(netns, text, json_output)
