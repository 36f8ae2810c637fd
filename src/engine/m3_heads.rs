//! The three BGE-M3 heads in training on a kernel device (issue 5): the encoder's last hidden
//! state stays on the device; only the [CLS] rows ([B, H]) and the two score matrices
//! ([Bq, Bp] each, sparse and ColBERT) come to the host, where the losses run on a small tape;
//! their gradients go back up and the heads' backward produces the hidden state's gradient on the
//! device, ready for [`DeviceEncoder::backward`](super::DeviceEncoder::backward).
//!
//! Same function as `model::m3_train::apply_heads` + `scores_from_heads` (checked against it in
//! tests/device_engine.rs):
//! - dense: the [CLS] row (normalised on the host tape);
//! - sparse: w = ReLU(H ws + b) per token, max per token id without the special ids
//!   (`sparse_fwd`), Σ over shared ids of w_q w_p (`sparse_scores`); backward `sparse_scores_bwd`
//!   then `sparse_weights_bwd` (the gradient reaches only each id's argmax position);
//! - ColBERT: v = normalise(H Wᵀ + b) for every position, MaxSim over positions 1.. of the real
//!   tokens (position 0 is masked out, so the [CLS] vector never enters); backward `maxsim_bwd`
//!   (f32), a cast to the compute type, `l2_normalize_bwd`, then two GEMMs and a column sum.

use super::{upload_pod, DBuf};
use crate::device::cpu::gemm::Trans;
use crate::device::kernels as k;
use crate::device::kernels_m3::{self as km, LexLists, MaxSimDims};
use crate::device::launch::{DevBuf, DeviceGemm, KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::model::encoder::EncoderInput;
use crate::model::m3::NORM_EPS;
use crate::tensor::Tensor;

/// The sparse and ColBERT head weights on the device (uploaded from the host's values each step:
/// the heads' optimizer runs on the host) and the special ids the sparse head leaves out.
pub struct HeadWeights {
    colbert_w: DBuf,
    colbert_b: DBuf,
    sparse_w: DBuf,
    sparse_b: DBuf,
    drop: DevBuf,
    ndrop: usize,
    /// ColBERT output width.
    pub colbert_dim: usize,
    pub hidden: usize,
    dt: KDType,
}

impl HeadWeights {
    /// `heads`: colbert weight [Dc, H], colbert bias [Dc], sparse weight [1, H], sparse bias [1]
    /// (`model::m3_train::HEAD_NAMES` order), stored as `dt`.
    pub fn upload(
        dev: &dyn KernelDevice,
        heads: &[Tensor],
        dt: KDType,
        drop_ids: &[u32],
    ) -> Result<HeadWeights> {
        let [cw, cb, sw, sb] = heads else {
            return Err(Error::invalid(format!(
                "device heads: {} head tensors, expected 4",
                heads.len()
            )));
        };
        let dims = cw.dims();
        if dims.len() != 2 || cb.numel() != dims[0] || sw.numel() != dims[1] || sb.numel() != 1 {
            return Err(Error::invalid(format!(
                "device heads: shapes {:?} {:?} {:?} {:?} do not form colbert [Dc, H] + [Dc] and \
                 sparse [1, H] + [1]",
                cw.dims(),
                cb.dims(),
                sw.dims(),
                sb.dims()
            )));
        }
        let up = |t: &Tensor| DBuf::from_f32(dev, t.to_f32().f32s()?, dt);
        // A zero-length upload may not be allowed: keep one unused id.
        let drop: Vec<u32> = if drop_ids.is_empty() {
            vec![u32::MAX]
        } else {
            drop_ids.to_vec()
        };
        Ok(HeadWeights {
            colbert_w: up(cw)?,
            colbert_b: up(cb)?,
            sparse_w: up(sw)?,
            sparse_b: up(sb)?,
            drop: upload_pod(dev, &drop)?,
            ndrop: drop_ids.len(),
            colbert_dim: dims[0],
            hidden: dims[1],
            dt,
        })
    }
}

/// One side's lexical lists (`sparse_fwd`'s output).
struct LexBufs {
    ids: DevBuf,
    w: DevBuf,
    pos: DevBuf,
    count: DevBuf,
    texts: usize,
    cap: usize,
}

impl LexBufs {
    fn new(dev: &dyn KernelDevice, texts: usize, cap: usize) -> Result<LexBufs> {
        Ok(LexBufs {
            ids: dev.alloc(texts * cap * 4)?,
            w: dev.alloc(texts * cap * 4)?,
            pos: dev.alloc(texts * cap * 4)?,
            count: dev.alloc(texts.max(1) * 4)?,
            texts,
            cap,
        })
    }

    fn lists(&self) -> LexLists {
        LexLists {
            ids: self.ids.ptr,
            w: self.w.ptr,
            pos: self.pos.ptr,
            count: self.count.ptr,
            texts: self.texts,
            cap: self.cap,
        }
    }
}

/// What the backward needs of one side's sparse and ColBERT heads.
struct SideUnified {
    /// [n] f32: ReLU(H ws + b) (the ReLU gate of the backward).
    weights: DBuf,
    lex: LexBufs,
    /// [n, Dc] in the compute type: H Wᵀ + b, and its normalised rows.
    pre: DBuf,
    vecs: DBuf,
    /// [n] u8: the real tokens after position 0.
    mask: DevBuf,
}

/// One side (queries or passages) of a batch.
struct Side {
    batch: usize,
    len: usize,
    unified: Option<SideUnified>,
}

/// The heads' forward over a whole batch, kept for [`BatchHeads::backward`].
pub struct BatchHeads {
    q: Side,
    p: Side,
    /// [Bq, Bp, Lq] i32: MaxSim's argmax.
    argmax: Option<DevBuf>,
    /// [Bq, H] and [Bp, H] f32: the [CLS] rows of the hidden states.
    pub cls_q: Vec<f32>,
    pub cls_p: Vec<f32>,
    /// [Bq, Bp] f32, before the temperature: the lexical and the MaxSim scores (unified only).
    pub sparse: Option<Vec<f32>>,
    pub colbert: Option<Vec<f32>>,
}

/// Gradients of the head weights (f32, `HEAD_NAMES` order and shapes).
pub struct HeadGrads {
    pub colbert_w: Vec<f32>,
    pub colbert_b: Vec<f32>,
    pub sparse_w: Vec<f32>,
    pub sparse_b: Vec<f32>,
}

/// Rows `rows` of `h` [total, width] (storage type kept) as a new [rows.len(), width] buffer.
pub(crate) fn gather_rows(
    dev: &dyn KernelDevice,
    h: &DBuf,
    rows: &[u32],
    width: usize,
) -> Result<DBuf> {
    let ids = upload_pod(dev, rows)?;
    let out = DBuf::uninit(dev, rows.len() * width, h.dtype())?;
    // SAFETY: h holds len / width rows of `width` (the table), ids row numbers below that (the
    // kernel gives zeros for larger ones), out rows.len() × width.
    unsafe {
        k::gather_fwd(
            dev,
            h.dtype(),
            h.ptr(),
            ids.ptr,
            out.ptr(),
            rows.len(),
            width,
            h.len() / width.max(1),
        )?
    };
    Ok(out)
}

/// The [CLS] (first) row of every text: [batch, hidden] f32 on the host.
fn cls_rows(dev: &dyn KernelDevice, h: &DBuf, x: &EncoderInput, hidden: usize) -> Result<Vec<f32>> {
    let rows: Vec<u32> = (0..x.batch).map(|i| (i * x.len) as u32).collect();
    gather_rows(dev, h, &rows, hidden)?.to_f32(dev)
}

/// ColBERT projection of every row: pre = h Wᵀ + b and its normalised rows, both [n, dc] in
/// `dt` (h [n, hd], W [dc, hd], b [dc]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn colbert_project(
    dev: &dyn KernelDevice,
    dt: KDType,
    h: &DBuf,
    w: &DBuf,
    b: &DBuf,
    n: usize,
    hd: usize,
    dc: usize,
) -> Result<(DBuf, DBuf)> {
    let pre = DBuf::uninit(dev, n * dc, dt)?;
    let vecs = DBuf::uninit(dev, n * dc, dt)?;
    let g = DeviceGemm {
        ta: Trans::N,
        tb: Trans::T,
        m: n,
        k: hd,
        n: dc,
        alpha: 1.0,
        beta: 0.0,
        ab: dt,
        c: dt,
    };
    // SAFETY: h [n, hd], W [dc, hd], pre and vecs [n, dc], bias [dc].
    unsafe {
        dev.gemm(&g, h.ptr(), w.ptr(), pre.ptr())?;
        k::add_bias(dev, dt, pre.ptr(), b.ptr(), n, dc)?;
        k::l2_normalize_fwd(dev, dt, pre.ptr(), vecs.ptr(), n, dc, NORM_EPS)?;
    }
    Ok((pre, vecs))
}

fn check_hidden(h: &DBuf, x: &EncoderInput, hidden: usize, what: &str) -> Result<()> {
    if h.len() != x.batch * x.len * hidden || x.ids.len() != x.batch * x.len {
        return Err(Error::shape(
            what,
            &[x.batch, x.len, hidden],
            &[h.len() / hidden.max(1)],
        ));
    }
    Ok(())
}

fn side_forward(
    dev: &dyn KernelDevice,
    hw: &HeadWeights,
    h: &DBuf,
    x: &EncoderInput,
    vocab: usize,
) -> Result<SideUnified> {
    let (n, hd, dc, dt) = (x.batch * x.len, hw.hidden, hw.colbert_dim, hw.dt);
    // Sparse: term weights and the per-text lists.
    let ids = upload_pod(dev, &x.ids)?;
    let weights = DBuf::uninit(dev, n, KDType::F32)?;
    let lex = LexBufs::new(dev, x.batch, x.len)?;
    // SAFETY: h [n, hd], ws [hd], bias [1], ids [n] < vocab, drop [ndrop], weights [n], lists
    // of batch × len.
    unsafe {
        km::sparse_fwd(
            dev,
            dt,
            h.ptr(),
            hw.sparse_w.ptr(),
            hw.sparse_b.ptr(),
            ids.ptr,
            hw.drop.ptr,
            hw.ndrop,
            weights.ptr(),
            &lex.lists(),
            hd,
            vocab,
        )?
    };
    // ColBERT: every position projected and normalised; MaxSim masks position 0 and padding.
    let (pre, vecs) = colbert_project(dev, dt, h, &hw.colbert_w, &hw.colbert_b, n, hd, dc)?;
    let mask: Vec<u8> = (0..n)
        .map(|i| u8::from(i % x.len != 0 && x.mask[i] != 0))
        .collect();
    Ok(SideUnified {
        weights,
        lex,
        pre,
        vecs,
        mask: upload_pod(dev, &mask)?,
    })
}

impl BatchHeads {
    /// The heads on the hidden states `hq` [Bq, Lq, H] and `hp` [Bp, Lp, H] (the compute type)
    /// of the inputs `xq`, `xp`; `hw` None: dense only (`--unified false`). `vocab` bounds the
    /// token ids.
    pub fn forward(
        dev: &dyn KernelDevice,
        hw: Option<&HeadWeights>,
        hidden: usize,
        vocab: usize,
        (hq, xq): (&DBuf, &EncoderInput),
        (hp, xp): (&DBuf, &EncoderInput),
    ) -> Result<BatchHeads> {
        check_hidden(hq, xq, hidden, "device heads: query hidden state")?;
        check_hidden(hp, xp, hidden, "device heads: passage hidden state")?;
        let mut out = BatchHeads {
            q: Side {
                batch: xq.batch,
                len: xq.len,
                unified: None,
            },
            p: Side {
                batch: xp.batch,
                len: xp.len,
                unified: None,
            },
            argmax: None,
            cls_q: cls_rows(dev, hq, xq, hidden)?,
            cls_p: cls_rows(dev, hp, xp, hidden)?,
            sparse: None,
            colbert: None,
        };
        let Some(hw) = hw else {
            return Ok(out);
        };
        if hw.hidden != hidden {
            return Err(Error::shape(
                "device heads: sparse / ColBERT input width",
                &[hidden],
                &[hw.hidden],
            ));
        }
        let uq = side_forward(dev, hw, hq, xq, vocab)?;
        let up = side_forward(dev, hw, hp, xp, vocab)?;
        let (bq, bp) = (xq.batch, xp.batch);
        let ss = DBuf::uninit(dev, bq * bp, KDType::F32)?;
        let sc = DBuf::uninit(dev, bq * bp, KDType::F32)?;
        let argmax = dev.alloc(bq * bp * xq.len * 4)?;
        let dims = MaxSimDims {
            queries: bq,
            q_len: xq.len,
            passages: bp,
            p_len: xp.len,
            dim: hw.colbert_dim,
        };
        // SAFETY: lists as built above; scores [bq, bp] f32; vecs and masks as `dims`, argmax
        // [bq, bp, lq] i32.
        unsafe {
            km::sparse_scores(dev, &uq.lex.lists(), &up.lex.lists(), ss.ptr())?;
            km::maxsim_fwd(
                dev,
                hw.dt,
                uq.vecs.ptr(),
                uq.mask.ptr,
                up.vecs.ptr(),
                up.mask.ptr,
                sc.ptr(),
                argmax.ptr,
                dims,
            )?;
        }
        out.sparse = Some(ss.to_f32(dev)?);
        out.colbert = Some(sc.to_f32(dev)?);
        out.argmax = Some(argmax);
        out.q.unified = Some(uq);
        out.p.unified = Some(up);
        Ok(out)
    }

    /// The gradients of the hidden states (in their compute type, [B, L, H] per side) and of
    /// the head weights (None when dense only), from the gradients of the [CLS] rows `dcls_*`
    /// and of the two score matrices (before the temperature; None: zero).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        self,
        dev: &dyn KernelDevice,
        hw: Option<&HeadWeights>,
        hidden: usize,
        (hq, hp): (&DBuf, &DBuf),
        (dcls_q, dcls_p): (&[f32], &[f32]),
        dsparse: Option<&[f32]>,
        dcolbert: Option<&[f32]>,
    ) -> Result<(DBuf, DBuf, Option<HeadGrads>)> {
        let dt = hq.dtype();
        let (bq, bp) = (self.q.batch, self.p.batch);
        let dhq = DBuf::zeros(dev, hq.len(), dt)?;
        let dhp = DBuf::zeros(dev, hp.len(), dt)?;
        let mut grads = None;
        if let (Some(hw), Some(uq), Some(up), Some(argmax)) = (
            hw,
            self.q.unified.as_ref(),
            self.p.unified.as_ref(),
            self.argmax.as_ref(),
        ) {
            let (hd, dc) = (hw.hidden, hw.colbert_dim);
            let zeros = vec![0.0f32; bq * bp];
            let ds = DBuf::from_f32(dev, dsparse.unwrap_or(&zeros), KDType::F32)?;
            let dsc = DBuf::from_f32(dev, dcolbert.unwrap_or(&zeros), KDType::F32)?;
            let dws = DBuf::zeros(dev, hd, KDType::F32)?;
            let dsb = DBuf::zeros(dev, 1, KDType::F32)?;
            let dcw = DBuf::zeros(dev, dc * hd, KDType::F32)?;
            let dcb = DBuf::zeros(dev, dc, KDType::F32)?;
            // Sparse: score -> list weights -> term weights -> hidden (assigned: first).
            let (nq, np) = (bq * self.q.len, bp * self.p.len);
            let dwq = DBuf::uninit(dev, nq, KDType::F32)?;
            let dwp = DBuf::uninit(dev, np, KDType::F32)?;
            // SAFETY: lists and score gradients as in the forward; dw [n] f32; h and dh [n, hd].
            unsafe {
                km::sparse_scores_bwd(
                    dev,
                    &uq.lex.lists(),
                    &up.lex.lists(),
                    ds.ptr(),
                    dwq.ptr(),
                    dwp.ptr(),
                )?;
                for (h, u, dw, dh, n) in [(hq, uq, &dwq, &dhq, nq), (hp, up, &dwp, &dhp, np)] {
                    km::sparse_weights_bwd(
                        dev,
                        dt,
                        h.ptr(),
                        hw.sparse_w.ptr(),
                        u.weights.ptr(),
                        dw.ptr(),
                        dh.ptr(),
                        dws.ptr(),
                        dsb.ptr(),
                        n,
                        hd,
                    )?;
                }
            }
            // ColBERT: MaxSim (f32) -> compute type -> normalisation -> projection (+=).
            let dvq = DBuf::zeros(dev, nq * dc, KDType::F32)?;
            let dvp = DBuf::zeros(dev, np * dc, KDType::F32)?;
            let dims = MaxSimDims {
                queries: bq,
                q_len: self.q.len,
                passages: bp,
                p_len: self.p.len,
                dim: dc,
            };
            // SAFETY: as the forward; dvq / dvp [n, dc] f32.
            unsafe {
                km::maxsim_bwd(
                    dev,
                    dt,
                    uq.vecs.ptr(),
                    uq.mask.ptr,
                    up.vecs.ptr(),
                    argmax.ptr,
                    dsc.ptr(),
                    dvq.ptr(),
                    dvp.ptr(),
                    dims,
                )?
            };
            for (h, u, dv, dh, n) in [(hq, uq, dvq, &dhq, nq), (hp, up, dvp, &dhp, np)] {
                let dvt = if dt == KDType::F32 {
                    dv
                } else {
                    let t = DBuf::uninit(dev, n * dc, dt)?;
                    // SAFETY: dv [n, dc] f32, t [n, dc] bf16.
                    unsafe { k::cast_from_f32(dev, dt, dv.ptr(), t.ptr(), n * dc)? };
                    t
                };
                let dpre = DBuf::uninit(dev, n * dc, dt)?;
                let dh_gemm = DeviceGemm {
                    ta: Trans::N,
                    tb: Trans::N,
                    m: n,
                    k: dc,
                    n: hd,
                    alpha: 1.0,
                    beta: 1.0,
                    ab: dt,
                    c: dt,
                };
                let dw_gemm = DeviceGemm {
                    ta: Trans::T,
                    tb: Trans::N,
                    m: dc,
                    k: n,
                    n: hd,
                    alpha: 1.0,
                    beta: 1.0,
                    ab: dt,
                    c: KDType::F32,
                };
                // SAFETY: pre, dvt, dpre [n, dc]; W [dc, hd]; h, dh [n, hd]; dcw [dc, hd] f32,
                // dcb [dc] f32.
                unsafe {
                    k::l2_normalize_bwd(
                        dev,
                        dt,
                        u.pre.ptr(),
                        dvt.ptr(),
                        dpre.ptr(),
                        n,
                        dc,
                        NORM_EPS,
                    )?;
                    dev.gemm(&dh_gemm, dpre.ptr(), hw.colbert_w.ptr(), dh.ptr())?;
                    dev.gemm(&dw_gemm, dpre.ptr(), h.ptr(), dcw.ptr())?;
                    k::colsum(dev, dt, dpre.ptr(), dcb.ptr(), n, dc)?;
                }
            }
            grads = Some(HeadGrads {
                colbert_w: dcw.to_f32(dev)?,
                colbert_b: dcb.to_f32(dev)?,
                sparse_w: dws.to_f32(dev)?,
                sparse_b: dsb.to_f32(dev)?,
            });
        }
        // Dense: the [CLS] rows' gradients added to what the other heads left there.
        for (dh, dcls, side) in [(&dhq, dcls_q, &self.q), (&dhp, dcls_p, &self.p)] {
            add_cls_rows(dev, dh, dcls, side.batch, side.len, hidden)?;
        }
        Ok((dhq, dhp, grads))
    }
}

/// dh[b, 0, :] += dcls[b, :] for every text b.
fn add_cls_rows(
    dev: &dyn KernelDevice,
    dh: &DBuf,
    dcls: &[f32],
    batch: usize,
    len: usize,
    hidden: usize,
) -> Result<()> {
    if dcls.len() != batch * hidden {
        return Err(Error::shape(
            "device heads: [CLS] gradient",
            &[batch, hidden],
            &[dcls.len()],
        ));
    }
    let rows: Vec<u32> = (0..batch).map(|i| (i * len) as u32).collect();
    let cur = gather_rows(dev, dh, &rows, hidden)?;
    let cur = cur.to_f32(dev)?;
    for b in 0..batch {
        let row: Vec<f32> = cur[b * hidden..][..hidden]
            .iter()
            .zip(&dcls[b * hidden..][..hidden])
            .map(|(a, g)| a + g)
            .collect();
        let bytes: Vec<u8> = match dh.dtype() {
            KDType::F32 => bytemuck::cast_slice(&row).to_vec(),
            KDType::BF16 => {
                let v: Vec<half::bf16> = row.iter().map(|&x| half::bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
        };
        // SAFETY: row b · len of dh holds `hidden` elements of its type.
        unsafe { dev.write(dh.at(b * len * hidden), &bytes)? };
    }
    Ok(())
}
