# Emulation of the tiling and index arithmetic of kernels/nsa_compress_cuda.cu (fp64 torch on CPU), checked against a
# dense reference: query tiles of 64 // G queries x G heads, per-row visibility j*d + l - 1 <= t, key tiles of KT,
# online softmax in the log2 domain, the importance by (query, selection block) pairs with sub-block overlap
# weights and read-add-writes over two query chunks, dq per tile, dk/dv per (64-key tile, query segment) in chunks
# of R // G queries. It checks the algorithm the kernels implement, not CUDA details (synchronisation, wmma
# layouts, shared-memory strides). Not a ctest (slow, pure Python loops); run it with
#   .venv/bin/python tests/mixers/nsa_compress_emulate.py
import math, torch
torch.set_default_dtype(torch.float64)
LOG2E = 1.4426950408889634

def visible(t, l, d, nc):
    if t < l - 1: return 0
    return min(nc, (t - l + 1) // d + 1)

def fwd(q, kc, vc, l, d, scale, KT):
    B, T, H, D = q.shape; nc, KV = kc.shape[1], kc.shape[2]; G = H // KV; TQ = 64 // G
    o = torch.zeros_like(q); lse = torch.full((B, T, H), -math.inf)
    ntiles = (T + TQ - 1) // TQ
    for b in range(B):
        for c in range(KV):
            for tile in range(ntiles):
                tq0 = tile * TQ; tend = min(tq0 + TQ, T)
                rows = []
                for r in range(64):
                    t = tq0 + r // G
                    rows.append(t if (r < TQ * G and t < tend) else -1)
                ne = [visible(t, l, d, nc) if t >= 0 else 0 for t in rows]
                Q = torch.stack([q[b, t, c * G + r % G] if t >= 0 else torch.zeros(D) for r, t in enumerate(rows)])
                ne_max = visible(tend - 1, l, d, nc)
                acc = torch.zeros(64, D); m = torch.full((64,), -math.inf); lsum = torch.zeros(64)
                for j0 in range(0, ne_max, KT):
                    nk = min(KT, ne_max - j0)
                    K = torch.zeros(KT, D); V = torch.zeros(KT, D)
                    K[:nk] = kc[b, j0:j0 + nk, c]; V[:nk] = vc[b, j0:j0 + nk, c]
                    S = Q @ K.T
                    j = torch.arange(KT).view(1, KT)
                    lim = torch.tensor(ne).view(64, 1) - j0
                    x = torch.where(j < lim, S * scale * LOG2E, torch.tensor(-math.inf))
                    mn = torch.maximum(m, x.max(1).values)
                    p = torch.where(mn.view(64, 1) == -math.inf, torch.zeros(()), torch.exp2(x - mn.view(64, 1)))
                    al = torch.where(mn == -math.inf, torch.ones(()), torch.exp2(m - mn))
                    lsum = lsum * al + p.sum(1); m = mn
                    acc = acc * al.view(64, 1) + p @ V
                for r, t in enumerate(rows):
                    if t < 0: continue
                    inv = 1.0 / lsum[r] if lsum[r] > 0 else 0.0
                    o[b, t, c * G + r % G] = acc[r] * inv
                    lse[b, t, c * G + r % G] = (m[r] + math.log2(lsum[r])) / LOG2E if lsum[r] > 0 else -math.inf
    return o, lse

def importance(q, kc, lse, l, d, lp, scale, KT, t0, t1, cols):
    B, T, H, D = q.shape; nc, KV = kc.shape[1], kc.shape[2]; G = H // KV; TQ = 64 // G
    rr, mm = l // d, lp // d; C = t1 - t0
    imp = torch.zeros(B, KV, C, cols)
    ntiles = (C + TQ - 1) // TQ
    for b in range(B):
        for c in range(KV):
            for tile in range(ntiles):
                tq0 = t0 + tile * TQ; tend = min(tq0 + TQ, t1)
                rows = [(tq0 + r // G) if (r < TQ * G and tq0 + r // G < tend) else -1 for r in range(64)]
                ne = [visible(t, l, d, nc) if t >= 0 else 0 for t in rows]
                lse2 = [lse[b, t, c * G + r % G].item() * LOG2E if t >= 0 else -math.inf for r, t in enumerate(rows)]
                Q = torch.stack([q[b, t, c * G + r % G] if t >= 0 else torch.zeros(D) for r, t in enumerate(rows)])
                ne_max = visible(tend - 1, l, d, nc)
                for j0 in range(0, ne_max, KT):
                    nk = min(KT, ne_max - j0)
                    K = torch.zeros(KT, D); K[:nk] = kc[b, j0:j0 + nk, c]
                    S = Q @ K.T
                    P = torch.zeros(64, KT)
                    for r in range(64):
                        for j in range(KT):
                            if j0 + j < ne[r] and lse2[r] != -math.inf:
                                P[r, j] = 2.0 ** (S[r, j].item() * scale * LOG2E - lse2[r])
                    js_lo = j0 // mm; js_hi = (j0 + nk - 1 + rr - 1) // mm
                    njs = js_hi - js_lo + 1
                    for e in range(TQ * njs):
                        tq = e // njs; js = js_lo + e % njs; t = tq0 + tq
                        if t >= tend or js >= cols: continue
                        i_lo = max(j0, js * mm - rr + 1); i_hi = min(j0 + nk, js * mm + mm)
                        s = 0.0
                        for i in range(i_lo, i_hi):
                            ps = sum(P[tq * G + g, i - j0].item() for g in range(G))
                            w = min(i + rr, js * mm + mm) - max(i, js * mm)
                            assert w >= 1
                            s += w * ps
                        imp[b, c, t - t0, js] += s
    return imp

def bwd(q, kc, vc, dout, lse, delta, l, d, scale, KT, R, seg_rows=8192):
    B, T, H, D = q.shape; nc, KV = kc.shape[1], kc.shape[2]; G = H // KV; TQ = 64 // G
    dq = torch.zeros_like(q); dkc = torch.zeros_like(kc); dvc = torch.zeros_like(vc)
    ntiles = (T + TQ - 1) // TQ
    for b in range(B):
        for c in range(KV):
            for tile in range(ntiles):
                tq0 = tile * TQ; tend = min(tq0 + TQ, T)
                rows = [(tq0 + r // G) if (r < TQ * G and tq0 + r // G < tend) else -1 for r in range(64)]
                ne = torch.tensor([visible(t, l, d, nc) if t >= 0 else 0 for t in rows]).view(64, 1)
                hidx = [c * G + r % G for r in range(64)]
                Q = torch.stack([q[b, t, hidx[r]] if t >= 0 else torch.zeros(D) for r, t in enumerate(rows)])
                dO = torch.stack([dout[b, t, hidx[r]] if t >= 0 else torch.zeros(D) for r, t in enumerate(rows)])
                lse2 = torch.tensor([lse[b, t, hidx[r]].item() * LOG2E if t >= 0 else -math.inf for r, t in enumerate(rows)]).view(64, 1)
                dl = torch.tensor([delta[b, t, hidx[r]].item() if t >= 0 else 0.0 for r, t in enumerate(rows)]).view(64, 1)
                ne_max = visible(tend - 1, l, d, nc)
                acc = torch.zeros(64, D)
                for j0 in range(0, ne_max, KT):
                    nk = min(KT, ne_max - j0)
                    K = torch.zeros(KT, D); V = torch.zeros(KT, D)
                    K[:nk] = kc[b, j0:j0 + nk, c]; V[:nk] = vc[b, j0:j0 + nk, c]
                    S = Q @ K.T; dP = dO @ V.T
                    j = torch.arange(KT).view(1, KT)
                    ok = (j0 + j < ne) & (lse2 != -math.inf)
                    P = torch.where(ok, torch.exp2(S * scale * LOG2E - torch.where(ok, lse2, torch.zeros(()))), torch.zeros(()))
                    acc += (P * (dP - dl)) @ K
                for r, t in enumerate(rows):
                    if t >= 0: dq[b, t, hidx[r]] = acc[r] * scale
            # dk/dv
            nkt = (nc + 63) // 64
            tqd = R // G
            seg_q = max(tqd, (seg_rows // G // tqd) * tqd)
            nseg = (T + seg_q - 1) // seg_q
            for kt in range(nkt):
                for sg in range(nseg):
                    j0 = kt * 64; nk = min(64, nc - j0)
                    qa = max(sg * seg_q, j0 * d + l - 1); qb = min(sg * seg_q + seg_q, T)
                    if qa >= qb: continue
                    K = torch.zeros(64, D); V = torch.zeros(64, D)
                    K[:nk] = kc[b, j0:j0 + nk, c]; V[:nk] = vc[b, j0:j0 + nk, c]
                    dK = torch.zeros(64, D); dV = torch.zeros(64, D)
                    for qc0 in range(qa, qb, tqd):
                        tend = min(qc0 + tqd, qb)
                        rows = [(qc0 + r // G) if (r < tqd * G and qc0 + r // G < tend) else -1 for r in range(R)]
                        hidx = [c * G + r % G for r in range(R)]
                        Q = torch.stack([q[b, t, hidx[r]] if t >= 0 else torch.zeros(D) for r, t in enumerate(rows)])
                        dO = torch.stack([dout[b, t, hidx[r]] if t >= 0 else torch.zeros(D) for r, t in enumerate(rows)])
                        ne = torch.tensor([visible(t, l, d, nc) if t >= 0 else 0 for t in rows]).view(1, R)
                        lse2 = torch.tensor([lse[b, t, hidx[r]].item() * LOG2E if t >= 0 else -math.inf for r, t in enumerate(rows)]).view(1, R)
                        dl = torch.tensor([delta[b, t, hidx[r]].item() if t >= 0 else 0.0 for r, t in enumerate(rows)]).view(1, R)
                        St = K @ Q.T; dPt = V @ dO.T
                        kk = torch.arange(64).view(64, 1)
                        ok = (j0 + kk < ne) & (lse2 != -math.inf)
                        Pt = torch.where(ok, torch.exp2(St * scale * LOG2E - torch.where(ok, lse2, torch.zeros(()))), torch.zeros(()))
                        dSt = Pt * (dPt - dl)
                        dV += Pt @ dO; dK += dSt @ Q
                    dvc[b, j0:j0 + nk, c] += dV[:nk]; dkc[b, j0:j0 + nk, c] += dK[:nk] * scale
    return dq, dkc, dvc

def reference(q, kc, vc, w, l, d, lp, scale):
    B, T, H, D = q.shape; nc, KV = kc.shape[1], kc.shape[2]; G = H // KV
    q = q.clone().requires_grad_(); kc = kc.clone().requires_grad_(); vc = vc.clone().requires_grad_()
    qh = q.permute(0, 2, 1, 3); kh = kc.repeat_interleave(G, 2).permute(0, 2, 1, 3); vh = vc.repeat_interleave(G, 2).permute(0, 2, 1, 3)
    t = torch.arange(T).view(T, 1); j = torch.arange(nc).view(1, nc)
    mask = j * d + l - 1 <= t
    s = qh @ kh.transpose(-1, -2) * scale
    p = torch.softmax(s.masked_fill(~mask, -1e30), -1) * mask.any(-1, keepdim=True)
    o = (p @ vh).permute(0, 2, 1, 3)
    o.backward(w)
    ns = (T + lp - 1) // lp
    M = torch.zeros(nc, ns)
    for i in range(nc):
        for jj in range(ns):
            lo, hi = max(i * d, jj * lp), min(i * d + l, (jj + 1) * lp)
            if hi > lo: M[i, jj] = (hi - lo) / d
    imp = p.detach().reshape(B, KV, G, T, nc).sum(2) @ M
    return o.detach(), imp, q.grad, kc.grad, vc.grad

def run(B, T, H, KV, D, l, d, lp, KT, R, seg_rows, seed):
    torch.manual_seed(seed)
    nc = (T - l) // d + 1 if T >= l else 0
    scale = 1 / math.sqrt(D)
    q = torch.randn(B, T, H, D); kc = 1.5 * torch.randn(B, nc, KV, D); vc = torch.randn(B, nc, KV, D); w = torch.randn(B, T, H, D)
    o_ref, imp_ref, dq_ref, dk_ref, dv_ref = reference(q, kc, vc, w, l, d, lp, scale)
    o, lse = fwd(q, kc, vc, l, d, scale, KT)
    ns = (T + lp - 1) // lp
    # two chunks as the host loop does, with cols = ns_c
    parts = []
    split = (T // 3) | 1
    for t0, t1 in ((0, split), (split, T)):
        ns_c = min(ns, (t1 - 1) // lp + 1)
        part = importance(q, kc, lse, l, d, lp, scale, KT, t0, t1, ns_c)
        parts.append(torch.nn.functional.pad(part, (0, ns - ns_c)))
    imp = torch.cat(parts, 2)
    delta = (w * o).sum(-1)
    dq, dk, dv = bwd(q, kc, vc, w, lse, delta, l, d, scale, KT, R, seg_rows)
    def err(a, b):
        if b.numel() == 0: return 0.0
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    e = dict(o=err(o, o_ref), imp=err(imp, imp_ref), dq=err(dq, dq_ref), dk=err(dk, dk_ref), dv=err(dv, dv_ref))
    print(f"B{B} T{T} H{H} KV{KV} D{D} l{l} d{d} l'{lp} KT{KT} R{R} seg{seg_rows}:", {k: f"{v:.1e}" for k, v in e.items()})
    assert all(v < 1e-10 for v in e.values()), e

run(1, 200, 4, 4, 8, 32, 16, 64, 64, 64, 8192, 1)
run(1, 333, 8, 2, 8, 32, 16, 64, 64, 64, 256, 2)        # G4, several dk/dv segments
run(1, 300, 16, 1, 8, 32, 16, 64, 32, 32, 128, 3)       # G16, fp32 tiles (KT 32, R 32)
run(1, 260, 6, 2, 8, 48, 16, 32, 64, 64, 300, 4)        # G3, r=3 m=2
run(2, 250, 10, 2, 8, 64, 16, 16, 32, 32, 200, 5)       # G5, r=4 m=1
run(1, 260, 10, 2, 8, 32, 8, 24, 64, 64, 1000, 6)       # r=4 m=3
run(1, 63, 8, 1, 8, 32, 16, 64, 64, 64, 8192, 7)        # one or two blocks (T=47 would make dq, dk exactly 0)
run(1, 25, 4, 2, 8, 32, 16, 64, 64, 64, 8192, 8)        # no block
run(1, 1500, 2, 1, 8, 32, 16, 64, 64, 64, 400, 9)       # > 1 key tile of 64 (nc 92), several segments
