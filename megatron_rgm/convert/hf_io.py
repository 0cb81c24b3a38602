"""Reading and writing HF checkpoints (safetensors), one tensor at a time.

Nothing here unpickles: weights come from safetensors (the head's files are
:mod:`megatron_rgm.head`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
import torch
from safetensors.torch import save_file

from megatron_rgm.config import ConfigError
from megatron_rgm.convert.mapping import HFArch
from megatron_rgm.head import HEAD_SAFETENSORS

# transformers 5 writes the chat template beside tokenizer_config.json (chat_template.jinja), 4.x inside it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError(f"{path} is not a safetensors file (truncated header): re-export it")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is not a safetensors file (unreadable header): re-export it") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class HFCheckpoint:
    """An HF model directory: ``config.json`` plus ``*.safetensors`` (indexed or single)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError(f"--hf-path {self.path} does not exist: pass an HF model directory")
        if not self.path.is_dir():
            raise ConfigError(f"--hf-path {self.path} is a file: pass the directory holding config.json")
        cfg_file = self.path / "config.json"
        if not cfg_file.exists():
            raise ConfigError(f"--hf-path {self.path} has no config.json: is it an HF model directory?")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON ({e}): re-export the model") from None
        self.arch = HFArch.from_config(cfg, str(cfg_file))
        # Tensors are read with plain file reads rather than a memory map: pages of a
        # mapped file stay in the process's resident set, which defeats streaming.
        files = sorted(f for f in self.path.glob("*.safetensors") if f.name != HEAD_SAFETENSORS)  # the head: not weights
        if not files:
            raise ConfigError(f"--hf-path {self.path} holds no *.safetensors weights (pytorch_model.bin is not "
                              "read: it would unpickle code); convert it to safetensors first")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            header, data_start = safetensors_header(f)
            for name, entry in header.items():
                self.entries[name] = (f, entry, data_start)
        self.index = {name: e[0] for name, e in self.entries.items()}

    def validate(self) -> None:
        """Every expected tensor present with its shape, nothing unexpected; raises naming the first problems."""
        expected = self.arch.hf_names()
        have = set(self.index)
        if self.arch.tied:
            have.discard("lm_head.weight")  # some exports keep the tied copy
        missing = sorted(set(expected) - have)
        if missing:
            raise ConfigError(f"HF checkpoint {self.path} is missing {len(missing)} tensors, e.g. {missing[:3]}")
        unexpected = sorted(n for n in have - set(expected) if not n.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise ConfigError(f"HF checkpoint {self.path} has {len(unexpected)} tensors this "
                              f"{self.arch.kind} conversion does not know, e.g. {unexpected[:3]}")
        for name, shape in expected.items():
            found = tuple(self.entries[name][1]["shape"])
            if found != tuple(shape):
                raise ConfigError(f"HF tensor {name} has shape {found}, expected {tuple(shape)} "
                                  f"from {self.path / 'config.json'}")
        # The ranks read slices of these tensors while they write: every problem they could meet is named here.
        sizes = {}
        for name in expected:
            f, entry, data_start = self.entries[name]
            if f not in sizes:
                sizes[f] = f.stat().st_size
            numel = 1
            for n in entry["shape"]:
                numel *= n
            if entry["data_offsets"][1] - entry["data_offsets"][0] != numel * self.dtype(name).itemsize:
                raise ConfigError(f"{f}: tensor {name} holds {entry['data_offsets'][1] - entry['data_offsets'][0]} "
                                  f"bytes, but its shape {tuple(entry['shape'])} and dtype {entry['dtype']} need "
                                  f"{numel * self.dtype(name).itemsize}: re-export it")
            if data_start + entry["data_offsets"][1] > sizes[f]:
                raise ConfigError(f"{f} is truncated (tensor {name} runs past the end of the file): re-export it")

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entry(name)[1]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConfigError(f"HF tensor {name} has dtype {entry['dtype']}, which the conversion does not read")
        return dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        if name not in self.entries:
            raise ConfigError(f"HF checkpoint {self.path} has no tensor {name}")
        return self.entries[name]

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None,
                  cols: tuple[int, int] | None = None, block_bytes: int = 8 * 2**20) -> torch.Tensor:
        """Read rows ``[rows[0], rows[1])`` (and of a 2-D tensor only columns ``[cols[0], cols[1])``) of a tensor.

        Only those bytes leave the file: the rows of a dim-0 slice are one
        contiguous range, read straight into ``out`` (a contiguous CPU tensor of
        the tensor's dtype and the slice's shape); a column slice is read
        ``block_bytes`` of whole rows at a time. Returns ``out``.
        """
        f, entry, data_start = self._entry(name)
        shape = tuple(entry["shape"])
        dtype = self.dtype(name)
        a, b = rows if rows is not None else (0, shape[0] if shape else 1)
        inner = shape[1:]
        if cols is not None:
            if len(shape) != 2:
                raise ValueError(f"column slice of {name}, which has shape {shape}")
            want = (b - a, cols[1] - cols[0])
        else:
            want = (b - a, *inner) if shape else ()
        if (tuple(out.shape) != want or out.dtype != dtype or out.device.type != "cpu"
                or not out.is_contiguous()):
            raise ValueError(f"{name}: out is {out.dtype} {tuple(out.shape)}, expected a contiguous CPU {dtype} {want}")
        row_bytes = dtype.itemsize
        for n in inner:
            row_bytes *= n
        start = data_start + entry["data_offsets"][0] + a * row_bytes
        with open(f, "rb") as fh:
            if cols is None:
                self._read_exact(fh, start, _bytes_of(out), f, name)
                return out
            per = max(1, min(b - a, block_bytes // max(row_bytes, 1)))
            buf = torch.empty(per, shape[1], dtype=dtype)
            for r in range(0, b - a, per):
                n = min(per, b - a - r)
                self._read_exact(fh, start + r * row_bytes, _bytes_of(buf[:n]), f, name)
                out[r:r + n].copy_(buf[:n, cols[0]:cols[1]])
        return out

    @staticmethod
    def _read_exact(fh, offset: int, view: memoryview, f: Path, name: str) -> None:
        fh.seek(offset)
        if view.nbytes and fh.readinto(view) != view.nbytes:
            raise ConfigError(f"{f} is truncated (tensor {name} runs past the end of the file): re-export it")

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (read with plain file reads, not a memory map)."""
        return self.read_into(name, torch.empty(self.shape(name), dtype=self.dtype(name)))


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bfloat16 included)."""
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(bytearray())


class ShardWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` shards of at most ``max_bytes``, plus the index."""

    def __init__(self, out: Path, max_bytes: int = 2 * 1024**3):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.detach().cpu().contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        k = len(self.files)
        save_file(self.buffer, str(self.out / f"shard-{k:05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.buffer))
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        if self.buffer:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{k:05d}.tmp", self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
