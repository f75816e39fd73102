"""Weight quantisation of exported decoders, and a check that catches a wrong one.

Export-time only (needs the `onnx` package, which the `export` extra brings); the runtime never
imports this module.

int8 (`bits=8`) and int4 (`bits=4`) are **weight-only, block-wise, symmetric** `MatMulNBits`
(onnxruntime's `MatMulNBitsQuantizer`, blocks of 32 along K, one fp32 scale per block).

Why not onnxruntime's dynamic quantiser (`quantize_dynamic`, QInt8 per channel), which edged used
before: it writes `DynamicQuantizeLinear` + `MatMulInteger` with **uint8 activations times int8
weights**. On x86 CPUs without VNNI (AVX2 only, and AVX-512 without VNNI) MLAS computes that
product with `vpmaddubsw`, which adds two u8*s8 products into a *saturating int16*: 2 * 255 * 127
= 64770 does not fit in 32767, so every pair of large activations times large weights is clipped,
and SmolLM2-135M answered gibberish there, while the same file was right on VNNI and ARM CPUs.
`reduce_range=True` (7-bit weights) avoids the overflow on that one kernel at the price of a bit.
`MatMulNBits` avoids the u8*s8 pair altogether. Its weights are symmetric per block (zero point
128 for 8 bits, 8 for 4 bits) and, at accuracy level 4 (what edged writes on CPU), the activations
are quantised to int8 per block with scale amax/127, so |a| <= 127; MLAS's x86 kernels multiply
|b| (<= 128) by a*sign(b) (`vpsignb`) before `vpmaddubsw`, so a pair sums to at most
2 * 128 * 127 = 32512 < 32767: nothing saturates on AVX2, AVX-512 or VNNI, and NEON's `sdot`
accumulates in int32. Accuracy level 1 (fp32 compute) would be exact too, but onnxruntime 1.32
has no fast fp32 kernel for 8-bit blocks: SmolLM2-135M decoded at 2.8 tok/s instead of 83.

`emulate_avx2_u8s8` rewrites every u8 x s8 `MatMulInteger` of a graph into plain ONNX ops that
saturate pairwise exactly as `vpmaddubsw` does, so the AVX2-only failure shows on any CPU: the
test `tests/test_zoo_quant.py` runs the int8 export through it and compares greedy ids with fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BLOCK = 32  # MatMulNBits block size along K (one scale per 32 weights)
INT16_MIN, INT16_MAX = -32768, 32767


def onnx_size(out: Path, name: str = "model.onnx") -> int:
    return sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(name))


def quantize_weights(src: Path, dst: Path, *, bits: int, block_size: int = BLOCK,
                     accuracy_level: int | None = 4) -> None:
    """Every MatMul with a constant weight -> MatMulNBits (`bits` 4 or 8, symmetric blocks).

    `accuracy_level`: 4 (default) quantises the activations to int8 per block (fast on CPU;
    exact pair sums, see the module doc); None/1 computes in fp32 (exact, slow for 8 bits);
    CUDA ignores it and computes in the activation type."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    model = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level)
    quant.process()
    save(quant.model.model, dst)


def quantize_dynamic_int8(src: Path, dst: Path, *, reduce_range: bool = False) -> None:
    """edged's former int8 (kept to show and test the failure): onnxruntime's dynamic
    quantiser, int8 per-channel weights, uint8 activations (`MatMulInteger`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, reduce_range=reduce_range)


def save(model, dst: Path) -> None:
    """Save `model` as dst (weights inline below 1.8 GB, else in `<dst>_data`)."""
    import onnx

    big = model.ByteSize() > 1_800_000_000 if hasattr(model, "ByteSize") else True
    for f in dst.parent.glob(dst.name + "*"):
        f.unlink()
    if big:
        onnx.save_model(model, str(dst), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=dst.name + "_data")
    else:
        onnx.save_model(model, str(dst))


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def emulate_avx2_u8s8(src: Path, dst: Path) -> int:
    """Write `dst`: `src` with each uint8 x int8 `MatMulInteger` computed as an AVX2 CPU
    without VNNI computes it (pairs of products along K summed into saturating int16, then int32
    sums, then the activation zero point taken off with the weights' column sums). Returns how
    many nodes were rewritten (0: the graph has no such product, nothing changes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, new_inits, rewritten = [], [], 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMulInteger" else None
        if weight is None or weight.data_type != TensorProto.INT8:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.int32)
        if len(node.input) > 3 and node.input[3] and np.any(
                numpy_helper.to_array(inits[node.input[3]])):
            raise ValueError(f"{node.name}: int8 weights with a zero point are not emulated")
        k, n = w.shape
        if k % 2:
            w = np.concatenate([w, np.zeros((1, n), np.int32)])
        p = f"{node.name or node.output[0]}/avx2"
        new_inits += [numpy_helper.from_array(w.reshape(-1, 2, n), p + "/w_pairs"),
                      numpy_helper.from_array(w.sum(0, keepdims=True).astype(np.int32),
                                              p + "/w_colsum"),
                      numpy_helper.from_array(np.array([0, 0, -1, 2], np.int64), p + "/pairs"),
                      numpy_helper.from_array(np.array([INT16_MIN], np.int32), p + "/lo"),
                      numpy_helper.from_array(np.array([INT16_MAX], np.int32), p + "/hi"),
                      numpy_helper.from_array(np.array([-2], np.int64), p + "/axis")]
        a = node.input[0]
        nodes = [helper.make_node("Cast", [a], [p + "/a32"], to=TensorProto.INT32)]
        if k % 2:
            pad = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1], np.int64), p + "/pad")
            new_inits.append(pad)
            nodes.append(helper.make_node("Pad", [p + "/a32", p + "/pad"], [p + "/a32p"]))
            a32 = p + "/a32p"
        else:
            a32 = p + "/a32"
        nodes += [
            helper.make_node("Reshape", [a32, p + "/pairs"], [p + "/a_pairs"]),  # (B,S,K/2,2)
            helper.make_node("Einsum", [p + "/a_pairs", p + "/w_pairs"], [p + "/pair_sums"],
                             equation="bsij,ijn->bsin"),
            helper.make_node("Max", [p + "/pair_sums", p + "/lo"], [p + "/sat_lo"]),
            helper.make_node("Min", [p + "/sat_lo", p + "/hi"], [p + "/sat"]),
            helper.make_node("ReduceSum", [p + "/sat", p + "/axis"], [p + "/raw"],
                             keepdims=0),
        ]
        out = node.output[0]
        if len(node.input) > 2 and node.input[2]:  # minus a_zero_point * colsum(w)
            nodes += [
                helper.make_node("Cast", [node.input[2]], [p + "/azp"], to=TensorProto.INT32),
                helper.make_node("Mul", [p + "/azp", p + "/w_colsum"], [p + "/corr"]),
                helper.make_node("Sub", [p + "/raw", p + "/corr"], [out]),
            ]
        else:
            nodes[-1].output[0] = out
        new_nodes += nodes
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    save(model, dst)
    return rewritten


def last_token_logits(src: Path, dst: Path) -> bool:
    """Make the graph compute logits for the last position only: a Slice of the hidden states
    (batch, seq, hidden)[:, -1:] before the lm_head product that writes the `logits` output.
    Prefill then skips (prompt - 1) x vocab x hidden multiply-adds it never reads (SmolLM2:
    a fifth of the prefill work) and returns (1, 1, vocab). Returns False (and writes nothing)
    when the producer of `logits` is not a MatMul-like node on a rank-3 input."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    out = next((o for o in graph.output if o.name == "logits"), None)
    node = next((n for n in graph.node if "logits" in n.output), None)
    if out is None or node is None or node.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
        return False
    hidden = node.input[0]
    sliced = hidden + "/last_token"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), sliced + "/starts"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), sliced + "/ends"),
        numpy_helper.from_array(np.array([1], np.int64), sliced + "/axes"),
    ])
    at = list(graph.node).index(node)
    graph.node.insert(at, helper.make_node(
        "Slice", [hidden, sliced + "/starts", sliced + "/ends", sliced + "/axes"], [sliced],
        name="edged/last_token_logits"))
    node.input[0] = sliced
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_value = 1
    data = [f for f in src.parent.iterdir() if f.name.startswith(src.name) and f != src]
    for f in dst.parent.glob(dst.name + "*"):  # all weights are in memory now
        f.unlink()
    if data:  # weights stay in one data file beside the graph (onnx appends to an old one)
        onnx.save_model(model, str(dst), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data[0].name)
    else:
        save(model, dst)
    return True
