"""Private-mode bundles for the tests (``custom_code: private``): a benign LoRA-style graph
over any vocabulary, its ``torch.export`` archive in a code bundle, and hostile variants of the
archive. Not a test module; the trainer under test is :mod:`trainers.private`."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from trainers.private import PROGRAM_FILE


class AdapterLM(nn.Module):
    """A causal LM over ``vocab`` tokens: a frozen embedding and output projection, and a
    trainable low-rank adapter between them. One example (``int64[block]``) in, its mean
    next-token loss out: the private trainer's graph contract."""

    def __init__(self, vocab: int, *, dim: int = 16, rank: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=g), requires_grad=False)
        self.out = nn.Parameter(torch.randn(dim, vocab, generator=g) / dim**0.5, False)
        self.adapter_a = nn.Parameter(torch.randn(dim, rank, generator=g) * 0.1)
        self.adapter_b = nn.Parameter(torch.zeros(rank, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed[tokens[:-1]]
        logits = h @ self.out + (h @ self.adapter_a) @ self.adapter_b
        return nn.functional.cross_entropy(logits, tokens[1:])


TRAINABLE = {"adapter_a", "adapter_b"}


def export_graph(module: nn.Module, block: int, path: Path) -> Path:
    """``module`` exported for one example of ``block`` tokens, saved at ``path``."""
    program = torch.export.export(module, (torch.zeros(block, dtype=torch.long),))
    torch.export.save(program, path)
    return path


def graph_bundle(dest: Path, program: Path) -> Path:
    """A gzipped tar code bundle holding ``program`` as the bundle's ``program.pt2``."""
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(program, arcname=PROGRAM_FILE)
    return dest


class RunsCommand:
    """Pickles as a call of ``os.system(command)``: whoever unpickles it runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (self.command,))


def with_pickled_weight(src: Path, dest: Path, command: str) -> Path:
    """``src`` with its first weight stored as a pickle that runs ``command`` when loaded
    (``torch.export.load`` would unpickle it with ``weights_only=False``)."""
    with zipfile.ZipFile(src) as z:
        config_name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(config_name))
    name = sorted(config["config"])[0]
    config["config"][name]["use_pickle"] = True
    payload = config_name.rsplit("/", 1)[0] + "/" + config["config"][name]["path_name"]
    change = {config_name: json.dumps(config).encode(), payload: pickle.dumps(RunsCommand(command))}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change.get(item.filename, zin.read(item.filename)))
    return dest


def with_node_target(src: Path, dest: Path, target: str) -> Path:
    """``src`` with its first node's operator replaced by ``target`` (a dotted name)."""
    with zipfile.ZipFile(src) as z:
        model_name = next(n for n in z.namelist() if "/models/" in n)
        program = json.loads(z.read(model_name))
    program["graph_module"]["graph"]["nodes"][0]["target"] = target
    change = {model_name: json.dumps(program).encode()}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change.get(item.filename, zin.read(item.filename)))
    return dest


def with_extra_member(src: Path, dest: Path, name: str, size: int) -> Path:
    """``src`` with one more member of ``size`` zero bytes (compressed: a few kilobytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item, zin.read(item.filename))
        with zout.open(name, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return dest
