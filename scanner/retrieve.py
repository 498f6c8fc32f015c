"""Candidate prefilter: the top-k references of each query by cosine similarity.

Exact Algorithm 1 scoring costs milliseconds per pair, so a scan compares each generation
only with the k references whose embeddings are nearest. Embeddings are unit rows (see
`scanner.embed`), so cosine similarity is an inner product. Up to `exact_limit` references
the search is exact: FAISS `IndexFlatIP` on the CPU or a FAISS GPU build, or chunked matmul
and `torch.topk` on a GPU without one (PyPI's FAISS GPU wheels do not run on Hopper). Above
it, IVF-PQ on the CPU trades recall for memory (docs/retrieval.md has the figures).

On disk an index is one FAISS file plus a JSON sidecar that records how to search it; flat
files are memory-mapped on load, so every actor of a machine shares one copy in the page cache.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from os import PathLike
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch

IndexKind = Literal["flat-ip", "ivfpq", "torch-exact"]
Backend = Literal["auto", "faiss", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")

EXACT_LIMIT = 1_000_000  # issue 4: exact inner product up to a million references
DEFAULT_NPROBE = 64  # IVF lists probed per query; recall against nprobe in docs/retrieval.md
IVF_LISTS_PER_SQRT = 4  # nlist ~ 4 sqrt(N), FAISS's guideline for IVF indexes
TRAIN_PER_LIST = 40  # k-means wants 39+ points per centroid (FAISS warns below)
PQ_DIMS_PER_CODE = 8  # ~8 dimensions per one-byte PQ code: 1/16 of float32's memory
MIN_IVFPQ_ROWS = 256 * 40  # PQ's 256 centroids per sub-quantizer need as many points, 40 each
GPU_MAX_K = 2048  # FAISS GPU's largest k (GPU_MAX_SELECTION_K)
CHUNK_ROWS = 65_536  # rows added per call while building; bounds transient memory
TORCH_QUERY_CHUNK = 1024  # torch-exact scores at most 1024 x 65,536 floats (256 MiB) at once
NORM_TOLERANCE = 1e-3  # |norm - 1| allowed: float16 models normalized in float32 pass easily
FORMAT_VERSION = 1


# ---------------------------------------------------------------- validation


def check_vectors(vectors: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Unit rows of the right width as contiguous float32, or a ValueError saying which row is bad."""
    if not isinstance(vectors, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(vectors).__name__}")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {vectors.dtype}")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{name} have dimension {vectors.shape[1]}, the index has {dim}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name} row {int(np.argmin(finite))} contains NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise ValueError(
            f"{name} row {row} has norm {norms[row]:.6g}; rows must be L2-normalized "
            "(cosine similarity is searched as an inner product)"
        )
    return vectors


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


Engine = Literal["faiss-cpu", "faiss-gpu", "torch"]


def _parse_device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must look like 'cpu' or 'cuda:0', got {device!r}") from None


def _exact_backend(backend: Backend, device: torch.device) -> Engine:
    """Where exact search runs; the one place backend names are dispatched."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if device.type == "cpu":
        return "faiss-cpu"
    if device.type != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    if backend == "faiss":
        raise ValueError("backend='faiss' on CUDA needs a FAISS GPU build; this FAISS sees no GPU")
    return "torch"


# ---------------------------------------------------------------- search engines


class _TorchExact:
    """Exact top-k by chunked matmul: memory stays bounded whatever k and the index size."""

    def __init__(self, total: int, dim: int, device: torch.device) -> None:
        self.vectors = torch.empty((total, dim), dtype=torch.float32, device=device)
        self.ntotal = 0

    def add(self, chunk: np.ndarray) -> None:
        end = self.ntotal + len(chunk)
        self.vectors[self.ntotal : end] = torch.from_numpy(chunk).to(self.vectors.device)
        self.ntotal = end

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for start in range(0, len(queries), TORCH_QUERY_CHUNK):
            q = torch.from_numpy(queries[start : start + TORCH_QUERY_CHUNK]).to(self.vectors.device)
            best = torch.empty((len(q), 0), device=q.device)
            best_ids = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
            for row in range(0, self.ntotal, CHUNK_ROWS):
                block = q @ self.vectors[row : row + CHUNK_ROWS].T
                top, top_ids = block.topk(min(k, block.shape[1]), dim=1)
                merged = torch.cat([best, top], dim=1)
                merged_ids = torch.cat([best_ids, top_ids + row], dim=1)
                best, order = merged.topk(min(k, merged.shape[1]), dim=1)
                best_ids = merged_ids.gather(1, order)
            scores.append(best.cpu().numpy())
            ids.append(best_ids.cpu().numpy())
        return np.concatenate(scores), np.concatenate(ids)

    def to_faiss(self) -> faiss.Index:
        index = faiss.IndexFlatIP(self.vectors.shape[1])
        for row in range(0, self.ntotal, CHUNK_ROWS):
            index.add(self.vectors[row : row + CHUNK_ROWS].cpu().numpy())
        return index


def _gpu_index(index: faiss.Index, device: torch.device) -> faiss.Index:
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)


def _is_exact(total: int, exact_limit: int) -> bool:
    """Flat (exact) up to exact_limit rows, IVF-PQ above, where IVF-PQ has enough rows to train."""
    _check_int(total, "total", 1)
    _check_int(exact_limit, "exact_limit", 0)
    if total <= exact_limit:
        return True
    if total < MIN_IVFPQ_ROWS:
        raise ValueError(
            f"{total} rows exceed exact_limit={exact_limit}, but IVF-PQ needs at least "
            f"{MIN_IVFPQ_ROWS} rows to train; raise exact_limit to {total} or more"
        )
    return False


def _training_size(total: int, dim: int) -> int:
    nlist, _ = _ivf_shape(total, dim)
    return min(total, TRAIN_PER_LIST * max(nlist, 256))


def _ivf_shape(total: int, dim: int) -> tuple[int, int]:
    """(nlist, PQ sub-quantizers) for `total` rows of `dim` dimensions."""
    nlist = max(1, min(round(IVF_LISTS_PER_SQRT * math.sqrt(total)), total // TRAIN_PER_LIST))
    target = max(1, dim // PQ_DIMS_PER_CODE)
    pq_m = max(m for m in range(1, target + 1) if dim % m == 0)
    return nlist, pq_m


# ---------------------------------------------------------------- the index


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class CandidateIndex:
    """Top-k inner-product search over unit embeddings; build, search, save, load.

    kind: "flat-ip" (exact, FAISS on CPU or GPU), "torch-exact" (exact, torch on `device`),
    "ivfpq" (approximate, FAISS on CPU). Row ids are positions in build order.
    """

    def __init__(
        self, engine, *, engine_name: Engine, dim: int, device: str, nprobe: int | None
    ) -> None:
        self._engine = engine  # a faiss.Index (CPU or GPU) or a _TorchExact
        self._engine_name = engine_name
        self.dim = dim
        self.device = device
        self.nprobe = nprobe  # None for the exact kinds

    @property
    def kind(self) -> IndexKind:
        if self.nprobe is not None:
            return "ivfpq"
        return "torch-exact" if self._engine_name == "torch" else "flat-ip"

    @property
    def ntotal(self) -> int:
        return int(self._engine.ntotal)

    # -- building

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        *,
        exact_limit: int = EXACT_LIMIT,
        device: str = "cpu",
        backend: Backend = "auto",
        nprobe: int = DEFAULT_NPROBE,
        seed: int = 0,
    ) -> CandidateIndex:
        """Index an in-memory or memory-mapped (N, D) array; IVF-PQ trains on a seeded random sample."""
        if not isinstance(embeddings, np.ndarray):
            raise TypeError(f"embeddings must be a numpy array, got {type(embeddings).__name__}")
        if embeddings.ndim != 2:
            raise ValueError(
                f"embeddings must be a 2-D (rows, dim) array, got shape {embeddings.shape}"
            )
        total = len(embeddings)
        if total == 0:
            raise ValueError("no embeddings to index")
        training = None
        if not _is_exact(total, exact_limit):
            size = _training_size(total, embeddings.shape[1])
            rows = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
            training = check_vectors(embeddings[rows], "embeddings")
        chunks = (embeddings[start : start + CHUNK_ROWS] for start in range(0, total, CHUNK_ROWS))
        return cls._assemble(chunks, total, training, exact_limit, device, backend, nprobe)

    @classmethod
    def build_from_chunks(
        cls,
        chunks: Iterable[np.ndarray],
        *,
        total: int,
        exact_limit: int = EXACT_LIMIT,
        device: str = "cpu",
        backend: Backend = "auto",
        nprobe: int = DEFAULT_NPROBE,
    ) -> CandidateIndex:
        """Index rows streamed in chunks (e.g. a reference store read shard by shard).

        `total` (the number of rows the chunks will yield) picks the structure up front; IVF-PQ
        trains on the first rows, so the stream should not be sorted by anything visual.
        """
        return cls._assemble(iter(chunks), total, None, exact_limit, device, backend, nprobe)

    @classmethod
    def _assemble(
        cls, chunks, total, training, exact_limit, device, backend, nprobe
    ) -> CandidateIndex:
        exact = _is_exact(total, exact_limit)
        _check_int(nprobe, "nprobe", 1)
        torch_device = _parse_device(device)
        engine_name = _exact_backend(backend, torch_device) if exact else "faiss-cpu"
        stream = _checked_chunks(chunks, total)
        first = next(stream)
        dim = first.shape[1]
        if not exact:
            engine, pending = _trained_ivfpq(first, stream, total, training)
        elif engine_name == "torch":
            engine, pending = _TorchExact(total, dim, torch_device), [first]
        elif engine_name == "faiss-gpu":
            engine, pending = _gpu_index(faiss.IndexFlatIP(dim), torch_device), [first]
        else:
            engine, pending = faiss.IndexFlatIP(dim), [first]
        for chunk in itertools.chain(pending, stream):
            engine.add(chunk)
        index = cls(
            engine,
            engine_name=engine_name,
            dim=dim,
            device=str(torch_device) if exact else "cpu",
            nprobe=None if exact else nprobe,
        )
        if index.ntotal != total:
            raise ValueError(f"the chunks held {index.ntotal} rows but total={total} was promised")
        return index

    # -- searching

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) unit queries -> (Q, k) scores, best first, and (Q, k) int64 row ids.

        k is clipped to the index size; k <= 0 returns every row (the exhaustive ranking, which
        for IVF-PQ probes every list). IVF-PQ may find fewer than k rows in the probed lists:
        those slots hold id -1 and score -inf.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an integer, got {k!r}")
        queries = check_vectors(queries, "queries", self.dim)
        k = self.ntotal if k <= 0 or k > self.ntotal else int(k)
        if len(queries) == 0:
            return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
        if self._engine_name == "faiss-gpu" and k > GPU_MAX_K:
            raise ValueError(
                f"FAISS GPU returns at most k={GPU_MAX_K}; load the index with backend='torch' "
                "for longer or exhaustive rankings on a GPU"
            )
        if self.kind == "ivfpq":
            nprobe = self._engine.nlist if k == self.ntotal else self.nprobe
            scores, ids = self._engine.search(
                queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe)
            )
            scores[ids < 0] = -np.inf
        else:
            scores, ids = self._engine.search(queries, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    # -- persistence

    def save(self, path: str | PathLike) -> None:
        """Write the FAISS file and its `.json` sidecar, each atomically, sidecar last (the done marker)."""
        path = Path(path)
        if self._engine_name == "torch":
            cpu_index = self._engine.to_faiss()
        elif self._engine_name == "faiss-gpu":
            cpu_index = faiss.index_gpu_to_cpu(self._engine)
        else:
            cpu_index = self._engine
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(cpu_index, str(tmp))
        os.replace(tmp, path)
        meta = {
            "format_version": FORMAT_VERSION,
            "structure": "ivfpq" if self.kind == "ivfpq" else "flat",
            "metric": "inner_product",
            "dim": self.dim,
            "ntotal": self.ntotal,
            "nprobe": self.nprobe,
            "faiss_version": faiss.__version__,
        }
        tmp = _sidecar(tmp)
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, _sidecar(path))

    @classmethod
    def load(
        cls,
        path: str | PathLike,
        device: str = "cpu",
        *,
        backend: Backend = "auto",
        nprobe: int | None = None,
    ) -> CandidateIndex:
        """Open a saved index; flat files are memory-mapped, IVF-PQ ones read into memory."""
        path = Path(path)
        sidecar = _sidecar(path)
        if not path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(f"{path}: index file or its sidecar {sidecar.name} is missing")
        meta = json.loads(sidecar.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{sidecar}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        torch_device = _parse_device(device)
        flat = meta["structure"] == "flat"
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if flat else 0
        stored = faiss.read_index(str(path), flags)
        expected = faiss.IndexFlatIP if flat else faiss.IndexIVFPQ
        shape = (stored.d, stored.ntotal)
        if not isinstance(stored, expected) or shape != (meta["dim"], meta["ntotal"]):
            raise ValueError(
                f"{path}: holds {type(stored).__name__} d={stored.d} n={stored.ntotal}, but its "
                f"sidecar says {meta['structure']} d={meta['dim']} n={meta['ntotal']}"
            )
        if stored.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path}: the index does not use the inner-product metric")
        if not flat:
            probes = meta["nprobe"] if nprobe is None else _check_int(nprobe, "nprobe", 1)
            return cls(stored, engine_name="faiss-cpu", dim=stored.d, device="cpu", nprobe=probes)
        engine_name = _exact_backend(backend, torch_device)
        if engine_name == "faiss-cpu":
            engine = stored
        elif engine_name == "faiss-gpu":
            engine = _gpu_index(stored, torch_device)
        else:
            engine = _TorchExact(stored.ntotal, stored.d, torch_device)
            for row in range(0, stored.ntotal, CHUNK_ROWS):
                engine.add(stored.reconstruct_n(row, min(CHUNK_ROWS, stored.ntotal - row)))
        return cls(
            engine, engine_name=engine_name, dim=stored.d, device=str(torch_device), nprobe=None
        )


def _checked_chunks(chunks: Iterator[np.ndarray], total: int) -> Iterator[np.ndarray]:
    """Validate each chunk against the first one's width; stop the build if the rows overflow total."""
    dim, seen = None, 0
    for number, chunk in enumerate(chunks):
        chunk = check_vectors(chunk, f"embeddings (chunk {number})", dim)
        dim, seen = chunk.shape[1], seen + len(chunk)
        if seen > total:
            raise ValueError(f"the chunks hold more than total={total} rows")
        if len(chunk):
            yield chunk
    if seen == 0:
        raise ValueError("no embeddings to index")


def _trained_ivfpq(first, stream, total, training) -> tuple[faiss.Index, list[np.ndarray]]:
    """An empty trained IVF-PQ index and the rows read so far, still to be added."""
    dim = first.shape[1]
    nlist, pq_m = _ivf_shape(total, dim)
    pending = [first]
    if training is None:  # streamed: train on the first rows
        wanted = _training_size(total, dim)
        buffered = len(first)
        for chunk in stream:
            pending.append(chunk)
            buffered += len(chunk)
            if buffered >= wanted:
                break
        training = np.concatenate(pending)[:wanted]
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}", faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False  # only Hamming prefiltering needs it; it costs minutes
    index.train(training)
    return index, pending
