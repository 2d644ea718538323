import sys, time, statistics, os
sys.path.insert(0, '.')
import mlx.core as mx
def unpack_dequantize(w, scales, biases, group_size, bits):
    n = w.shape[0]
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)
    q = q.reshape(n, -1, group_size).astype(scales.dtype)
    return (q * scales[..., None] + biases[..., None]).reshape(n, -1)
fused = mx.compile(unpack_dequantize)
def timed(fn, reps=20):
    for _ in range(3): mx.eval(fn())
    ts=[]
    for _ in range(reps):
        t=time.perf_counter(); mx.eval(fn()); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
for (n,k) in [(6144,1536),(1536,6144),(9728,2432),(2432,9728)]:
    w = mx.random.normal((n,k)).astype(mx.bfloat16); mx.eval(w)
    for bits in (4,8):
        wq,s,b = mx.quantize(w,64,bits); mx.eval(wq,s,b)
        # batch 10 dequantizes per eval to amortize launch overhead
        t1 = timed(lambda: [mx.dequantize(wq,s,b,64,bits) for _ in range(10)])/10
        t2 = timed(lambda: [fused(wq,s,b,64,bits) for _ in range(10)])/10
        tc = timed(lambda: [w*1 for _ in range(10)])/10
        gb = n*k*(bits/8+2)/1e9
        print(f"{n}x{k} q{bits}: mx.dequantize {t1:.4f} ms ({gb/t1*1e3:.0f} GB/s)  fused {t2:.4f} ms ({gb/t2*1e3:.0f} GB/s)  bf16 copy {tc:.4f} ms")
