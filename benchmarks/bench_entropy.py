"""Where the bits of a checkpoint are, and how far a better coder could take them.

Why
---
On the dense-update sequences ckptvcs stores 0.96-1.01x of the *simple per-tensor
estimate* (bench_sequences.py: per tensor, the smaller of its byte planes each
zstd-1 and its XOR against the previous checkpoint then byte planes + zstd-1). The
issue's goal is <= 0.95x. Both are byte planes + zstd, so the question is what is
left in the planes that zstd's order-0 entropy coder (Huffman literals, FSE) does not
take, and whether a context-modelling coder (e.g. rANS driven by a model of the byte
given its context) could take 5% of the whole checkpoint. This script measures it on
the real MiniLM sequences (benchmarks/minilm.py) instead of guessing.

What it computes
----------------
For every tensor of every checkpoint (a storage shared by two names once), split into
byte planes (fp32: four, bf16: two; plane ``b3`` of fp32 holds the sign and seven
exponent bits, ``b2`` the last exponent bit and seven mantissa bits), for the
self-contained planes and, from the second checkpoint on, for the planes of the XOR
against the same tensor of the previous checkpoint:

* ``zstd-1``: each whole-tensor plane with zstd level 1, exactly as the estimate does;
* ``ckptvcs``: ckptvcs's own plane coder (codec.py) on the tensor's 1 MiB chunks
  (tuned zstd parameters, a plane kept raw when a sample shows it does not shrink),
  and, for the sequence totals, the codec's actual per-chunk choice between the
  self-contained and the delta encoding (a chunk equal to its base costs nothing:
  it dedups);
* ``zstd-19``: zstd level 19 with a 128 MiB window, on a sample of the chunks (every
  ``--zstd19-every``-th); reported as its size relative to zstd-1 on the same sample;
* ``H0``: the order-0 Shannon entropy of the plane (a floor for any coder that sees
  bytes one at a time without context; the model itself is not counted);
* context models, as the code length of an adaptive arithmetic/ANS coder that learns
  the model while coding (a Dirichlet prior per context, the smaller of alpha 1/2,
  Krichevsky-Trofimov, and 1/32, per tensor plane: an *achievable* size, model cost
  included; labelled KT below), and the empirical entropy given the same context (a
  floor no coder reaches: the model's cost ignored, it overfits many contexts):

  - ``o0``: no context;
  - ``prev``: the previous byte of the same plane (order 1);
  - ``prev2``: the two previous bytes (top plane only);
  - ``exp``: the element's exponent as far as the decoder knows it when it reaches
    this plane (for ``b2`` the top byte, i.e. sign + seven exponent bits, which makes
    ``b3`` + ``b2|exp`` the 9-bit sign+exponent symbol followed by the mantissa's
    high bits given it; for the lower planes the full 8-bit exponent);
  - ``exp+prev``: both;
  - for XOR deltas: ``bexp``: the base element's 8-bit exponent (the decoder has the
    base: an update of a given size flips mantissa bits down from a position set by
    the exponent); ``up``: the delta's byte in the plane above; ``bexp+up``,
    ``bexp+prev``.

The sequence totals add, per tensor, the smaller of self-contained and delta, each as
the sum over planes of the best method for that plane (``best``): what a coder that
may pick any of these models per tensor plane would store. Everything is exact byte
counts or exact code lengths; nothing here depends on machine speed.

Run
---
    bash scripts/setup-bench.sh   # the MiniLM weights
    .venv/bin/python benchmarks/bench_entropy.py --quick   # mlm-tied, bf16-master, full; 2 checkpoints
    .venv/bin/python benchmarks/bench_entropy.py           # + frozen-embeddings; 3 checkpoints 10 steps apart
    .venv/bin/python benchmarks/bench_entropy.py --out bench-out/entropy.json
    .venv/bin/python benchmarks/bench_entropy.py --render bench-out/entropy.json   # re-print the tables

Checkpoint files are shared with bench_sequences.py (``--work-dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sequences  # noqa: E402
import minilm  # noqa: E402

from ckptvcs import codec, planes  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20
QUICK: dict[str, Any] = {"sequences": ["mlm-tied", "bf16-master", "full"], "count": 2, "steps": 2, "zstd19_every": 24}
DEFAULT_SEQUENCES = ["mlm-tied", "full", "bf16-master", "frozen-embeddings"]
LN2 = math.log(2)
# The adaptive coder's prior per context: KT's 1/2, and a small one that learns sparse
# contexts (few distinct bytes) cheaply; the smaller code length is taken per plane
# (a coder would spend one flag on the choice).
ALPHAS = (0.5, 1 / 32)

# Byte counts are accumulated under (kind, coding, plane, method).
Key = tuple[str, str, str, str]


# -- code lengths --------------------------------------------------------------------------


def _lgamma(x: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def _joint_counts(sym: np.ndarray, ctx: np.ndarray | None, nctx: int) -> tuple[np.ndarray, np.ndarray]:
    """``(non-zero counts of (context, symbol), non-zero totals per context)``."""
    if ctx is None:
        counts = np.bincount(sym, minlength=256)
        return counts[counts > 0], np.array([sym.shape[0]])
    key = ctx.astype(np.int32) << 8 | sym
    if nctx * 256 <= 8 * key.shape[0]:
        counts = np.bincount(key, minlength=nctx * 256)
        counts = counts[counts > 0]
    else:
        _, counts = np.unique(key, return_counts=True)
    totals = np.bincount(ctx, minlength=nctx)
    return counts, totals[totals > 0]


def code_lengths(sym: np.ndarray, ctx: np.ndarray | None = None, nctx: int = 1) -> tuple[float, float]:
    """``(empirical conditional entropy, adaptive KT code length)`` of ``sym`` given ``ctx``, in bytes.

    The entropy is a floor that ignores the model's cost (with many contexts and few
    bytes it overfits towards 0); the adaptive length (the smaller of a Dirichlet prior
    with alpha 1/2, KT, and 1/32 per context) is what a sequential adaptive coder
    reaches, within a few bits per context.
    """
    counts, totals = _joint_counts(sym, ctx, nctx)
    c = counts.astype(np.float64)
    t = totals.astype(np.float64)
    entropy = float((t * np.log2(t)).sum() - (c * np.log2(c)).sum())
    kt = min(_dirichlet_bits(c, t, alpha) for alpha in ALPHAS)
    return entropy / 8, kt / 8


def _dirichlet_bits(counts: np.ndarray, totals: np.ndarray, alpha: float) -> float:
    """Code length in bits of a sequential coder with a Dirichlet(alpha) prior per context (KT: 1/2)."""
    k = 256 * alpha
    return float((_lgamma(totals + k) - math.lgamma(k)).sum()
                 - (_lgamma(counts + alpha) - math.lgamma(alpha)).sum()) / LN2


def _prev(plane: np.ndarray) -> np.ndarray:
    out = np.empty_like(plane)
    out[0] = 0
    out[1:] = plane[:-1]
    return out


def _exponent(top: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The 8-bit exponent of fp32 (or bf16) elements from their two high bytes."""
    return ((top & 0x7F) << 1) | (second >> 7)


def context_models(rows: np.ndarray, base_rows: np.ndarray | None) -> dict[int, dict[str, tuple[float, float]]]:
    """Per plane index (0 = lowest byte): ``{model: (entropy, KT length)}`` in bytes.

    ``rows`` are the planes to code (self-contained, or the XOR delta when
    ``base_rows``, the base's planes, are given).
    """
    width = rows.shape[0]
    top = width - 1
    out: dict[int, dict[str, tuple[float, float]]] = {}
    if base_rows is None:
        exp = _exponent(rows[top], rows[top - 1])
    else:
        exp = _exponent(base_rows[top], base_rows[top - 1])
    wide = lambda a, b: (a.astype(np.int32) << 8) | b  # noqa: E731
    for p in range(width):
        sym = rows[p]
        prev = _prev(sym)
        models: dict[str, tuple[float, float]] = {"o0": code_lengths(sym), "prev": code_lengths(sym, prev, 256)}
        if base_rows is None:
            if p == top:
                models["prev2"] = code_lengths(sym, wide(_prev(prev), prev), 1 << 16)
            else:
                ctx = rows[top] if p == top - 1 else exp
                models["exp"] = code_lengths(sym, ctx, 256)
                models["exp+prev"] = code_lengths(sym, wide(ctx, prev), 1 << 16)
        else:
            models["bexp"] = code_lengths(sym, exp, 256)
            if p == top:
                models["bexp+prev"] = code_lengths(sym, wide(exp, prev), 1 << 16)
            else:
                models["up"] = code_lengths(sym, rows[p + 1], 256)
                models["bexp+up"] = code_lengths(sym, wide(exp, rows[p + 1]), 1 << 16)
        out[p] = models
    return out


# -- one tensor -----------------------------------------------------------------------------


def tensor_kind(name: str, dtype: torch.dtype) -> str:
    if not dtype.is_floating_point or name.endswith("/step"):  # AdamW's step is a float scalar
        return "other"
    if name.endswith("exp_avg_sq"):
        return "exp_avg_sq"
    if name.endswith("exp_avg"):
        return "exp_avg"
    if name.startswith("master_weights"):
        return "master fp32"
    return f"weights {str(dtype).removeprefix('torch.')}"


def plane_name(p: int, width: int) -> str:
    if width == 1:
        return "bytes"
    role = {width - 1: "sign+exp7", width - 2: "exp1+mant7"}.get(p, "mant")
    return f"b{p} {role}"


class Accumulator:
    """Byte counts and code lengths of one sequence, by (kind, coding, plane, method)."""

    def __init__(self, zstd19_every: int) -> None:
        self.sums: dict[Key, float] = defaultdict(float)
        self.raw: dict[tuple[str, str, str], int] = defaultdict(int)
        self.totals: dict[str, float] = defaultdict(float)  # estimate / ckptvcs / best / ... over the sequence
        self.zstd19_every = zstd19_every
        self.chunk_counter = 0
        self.cctx1 = zstandard.ZstdCompressor(level=1)
        params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27, enable_ldm=True)
        self.cctx19 = zstandard.ZstdCompressor(compression_params=params)

    def tensor(self, name: str, tensor: torch.Tensor, previous: np.ndarray | None, first: bool) -> np.ndarray:
        """Account one tensor of one checkpoint; returns its bytes (the next checkpoint's base)."""
        kind = tensor_kind(name, tensor.dtype)
        raw = bench_sequences.tensor_bytes(tensor).copy()
        width = tensor.element_size() if kind != "other" else 1
        has_base = previous is not None and previous.shape == raw.shape
        codings = {"self": self._coding(kind, "self", raw, None, width, tensor.element_size())}
        if has_base:
            assert previous is not None
            codings["xor"] = self._coding(kind, "xor", np.bitwise_xor(raw, previous), previous, width,
                                          tensor.element_size())
        # The estimate: per tensor the smaller of the two zstd-1 sums (bench_sequences.estimate).
        est = min(codings, key=lambda c: codings[c]["zstd-1"])
        self.totals["estimate"] += codings[est]["zstd-1"]
        for p, size in codings[est]["planes_zstd1"].items():
            self.sums[(kind, "estimate", plane_name(p, width), "zstd-1")] += size
        sizes = {method: min(c[method] for c in codings.values()) for method in ("best", "best-zstd", "o0", "floor")}
        sizes["estimate"] = codings[est]["zstd-1"]
        sizes["ckptvcs"] = self._ckptvcs_codec(raw, previous if has_base else None, width)
        for method, size in sizes.items():
            if method != "estimate":
                self.totals[method] += size
            if not first:  # the later checkpoints alone: what a long sequence tends to
                self.totals[f"{method} later"] += size
        return raw

    def _coding(self, kind: str, coding: str, data: np.ndarray, base: np.ndarray | None, width: int,
                est_width: int) -> dict[str, Any]:
        """Sizes of one tensor coded self-contained or as a delta, per plane and method.

        ``est_width`` is the element size the estimate splits planes by (it does so for
        integers too; they are coded here as one plane, as ckptvcs does).
        """
        rows = data.reshape(-1, width).T.copy() if width > 1 else data.reshape(1, -1)
        base_rows = base.reshape(-1, width).T.copy() if base is not None and width > 1 else None
        ckpt_planes = self._ckptvcs_planes(data, width)
        models = context_models(rows, base_rows) if width > 1 else {}
        result: dict[str, Any] = {"zstd-1": 0, "best": 0.0, "best-zstd": 0.0, "o0": 0.0, "floor": 0.0,
                                  "planes_zstd1": {}}
        for p in range(rows.shape[0]):
            pname = plane_name(p, width)
            key = (kind, coding, pname)
            self.raw[key] += rows.shape[1]
            z1 = (len(self.cctx1.compress(rows[p].tobytes())) if est_width == width
                  else bench_sequences.planes_zstd1(data, est_width, self.cctx1))
            result["planes_zstd1"][p] = z1
            candidates = {"zstd-1": float(z1), "ckptvcs": float(ckpt_planes[p]), "raw": float(rows.shape[1])}
            for model, (entropy, kt) in models.get(p, {}).items():
                candidates[f"KT {model}"] = kt
                self.sums[(*key, f"H {model}")] += entropy
            for method, size in candidates.items():
                self.sums[(*key, method)] += size
            best_method = min(candidates, key=lambda m: candidates[m])
            self.sums[(*key, "best")] += candidates[best_method]
            self.sums[(*key, f"wins {best_method}")] += rows.shape[1]
            result["zstd-1"] += z1
            result["best"] += candidates[best_method]
            result["best-zstd"] += min(z1, ckpt_planes[p], rows.shape[1])
            result["o0"] += min(candidates.get("KT o0", z1), z1, rows.shape[1])
            result["floor"] += min([candidates[best_method], *(h for h, _ in models.get(p, {}).values())])
        self._zstd19_sample(kind, coding, rows, width)
        return result

    def _ckptvcs_planes(self, data: np.ndarray, width: int) -> list[int]:
        """Stored bytes of each plane with ckptvcs's plane coder, chunk by chunk (headers left out)."""
        layout = width if width > 1 else planes.BYTES
        out = [0] * (width if width > 1 else 1)
        for start in range(0, data.shape[0], CHUNK):
            chunk = data[start : start + CHUNK]
            parts = codec._plane_parts(chunk, layout, "entropy-split")
            header = codec._parse_planes(memoryview(b"".join(bytes(p) for p in parts)), chunk.shape[0])
            for p, (_, stored) in enumerate(header.entries):
                out[p] += stored
        return out

    def _ckptvcs_codec(self, raw: np.ndarray, previous: np.ndarray | None, width: int) -> int:
        """Payload bytes of codec.encode's per-chunk choice (a chunk equal to its base: 0, it dedups)."""
        layout = width if width > 1 else planes.BYTES
        total = 0
        for start in range(0, raw.shape[0], CHUNK):
            chunk = raw[start : start + CHUNK]
            cid = blake3.blake3(chunk).digest()
            base = None
            if previous is not None:
                base_chunk = previous[start : start + CHUNK]
                base = (blake3.blake3(base_chunk).digest(), memoryview(base_chunk))
                if base[0] == cid:
                    continue
            enc = codec.encode(memoryview(chunk), cid, layout=layout, base=base, verify=False)
            total += len(enc.payload)
        return total

    def _zstd19_sample(self, kind: str, coding: str, rows: np.ndarray, width: int) -> None:
        per_chunk = CHUNK // rows.shape[0]
        for start in range(0, rows.shape[1], per_chunk):
            self.chunk_counter += 1
            if self.chunk_counter % self.zstd19_every:
                continue
            for p in range(rows.shape[0]):
                piece = rows[p, start : start + per_chunk].tobytes()
                key = (kind, coding, plane_name(p, width))
                self.sums[(*key, "sample zstd-1")] += len(self.cctx1.compress(piece))
                self.sums[(*key, "sample zstd-19")] += len(self.cctx19.compress(piece))


# -- a sequence -----------------------------------------------------------------------------


def measure(files: list[Path], zstd19_every: int) -> dict[str, Any]:
    acc = Accumulator(zstd19_every)
    previous: dict[str, np.ndarray] = {}
    for i, path in enumerate(files):
        print(f"    checkpoint {i}", file=sys.stderr)
        state = torch.load(path, weights_only=True)
        current = {}
        for name, tensor in bench_sequences.unique_tensors(state).items():
            current[name] = acc.tensor(name, tensor, previous.get(name), first=i == 0)
        previous = current
    rows: dict[str, dict[str, Any]] = {}
    for (kind, coding, pname, method), value in acc.sums.items():
        rows.setdefault(f"{kind}|{coding}|{pname}", {})[method] = value
    for (kind, coding, pname), n in acc.raw.items():
        rows[f"{kind}|{coding}|{pname}"]["raw bytes"] = n
    return {"totals": dict(acc.totals), "planes": rows}


# -- predicting the weights from the optimizer state --------------------------------------------

WEIGHT_DECAY, BETA1, BETA2, EPS = 0.01, 0.9, 0.999, 1e-8  # minilm.py's AdamW (torch defaults)


def optimized_weights(sequence: str, state: dict[str, Any]) -> list[torch.Tensor | None]:
    """The fp32 weights AdamW updates, in the optimizer's parameter order (minilm.py's runs)."""
    if sequence == "bf16-master":
        return list(state["master_weights"])
    model: torch.nn.Module = minilm.MaskedLM(minilm.MiniLM()) if sequence == "mlm-tied" else minilm.MiniLM()
    names = [n for n, _ in model.named_parameters()]
    if sequence == "frozen-embeddings":
        names = [n for n in names if not n.startswith("embeddings.")]
    if sequence == "adapters":
        return []
    return [state["model"].get(n) for n in names]


def _ordered(x: torch.Tensor) -> np.ndarray:
    """fp32 bit patterns as integers that order like the floats (so a difference is a step count)."""
    i = x.contiguous().view(torch.int32).numpy().astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _zigzag32(r: np.ndarray) -> np.ndarray:
    return ((r << 1) ^ (r >> 63)).astype(np.uint64).astype(np.uint32)


def adamw_prediction(sequence: str, files: list[Path], steps: int) -> dict[str, float]:
    """Bytes of the weights' deltas: XOR + planes + zstd-1 against a residual from an AdamW prediction.

    The checkpoint holds the optimizer's moments after the step it was taken at, so a
    decoder that has the previous weights and the new moments can predict the new
    weights: ``w0 * (1 - lr*wd)^k - k * lr * m_hat / (sqrt(v_hat) + eps)`` for ``k``
    steps (exact for one step up to rounding; for several, the moments of the steps in
    between are unknown). What is left to store is the difference of the weights' bit
    patterns from the prediction's (as ordered integers, zig-zag, byte planes).
    """
    lr = 5e-5 if sequence in minilm.MASKED_LM else 2e-5
    cctx = zstandard.ZstdCompressor(level=1)
    out = {"xor zstd-1": 0.0, "difference zstd-1": 0.0, "predicted zstd-1": 0.0, "predicted KT up": 0.0}
    before = torch.load(files[0], weights_only=True)
    for path in files[1:]:
        after = torch.load(path, weights_only=True)
        moments = after["optimizer"]["state"]
        for i, (w0, w1) in enumerate(zip(optimized_weights(sequence, before), optimized_weights(sequence, after))):
            if i not in moments or w0 is None or w1 is None or w1.dtype != torch.float32:
                continue
            t = int(moments[i]["step"])
            m, v = moments[i]["exp_avg"].reshape(-1), moments[i]["exp_avg_sq"].reshape(-1)
            w0, w1 = w0.reshape(-1), w1.reshape(-1)
            update = (m / (1 - BETA1**t)) / ((v / (1 - BETA2**t)).sqrt() + EPS)
            pred = (w0 * (1 - lr * WEIGHT_DECAY) ** steps - steps * lr * update).float()
            residuals = {
                "xor zstd-1": (w1.view(torch.int32) ^ w0.view(torch.int32)).numpy().view(np.uint32),
                "difference zstd-1": _zigzag32(_ordered(w1) - _ordered(w0)),
                "predicted zstd-1": _zigzag32(_ordered(w1) - _ordered(pred)),
            }
            for name, values in residuals.items():
                rows = values.view(np.uint8).reshape(-1, 4).T.copy()
                out[name] += sum(len(cctx.compress(r.tobytes())) for r in rows)
                if name == "predicted zstd-1":
                    out["predicted KT up"] += code_lengths(rows[3])[1] + sum(
                        min(code_lengths(rows[p], rows[p + 1], 256)[1], len(cctx.compress(rows[p].tobytes())))
                        for p in range(3))
        before = after
    return out


# -- report ---------------------------------------------------------------------------------


def _ratio(totals: dict[str, float], key: str, reference: float) -> str:
    return f"{totals[key] / reference:.3f}" if key in totals else "-"


def render(report: dict[str, Any]) -> str:
    out = [f"{report['count']} checkpoints, {report['steps']} AdamW steps apart; sizes relative to the "
           "simple per-tensor estimate (byte planes + zstd-1, or the XOR delta, per tensor).", "",
           "| sequence | estimate | ckptvcs codec | best zstd (per plane: zstd-1, ckptvcs, raw) "
           "| + adaptive order-0 | best context model (any, per tensor plane) | floor: entropy given the best "
           "context, model cost ignored |",
           "|---|---|---|---|---|---|---|"]
    for name, r in report["sequences"].items():
        t = r["totals"]
        est = t["estimate"]
        out.append(f"| {name} | {est / 1e6:.1f} MB | {t['ckptvcs'] / est:.3f} | {t['best-zstd'] / est:.3f} "
                   f"| {t['o0'] / est:.3f} | **{t['best'] / est:.3f}** | {_ratio(t, 'floor', est)} |")
        if t.get("estimate later"):
            later = t["estimate later"]
            out.append(f"| {name}, checkpoints after the first | {later / 1e6:.1f} MB | {t['ckptvcs later'] / later:.3f} "
                       f"| {t['best-zstd later'] / later:.3f} | {t['o0 later'] / later:.3f} "
                       f"| **{t['best later'] / later:.3f}** | {_ratio(t, 'floor later', later)} |")
    predicted = {n: r for n, r in report["sequences"].items() if r.get("adamw_prediction", {}).get("xor zstd-1")}
    if predicted:
        out += ["", "The weights' deltas (fp32 weights AdamW updates, checkpoints after the first), byte planes each:", "",
                "| sequence | XOR + zstd-1 | integer difference + zstd-1 | residual from the AdamW prediction + zstd-1 "
                "| + context model (KT, up) | saving / the sequence's estimate |", "|---|---|---|---|---|---|"]
        for name, r in predicted.items():
            a, est = r["adamw_prediction"], r["totals"]["estimate"]
            best = min(a["predicted zstd-1"], a["predicted KT up"])
            out.append(f"| {name} | {a['xor zstd-1'] / 1e6:.1f} MB | {a['difference zstd-1'] / 1e6:.1f} MB | "
                       f"{a['predicted zstd-1'] / 1e6:.1f} MB | {a['predicted KT up'] / 1e6:.1f} MB | "
                       f"{(a['xor zstd-1'] - best) / est:.3f} |")
    for name, r in report["sequences"].items():
        out += ["", f"### {name}: bits per byte of each plane", "",
                "share = the plane's part of the estimate's bytes (self and delta together); methods in bits per "
                "stored byte of the plane (8 = incompressible); zstd-19 is its ratio to zstd-1 on the sample.", "",
                "| kind | coding | plane | share | zstd-1 | ckptvcs | zstd-19/zstd-1 | H o0 | KT o0 | best context "
                "(KT) | H of that context | best |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        est_total = r["totals"]["estimate"]
        planes_ = r["planes"]
        for key in sorted(planes_):
            kind, coding, pname = key.split("|")
            if coding == "estimate":
                continue
            row = planes_[key]
            n = row["raw bytes"]
            if n < 1e-4 * est_total:  # scalars (AdamW's step), counters: nothing to see
                continue
            bpb = lambda v: 8 * v / n  # noqa: E731
            share = planes_.get(f"{kind}|estimate|{pname}", {}).get("zstd-1", 0) / est_total
            ctx = {m: v for m, v in row.items() if m.startswith("KT ") and m != "KT o0"}
            best_ctx = min(ctx, key=lambda m: ctx[m]) if ctx else None
            z19 = (row["sample zstd-19"] / row["sample zstd-1"]) if row.get("sample zstd-1") else None
            out.append(
                f"| {kind} | {coding} | {pname} | {share:.1%} | {bpb(row['zstd-1']):.2f} | {bpb(row['ckptvcs']):.2f} | "
                f"{'-' if z19 is None else f'{z19:.3f}'} | "
                f"{bpb(row['H o0']):.2f} | {bpb(row['KT o0']):.2f} | " if "H o0" in row else
                f"| {kind} | {coding} | {pname} | {share:.1%} | {bpb(row['zstd-1']):.2f} | {bpb(row['ckptvcs']):.2f} | "
                f"{'-' if z19 is None else f'{z19:.3f}'} | - | - | "
            )
            if best_ctx:
                out[-1] += (f"{bpb(row[best_ctx]):.2f} ({best_ctx[3:]}) | {bpb(row['H ' + best_ctx[3:]]):.2f} | "
                            f"{bpb(row['best']):.2f} |")
            else:
                out[-1] += f"- | - | {bpb(row['best']):.2f} |"
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "sequences")
    parser.add_argument("--sequences", nargs="+", choices=list(bench_sequences.minilm.SCENARIOS),
                        default=DEFAULT_SEQUENCES)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--zstd19-every", type=int, default=8, help="zstd-19 on every N-th chunk (it is slow)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK['sequences'])}; {QUICK['count']} checkpoints {QUICK['steps']} steps apart")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only print the tables of an earlier --out")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.count, args.steps, args.zstd19_every = (
            list(QUICK["sequences"]), QUICK["count"], QUICK["steps"], QUICK["zstd19_every"])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    work = args.work_dir.absolute()
    report: dict[str, Any] = {"count": args.count, "steps": args.steps, "zstd19_every": args.zstd19_every,
                              "sequences": {}}
    for sequence in args.sequences:
        print(f"  {sequence}", file=sys.stderr)
        folder = work / "seq" / f"{sequence}-{args.count}x{args.steps}"
        files = bench_sequences.generate(sequence, folder, args.count, args.steps, 0.0)
        report["sequences"][sequence] = measure(files, args.zstd19_every)
        print("    weights predicted from the optimizer state", file=sys.stderr)
        report["sequences"][sequence]["adamw_prediction"] = adamw_prediction(sequence, files, args.steps)
        if args.out:  # partial results survive an interrupted run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    print(render(report))


if __name__ == "__main__":
    main()
