"""Open a checkpoint: a Hugging Face folder (``config.json`` + safetensors), a GGUF file, a
Hugging Face model id from the local cache, or (``None``) the embedded default model.

Whatever the format, a :class:`Checkpoint` hands out tensors one at a time in Hugging Face naming
and layout, so the decoder has a single loading path and never holds two copies of the weights:
safetensors shards are memory-mapped, GGUF tensors are dequantized on demand. Weights are read
through safetensors or gguf only; pickle files (``*.bin``, ``*.pt``) are refused, since loading
one can run arbitrary code.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from teal.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    NetworkError,
    TealError,
    UnsupportedModelError,
)
from teal.model.config import ModelConfig, llama3_inv_freq_scale

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Checkpoint", "Q4Blocks", "expected_shapes", "open_checkpoint", "unpermute_rope"]


class _TensorReader(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get_tensor(self, name: str) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass
class Checkpoint:
    """An opened checkpoint. Tensors come in Hugging Face naming and layout (a projection
    ``weight`` is ``[out, in]``), in the stored dtype for safetensors and fp32 for GGUF."""

    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase | None  # fast tokenizer; chat template when there is one
    source: str  # what the user gave, resolved: absolute path or Hugging Face model id
    kind: str  # "hf" | "gguf"
    _reader: _TensorReader = field(repr=False)

    def names(self) -> list[str]:
        return self._reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        return self._reader.shape(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._reader.get_tensor(name)

    def q4_blocks(self, name: str) -> Q4Blocks | None:
        """A GGUF tensor stored as Q4_0 or Q4_1, as its own 4-bit codes and block scales
        (rows un-permuted like :meth:`get_tensor`'s); None for any other storage."""
        q4 = getattr(self._reader, "q4_blocks", None)
        return None if q4 is None else q4(name)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(source: str | os.PathLike | None = None) -> Checkpoint:
    """Open ``source``: None (the default model), a folder, a ``.gguf`` file or ``org/name``."""
    if source is None:
        from teal.data.default_model import default_model_path

        return _open_gguf(default_model_path())
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _open_hf_folder(path.absolute(), str(path.absolute()))
    if path.is_file():
        return _open_file(path.absolute())
    if isinstance(source, str) and _HUB_ID.fullmatch(text):
        return _open_hub_id(text)
    raise ModelNotFoundError(
        f"no such file or folder: {text}. Give a Hugging Face checkpoint folder (config.json + "
        "*.safetensors), a .gguf file, a Hugging Face model id (org/name) found in the local "
        "cache, or nothing for the default model"
    )


# ------------------------------------------------------------------ shared checks

# org/name on the Hub: letters, digits, "-", "_", "."; neither part starts with "." or "-".
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder reads, with its Hugging Face shape."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.dim),
        "model.norm.weight": (c.dim,),
    }
    if not c.tie_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (c.dim,)
        out[p + "post_attention_layernorm.weight"] = (c.dim,)
        out[p + "self_attn.q_proj.weight"] = (q, c.dim)
        out[p + "self_attn.k_proj.weight"] = (kv, c.dim)
        out[p + "self_attn.v_proj.weight"] = (kv, c.dim)
        out[p + "self_attn.o_proj.weight"] = (c.dim, q)
        if c.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "mlp.gate_proj.weight"] = (c.ffn_dim, c.dim)
        out[p + "mlp.up_proj.weight"] = (c.ffn_dim, c.dim)
        out[p + "mlp.down_proj.weight"] = (c.dim, c.ffn_dim)
    return out


def _check_tensors(ckpt: Checkpoint, where: str) -> None:
    """Fail at open, with one clear message, when weights and config disagree (a missing shard,
    a config.json from another model), instead of half-way through building the model."""
    have = set(ckpt.names())
    missing, wrong = [], []
    for name, shape in expected_shapes(ckpt.config).items():
        if name not in have:
            missing.append(name)
        elif ckpt.shape(name) != shape:
            wrong.append(f"{name} is {list(ckpt.shape(name))}, expected {list(shape)}")
    if missing:
        listed = ", ".join(missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        )
        raise CorruptCheckpointError(
            f"{where} lacks {len(missing)} tensor(s) the model needs: {listed}. The weights are "
            "incomplete or belong to another model than the config describes"
        )
    if wrong:
        raise CorruptCheckpointError(
            f"{where}: tensor shapes do not match the config ({'; '.join(wrong[:3])}): the "
            "weights and the config do not belong together"
        )


def _finish(
    config: ModelConfig,
    reader: _TensorReader,
    source: str,
    kind: str,
    where: str,
    tokenizer: Callable[[], PreTrainedTokenizerBase | None],
) -> Checkpoint:
    ckpt = Checkpoint(config=config, tokenizer=None, source=source, kind=kind, _reader=reader)
    try:
        _check_tensors(ckpt, where)
        ckpt.tokenizer = tokenizer()
    except BaseException:
        reader.close()
        raise
    return ckpt


def _config_from_hf_dict(cfg: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(cfg)
    except TealError:
        raise
    except KeyError as e:
        raise CorruptCheckpointError(f"{where} lacks the field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where} has an invalid value: {e}") from e


# ------------------------------------------------------------------ Hugging Face folders


class _SafetensorsReader:
    """Tensors spread over safetensors files, read one at a time.

    Each ``get_tensor`` maps the shard (``safe_open``), copies the one tensor out and unmaps it
    again. Keeping the shards mapped for the whole load would leave every page read so far
    resident in the process (file-backed, but counted in its memory) on top of the model being
    filled, about twice the weights at the end; per-tensor mapping holds the model plus one
    tensor. Opening costs a header parse, well under a millisecond."""

    def __init__(self, where: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> None:
        self._where = where
        self._shapes = shapes

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"no tensor {name!r} in this checkpoint")
        with _safe_open(self._where[name]) as f:
            return f.get_tensor(name)

    def close(self) -> None:
        pass  # nothing stays open between calls


def _safe_open(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open checks the header against the file: offsets that overlap, leave gaps or
        # run past the end, and shapes that do not match their byte ranges are all refused.
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpointError(
            f"{path} is not a valid safetensors file ({e}): it is truncated or damaged; "
            "download or convert it again"
        ) from e


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONVERT_HINT = (
    "pickle checkpoints are not loaded (unpickling can run arbitrary code): convert the folder "
    "to safetensors once, e.g. with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
    ".save_pretrained(NEW_DIR) (safetensors is its default format)"
)


def _open_hf_folder(folder: Path, source: str) -> Checkpoint:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = (
            f" It holds GGUF file(s) ({', '.join(ggufs[:3])}): pass the .gguf file itself."
            if ggufs
            else " Give a Hugging Face checkpoint folder (config.json, *.safetensors, "
            "tokenizer.json) or a .gguf file."
        )
        raise CorruptCheckpointError(f"folder {folder} has no config.json.{hint}")
    cfg = _read_json(cfg_path)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        # Chat models list their end-of-turn ids here (Llama 3: <|eot_id|>); generation must
        # stop at any of them, as transformers' generate does.
        eos: list[int] = []
        for value in (cfg.get("eos_token_id"), _read_json(gen_path).get("eos_token_id")):
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in eos:
                    eos.append(i)
        if eos:
            cfg = {**cfg, "eos_token_id": eos}
    config = _config_from_hf_dict(cfg, str(cfg_path))
    reader = _safetensors_reader(folder)
    from teal.model.tokenizer import tokenizer_from_hf_folder

    return _finish(
        config, reader, source, "hf", str(folder), lambda: tokenizer_from_hf_folder(folder)
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e}): download it again") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} does not hold a JSON object")
    return data


def _safetensors_reader(folder: Path) -> _SafetensorsReader:
    """Every tensor of the folder, mapped to its shard (from the index file when there is one),
    with each shard's header validated once here."""
    index = folder / "model.safetensors.index.json"
    listed: dict[str, Path] | None = None
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index} has no weight_map")
        listed = {name: folder / str(file) for name, file in weight_map.items()}
        files = sorted(set(listed.values()))
        for shard in files:
            if not shard.is_file():
                raise CorruptCheckpointError(
                    f"shard {shard.name} listed in {index.name} is missing from {folder}: the "
                    "download is incomplete; fetch the missing shard(s)"
                )
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        # "consolidated*.safetensors" are Mistral's original-format weights, with other names.
        files = sorted(
            p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated")
        )
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise UnsupportedModelError(
                f"{folder} has only pickle weights ({', '.join(pickles[:3])}): {_CONVERT_HINT}"
            )
        raise CorruptCheckpointError(
            f"{folder} has config.json but no *.safetensors weights: the download is incomplete"
        )
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in files:
        with _safe_open(shard) as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if listed is not None and listed.get(name) != shard:
                    continue  # the index is authoritative; stray copies elsewhere are ignored
                if name in where:
                    raise CorruptCheckpointError(
                        f"tensor {name} is in both {where[name].name} and {shard.name}: remove "
                        "the stale file or add model.safetensors.index.json"
                    )
                where[name] = shard
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if listed is not None:
        lost = [name for name in listed if name not in where]
        if lost:
            raise CorruptCheckpointError(
                f"{listed[lost[0]].name} lacks {lost[0]}, which {index.name} places there: the "
                "shard and the index do not belong together"
            )
    return _SafetensorsReader(where, shapes)


# ------------------------------------------------------------------ Hugging Face model ids

# What a causal LM needs from a Hub repository; never the pickle weights.
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]


def _hf_cache_dir() -> Path:
    # Read the environment at call time (huggingface_hub reads it once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _open_hub_id(repo_id: str) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError

    cache = _hf_cache_dir()
    home = os.environ.get("HF_HOME", "unset")
    try:
        folder = snapshot_download(
            repo_id, local_files_only=True, allow_patterns=_HUB_PATTERNS, cache_dir=cache
        )
    except LocalEntryNotFoundError:
        folder = None
    if folder is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = (
            f"the local Hugging Face cache ({cache}; HF_HOME={home}), and no file or folder "
            "of that name exists"
        )
        if offline:
            raise ModelNotFoundError(
                f"model {repo_id} is not in {where}, and HF_HUB_OFFLINE is set so it was not "
                "downloaded: unset HF_HUB_OFFLINE, or download it on a machine with network "
                f"(`hf download {repo_id}`) and copy the cache, or pass a folder path"
            )
        try:
            folder = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, cache_dir=cache)
        except RepositoryNotFoundError as e:
            raise ModelNotFoundError(
                f"model {repo_id} was not found on the Hugging Face Hub (or it is gated or "
                "private: accept its license and log in with `hf auth login`)"
            ) from e
        except Exception as e:  # connection errors surface as several types
            raise NetworkError(
                f"model {repo_id} is not in {where}, and downloading it failed "
                f"({type(e).__name__}: {e}). Without network: download it elsewhere "
                f"(`hf download {repo_id}`) and copy it into that cache (or set HF_HOME), or "
                "pass the checkpoint folder's path"
            ) from e
    ckpt = _open_hf_folder(Path(folder), repo_id)
    return ckpt


# ------------------------------------------------------------------ single files


def _open_file(path: Path) -> Checkpoint:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        return _open_gguf(path)
    if path.suffix == ".safetensors":
        raise ModelNotFoundError(
            f"{path} is a weights file without its config: pass the folder that holds it "
            "together with config.json"
        )
    if path.name.endswith(_PICKLE_SUFFIXES):
        raise UnsupportedModelError(f"{path}: {_CONVERT_HINT}")
    raise CorruptCheckpointError(
        f"{path} is neither a GGUF file nor a Hugging Face checkpoint folder"
    )


# ------------------------------------------------------------------ GGUF

# Metadata value types of the GGUF format: fixed-size scalars (struct codes), string, array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_ARCHS = ("llama", "qwen2")


class _Corrupt(Exception):
    """Internal: a structural problem in a GGUF file (turned into CorruptCheckpointError)."""


@dataclass(frozen=True)
class _GgufTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous (input) dimension
    qtype: int
    start: int  # absolute byte offset in the file
    nbytes: int


Q4_BLOCK = 32  # weights per Q4_0 / Q4_1 block, along the input dimension


@dataclass(frozen=True)
class Q4Blocks:
    """A Q4_0 / Q4_1 tensor ``[out, in]`` as stored: ``w = codes * scales + offsets`` per
    block of 32 input channels (Q4_0: ``offsets = -8 * scales``, kept None).

    ``codes`` uint8 ``[out, in]`` (0..15), ``scales`` / ``offsets`` fp16 ``[out, in/32]``
    (the file's own values, so the weights they give are bit for bit the file's)."""

    qtype: str
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None


def decode_q4(raw: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ggml Q4_0 / Q4_1 rows ``[rows, bytes]`` -> codes ``[rows, in]``, fp16 ``d`` and
    (Q4_1) ``m`` ``[rows, in/32]``. A block is ``d`` (fp16), for Q4_1 ``m`` (fp16), then 16
    bytes whose low nibbles are weights 0..15 of the block and high nibbles 16..31."""
    head = {"Q4_0": 2, "Q4_1": 4}[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, head + Q4_BLOCK // 2)
    d = np.ascontiguousarray(blocks[..., 0:2]).view("<f2")[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view("<f2")[..., 0] if head == 4 else None
    qs = blocks[..., head:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)
    return codes, d, m


class _GgufFile:
    """A GGUF file's metadata and tensor table, parsed with bounds checks on every read.

    We parse the header ourselves: it is a simple format, and ``gguf.GGUFReader`` builds numpy
    views for every element of every array (49k tokens and 49k merges here), which takes about
    5 s on the default model against 0.1 s this way. Tensors are read one at a time with plain
    file reads (not a long-lived memory map, whose touched pages would stay resident next to the
    model being filled) and dequantized with ``gguf``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            try:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # empty file
                raise _Corrupt("the file is empty") from e
        self.size = len(self._mm)
        self._pos = 0
        try:
            self._parse()
        finally:
            self._mm.close()
        self._fh = open(path, "rb")  # noqa: SIM115 (closed by close())

    # -- primitive reads, all bounds-checked
    def _take(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > self.size:
            raise _Corrupt(f"it ends at byte {self.size} while {start + n} are needed (truncated)")
        self._pos += n
        return start

    def _scalar(self, t: int) -> Any:
        fmt = "<" + _GGUF_SCALARS[t]
        return struct.unpack_from(fmt, self._mm, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._scalar(10)
        start = self._take(n)
        return self._mm[start : start + n].decode("utf-8", errors="replace")

    def _value(self, t: int) -> Any:
        if t in _GGUF_SCALARS:
            return self._scalar(t)
        if t == _GGUF_STRING:
            return self._string()
        if t == _GGUF_ARRAY:
            et, count = self._scalar(4), self._scalar(10)
            if et in _GGUF_SCALARS:
                width = struct.calcsize(_GGUF_SCALARS[et])
                start = self._take(width * count)
                arr = np.frombuffer(self._mm, np.dtype("<" + _GGUF_SCALARS[et]), count, start)
                return arr.tolist()
            if count > self.size - self._pos:  # every element takes at least one byte
                raise _Corrupt(f"an array claims {count} elements (truncated or damaged)")
            return [self._value(et) for _ in range(count)]
        raise _Corrupt(f"unknown metadata value type {t}")

    def _parse(self) -> None:
        if self.size < 24 or self._mm[:4] != b"GGUF":
            raise _Corrupt("it does not start with the GGUF magic bytes")
        self._take(4)
        version = self._scalar(4)
        if version & 0xFFFF == 0 and version:
            raise UnsupportedModelError(f"{self.path} is a big-endian GGUF file: not supported")
        if version not in (2, 3):
            raise UnsupportedModelError(
                f"{self.path} is GGUF version {version}; versions 2 and 3 are supported"
            )
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        if n_tensors > self.size or n_kv > self.size:
            raise _Corrupt(f"it claims {n_tensors} tensors and {n_kv} metadata entries")
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._scalar(4))
        raw = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if not 1 <= n_dims <= 4:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            raw.append((name, dims, self._scalar(4), self._scalar(10)))
        align = self.meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise _Corrupt(f"general.alignment is {align!r}, not a power of two")
        data_start = -(-self._pos // align) * align
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.tensors: dict[str, _GgufTensor] = {}
        for name, dims, qtype, offset in raw:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name} has ggml type {qtype}, unknown to the installed "
                    "gguf package (upgrade gguf)"
                ) from None
            if dims[0] % block:
                raise _Corrupt(f"tensor {name} rows of {dims[0]} are not whole blocks")
            n = 1
            for d in dims:
                n *= d
            nbytes = n // block * type_size
            start = data_start + offset
            if offset % align:
                raise _Corrupt(f"tensor {name} is not aligned")
            if start + nbytes > self.size:
                raise _Corrupt(
                    f"tensor {name} ends at byte {start + nbytes} but the file has {self.size} "
                    "bytes (truncated)"
                )
            self.tensors[name] = _GgufTensor(name, dims, qtype, start, nbytes)

    def read_raw(self, name: str) -> tuple[Any, np.ndarray]:
        """A tensor's ggml type and its stored bytes, ``[*reversed dims[1:], row bytes]``."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        t = self.tensors[name]
        qtype = GGMLQuantizationType(t.qtype)
        block, type_size = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(t.dims))
        raw = np.empty(t.nbytes, np.uint8)
        self._fh.seek(t.start)
        if self._fh.readinto(memoryview(raw)) != t.nbytes:
            raise CorruptCheckpointError(f"{self.path} became shorter while it was being read")
        return qtype, raw.reshape(*shape[:-1], shape[-1] // block * type_size)

    def read(self, name: str) -> np.ndarray:
        """A tensor as float32, in numpy (row-major) order: shape = reversed ggml dims."""
        from gguf.quants import dequantize

        qtype, raw = self.read_raw(name)
        out = dequantize(raw, qtype)
        # F32 comes back as a view of ``raw``, already our own memory.
        return np.asarray(out, dtype=np.float32)

    def check_types(self) -> None:
        """Refuse, at open, tensor types the installed gguf cannot dequantize."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        for qtype in sorted({t.qtype for t in self.tensors.values()}):
            q = GGMLQuantizationType(qtype)
            try:
                dequantize(np.zeros((1, GGML_QUANT_SIZES[q][1]), np.uint8), q)
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{self.path} stores tensors as {q.name}, which the installed gguf package "
                    "cannot dequantize (upgrade gguf, or use a file with another quantization)"
                ) from None

    def close(self) -> None:
        self._fh.close()


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to llama-arch q/k projections.

    Hugging Face's rotary embedding rotates the two halves of each head (``rotate_half``); GGUF's
    llama kernels rotate adjacent pairs, so the converter reorders each head's rows from
    ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` to ``[x_0, y_0, x_1, y_1, ...]``. Reading the GGUF
    rows of a head as ``[d/2, 2]`` (pair index, member) and transposing to ``[2, d/2]`` gives the
    halves back. Works for weights ``[out, in]`` and biases ``[out]``."""
    head_dim = w.shape[0] // n_heads
    if head_dim * n_heads != w.shape[0] or head_dim % 2:
        raise CorruptCheckpointError(
            f"a q/k tensor of {w.shape[0]} rows does not split into {n_heads} heads of even size"
        )
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    m = _GGUF_BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _GGUF_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_NAMES[m.group(2)]}"
    return None  # rope_freqs.weight and anything the decoder does not use


class _GgufReader:
    def __init__(self, gguf: _GgufFile, config: ModelConfig) -> None:
        self._file = gguf
        self._to_gguf: dict[str, str] = {}
        for name in gguf.tensors:
            hf = _hf_name(name)
            if hf is not None:
                self._to_gguf[hf] = name
        # llama-arch files hold q/k permuted for interleaved rope; qwen2 files use the
        # rotate-half ("neox") rope as Hugging Face does and are stored as is.
        self._heads: dict[str, int] = {}
        if config.arch == "llama":
            for i in range(config.n_layers):
                for part in ("weight", "bias"):
                    self._heads[f"model.layers.{i}.self_attn.q_proj.{part}"] = config.n_heads
                    self._heads[f"model.layers.{i}.self_attn.k_proj.{part}"] = config.n_kv_heads

    def names(self) -> list[str]:
        return list(self._to_gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._file.tensors[self._to_gguf[name]].dims))

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self._to_gguf:
            raise KeyError(f"no tensor {name!r} in this checkpoint")
        w = torch.from_numpy(self._file.read(self._to_gguf[name]))
        if name in self._heads:
            w = unpermute_rope(w, self._heads[name]).contiguous()
        return w

    def q4_blocks(self, name: str) -> Q4Blocks | None:
        if name not in self._to_gguf:
            raise KeyError(f"no tensor {name!r} in this checkpoint")
        qtype, raw = self._file.read_raw(self._to_gguf[name])
        if qtype.name not in ("Q4_0", "Q4_1") or raw.ndim != 2:
            return None
        parts = [torch.from_numpy(a) for a in decode_q4(raw, qtype.name) if a is not None]
        if name in self._heads:  # output rows: the same permutation as the weights'
            parts = [unpermute_rope(a, self._heads[name]).contiguous() for a in parts]
        return Q4Blocks(qtype.name, *parts, *([None] if len(parts) == 2 else []))

    def close(self) -> None:
        self._file.close()


def _f32(x: float) -> float:
    # Metadata floats are float32: 1e-5 is stored as 9.99999974e-06. Take the shortest decimal
    # that rounds to the same float32, which is the value the model's config was written with.
    return float(str(np.float32(x)))


def _hf_config_from_gguf(gguf: _GgufFile) -> dict[str, Any]:
    """The Hugging Face ``config.json`` fields that a GGUF file's metadata states."""
    meta, path = gguf.meta, gguf.path
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(_GGUF_ARCHS)} (llama covers Llama 2/3, Mistral and SmolLM files)"
        )

    def key(name: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise CorruptCheckpointError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    if key("expert_count", 0):
        raise UnsupportedModelError(
            f"{path} is a mixture-of-experts model (Mixtral-style); only dense models are supported"
        )
    n_heads = int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts: fine only when all layers agree
        if len(set(n_kv)) != 1:
            raise UnsupportedModelError(f"{path}: kv head counts differ between layers")
        n_kv = n_kv[0]
    dim = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    theta = _f32(key("rope.freq_base", 10000.0))

    embed = gguf.tensors.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    else:
        vocab = int(key("vocab_size", embed.dims[1] if embed is not None else 0))
    if embed is not None and embed.dims[1] != vocab:
        raise CorruptCheckpointError(
            f"{path}: the token list has {vocab} entries but token_embd.weight has "
            f"{embed.dims[1]} rows"
        )

    rope_scaling: dict[str, Any] | None = None
    kind = key("rope.scaling.type", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    elif kind != "none":  # yarn and others: ModelConfig names what is supported
        rope_scaling = {"rope_type": kind, "factor": _f32(key("rope.scaling.factor", 1.0))}
    if "rope_freqs.weight" in gguf.tensors:
        rope_scaling = _llama3_scaling(gguf.read("rope_freqs.weight"), theta, head_dim, path)

    eos: list[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        # End of turn / end of message end generation too (llama.cpp treats them as EOS).
        value = meta.get(f"tokenizer.ggml.{k}")
        if isinstance(value, int) and value not in eos:
            eos.append(value)
    return {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": dim,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(key("context_length")),
        # llama.cpp's converter writes output.weight only when it is not the embedding.
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos or None,
    }


def _llama3_scaling(
    factors: np.ndarray, theta: float, head_dim: int, path: Path
) -> dict[str, Any] | None:
    """Llama 3.1+ GGUF files carry their rope scaling as per-frequency divisors
    (``rope_freqs.weight``) instead of metadata. Recover Hugging Face's ``llama3`` parameters
    (factor, with Meta's low/high frequency factors 1 and 4 and original context 8192, which
    all Llama 3.x releases use) and check that they reproduce every divisor."""
    factors = factors.reshape(-1).astype(np.float64)
    if np.allclose(factors, 1.0):
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(float(factors.max())),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv_freq = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    scaled = llama3_inv_freq_scale(inv_freq, scaling)
    implied = np.array(inv_freq) / np.array(scaled)
    if len(factors) != len(implied) or not np.allclose(implied, factors, rtol=1e-4):
        raise UnsupportedModelError(
            f"{path}: rope_freqs.weight holds per-frequency rope factors that are not Llama-3 "
            "scaling (factor, 1, 4, 8192): not supported"
        )
    return scaling


def _open_gguf(path: Path) -> Checkpoint:
    path = path.absolute()
    try:
        gguf = _GgufFile(path)
    except _Corrupt as e:
        raise CorruptCheckpointError(
            f"{path} is not a valid GGUF file: {e}. Download or convert it again"
        ) from e
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from e
    try:
        gguf.check_types()
        config = _config_from_hf_dict(_hf_config_from_gguf(gguf), f"GGUF metadata of {path}")
        reader = _GgufReader(gguf, config)
    except BaseException:
        gguf.close()
        raise
    from teal.model.tokenizer import tokenizer_from_gguf

    has_vocab = "tokenizer.ggml.tokens" in gguf.meta
    return _finish(
        config,
        reader,
        str(path),
        "gguf",
        str(path),
        lambda: tokenizer_from_gguf(path, gguf.meta) if has_vocab else None,
    )
